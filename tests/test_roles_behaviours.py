"""Behaviours tested through the role classes that run them (not a copy in the test):
label flipping in the worker, the sync worker's "median after every PS failed" fallback
(roles/paper_sync.py), and the PS attacks delay (in this process, tests/inprocess.py) and
crash (a real launcher deployment: it exits its process)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.learning.flat_state import compute_gradient
from byzsgd.metrics import read_metrics
from byzsgd.roles import filters as filters_mod
from byzsgd.roles.replica import step_seed
from byzsgd.roles.nodes import Worker
from tests import inprocess

ROOT = Path(__file__).resolve().parent.parent


def test_a_label_flipping_worker_computes_its_gradient_on_flipped_labels(monkeypatch):
    monkeypatch.setenv("BYZSGD_SECRET", inprocess.SECRET)
    common = dict(rank=3, num_ps=1, num_workers=3, fw=1, gar="median", batch=16, seed=2,
                  insecure_shared_secret=True)  # built, never connected
    honest = Worker(RunConfig(**common))
    flipper = Worker(RunConfig(attack="label_flip", **common))
    state = honest.replica.state_vector()
    for step in (0, 1, 7):
        x, y = honest.replica._batch(step)
        xf, yf = flipper.replica._batch(step)
        assert torch.equal(x, xf) and torch.equal(yf, 9 - y) and not torch.equal(yf, y)
        # the gradient it sends is the gradient of the flipped batch, and not the honest one
        # (the same dropout masks for all three: gradient_at seeds the forward pass with
        # step_seed(seed, worker, step), the expected gradient is computed under that seed)
        grad = flipper.replica.gradient_at(state, step)[0].clone()
        sent = flipper.behaviour.forge(grad.clone(), step)
        flipper.replica.flat.load(state)
        torch.manual_seed(step_seed(2, flipper.cfg.worker_index, step))
        expected, _ = compute_gradient(flipper.replica.model, flipper.replica.loss_fn, x, 9 - y)
        assert torch.allclose(sent, expected, atol=1e-6)
        honest_grad = honest.replica.gradient_at(state, step)[0]
        assert not torch.allclose(sent, honest_grad, atol=1e-3)


def _sync_run(tmp_path, monkeypatch, steps):
    return inprocess.deploy(tmp_path, monkeypatch, num_ps=2, num_workers=2, fw=0, fps=0, mode="paper",
                            sync=True, gar="average", num_iter=steps, acc_freq=steps, eval_samples=200,
                            pull_timeout=5.0)


@pytest.mark.timeout(600)
def test_the_sync_worker_takes_the_median_after_every_ps_failed(tmp_path, monkeypatch):
    """The real PaperSyncWorker, with a filter that fails every model: each step, after every
    PS failed, the worker takes the median of q_ps models (a bootstrap) and training goes on;
    the PSes hear how many models were rejected.  Beside it, the same run with the real
    filters bootstraps only at the start."""
    steps = 8
    roles, codes = _sync_run(tmp_path / "control", monkeypatch, steps)
    assert set(codes.values()) == {0}, codes
    control = {r: roles[r].bootstraps for r in (2, 3)}

    def fail_everything(self, params, step):
        return filters_mod.Verdict(False, "outliers", 1.0, 0.0)
    monkeypatch.setattr(filters_mod.ModelFilters, "screen", fail_everything)
    (tmp_path / "failing").mkdir()
    roles, codes = _sync_run(tmp_path / "failing", monkeypatch, steps)
    assert set(codes.values()) == {0}, codes
    print(f"bootstraps with the real filters {control}, with every model failing "
          f"{ {w: roles[w].bootstraps for w in (2, 3)} } ({steps} steps)")
    for w in (2, 3):
        worker = roles[w]
        assert worker.bootstraps >= steps - 1, (w, worker.bootstraps)  # every step from the median
        assert worker.bootstraps > control[w], (worker.bootstraps, control)
    for ps in (0, 1):
        recs = list(read_metrics(tmp_path / "failing" / f"metrics-ps{ps}.jsonl"))
        assert max(r["step"] for r in recs if "quorum" in r) == steps - 1  # training went on
        done = [r for r in recs if r.get("event") == "done"]
        assert done and done[0]["models_rejected"] > 0, done


@pytest.mark.timeout(600)
def test_a_delaying_ps_is_left_out_of_the_gathers_and_waited_for_by_nobody(tmp_path, monkeypatch):
    """PS 3 sends every message 2 s late: the correct PSes take the first q_ps - 1 = 2 peer
    models, which are never its, and their steps do not wait 2 s."""
    delay, steps = 2.0, 12
    roles, codes = inprocess.deploy(tmp_path, monkeypatch, num_ps=4, fps=1, num_workers=3, fw=0,
                                    gar="average", num_iter=steps, acc_freq=steps, eval_samples=200,
                                    byzantine={3: ("delay", {"delay": delay})})
    assert all(codes[r] == 0 for r in (0, 1, 2)), codes
    assert roles[3].behaviour is not None and roles[3].behaviour.name == "delay"
    for ps in (0, 1, 2):
        recs = [r for r in read_metrics(tmp_path / f"metrics-ps{ps}.jsonl") if "model_quorum" in r]
        assert len(recs) >= steps - 2, (ps, len(recs))
        in_gathers = sum(3 in r["model_quorum"] for r in recs)
        print(f"PS {ps}: the delaying PS in {in_gathers} of {len(recs)} gathers, median step "
              f"{statistics.median(r['step_time'] for r in recs):.3f} s")
        assert in_gathers <= 1, (ps, [r["model_quorum"] for r in recs])
        assert statistics.median(r["step_time"] for r in recs) < delay / 2, (ps, [r["step_time"] for r in recs])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_crashing_ps_exits_at_its_step_and_the_others_finish(tmp_path):
    crash, steps = 5, 30
    proc = subprocess.run([sys.executable, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir",
                           str(tmp_path / "run"), "--num_ps", "4", "--fps", "1", "--num_workers", "4",
                           "--fw", "0", "--gar", "average", "--num_iter", str(steps), "--acc_freq", str(steps),
                           "--byz_ps", "1", "--ps_attack", "crash", "--ps_attack_args", json.dumps({"step": crash})],
                          capture_output=True, text=True, cwd=ROOT, timeout=550)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok", (summary, proc.stderr[-3000:])
    assert summary["byzantine_ranks"] == [3] and summary["returncodes"]["3"] == 3  # os._exit(3)
    assert set(summary["final_accuracy"]) == {"0", "1", "2"}
    # nothing of it past its crash step (it may have logged fewer steps: behind, it joined its
    # peers without a gradient phase of its own)
    crashed = [r for r in read_metrics(tmp_path / "run" / "metrics-ps3.jsonl") if "step" in r]
    assert all(r["step"] < crash for r in crashed), crashed[-3:]
    assert not any(r.get("event") == "done" for r in crashed)
    # in no gather after it crashed: at most its first 5 steps' (an honest-looking PS of the
    # highest rank finishes its steps last, so it is seldom among the first q_ps - 1 anyway)
    assert summary["model_quorum_share"]["3"] <= crash / steps, summary["model_quorum_share"]
    assert all(summary["model_quorum_share"][str(r)] > 0.5 for r in (0, 1, 2)), summary["model_quorum_share"]
