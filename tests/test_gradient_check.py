"""The PS's spot checks of the workers' gradients (byzsgd.roles.gradient_check): a forged row
is caught and its sender banned, a correct worker's gradient is recomputed bit for bit (no
false ban), and in a real deployment every forging worker is banned at every correct PS."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.roles.gradient_check import GradientCheck
from byzsgd.roles.replica import Replica

ROOT = Path(__file__).resolve().parent.parent


def _cfg(**kw) -> RunConfig:
    return RunConfig(**{**dict(num_ps=1, fps=0, num_workers=5, fw=1, model="linear", batch=8), **kw})


def test_a_forged_row_is_caught_and_only_its_sender_is_banned():
    truth = {r: torch.full((4,), float(r)) for r in range(1, 6)}
    check = GradientCheck(_cfg(), 4, 1e-3, recompute=lambda r, state, step: truth[r],
                          rng=random.Random(0))
    senders = [1, 2, 3, 5]
    rows = torch.stack([truth[1], truth[2] * 1.01, truth[3] * (1 + 1e-5), truth[5]])
    assert check.check(0, torch.zeros(1), senders, rows) == [2]  # 1e-5 is rounding, 1e-2 is not
    assert check.banned == {2: 0} and check.checked == 4
    rows[0, 0] = float("nan")
    assert sorted(check.check(1, torch.zeros(1), senders, rows)) == [1, 2]


def test_a_diverged_model_bans_nobody():
    """When the model itself gives a non-finite gradient, a correct worker's non-finite row is
    no forgery: nobody is banned."""
    check = GradientCheck(_cfg(), 2, 1e-3, recompute=lambda r, s, t: torch.full((2,), float("nan")),
                          rng=random.Random(0))
    assert check.check(0, torch.zeros(1), [1, 2], torch.full((2, 2), float("nan"))) == []
    assert check.banned == {}


def test_k_rows_drawn_at_random_each_step():
    calls = []
    check = GradientCheck(_cfg(), 2, 1e-3, recompute=lambda r, s, t: calls.append(r) or torch.ones(2),
                          rng=random.Random(1))
    for t in range(50):
        check.check(t, torch.zeros(1), [1, 2, 3, 4], torch.ones(4, 2))
    assert len(calls) == 100 and set(calls) == {1, 2, 3, 4}


@pytest.mark.parametrize("kw,needle", [(dict(), "in \\[1, q_w=4\\]"), (dict(mode="paper"), "garfield")])
def test_bad_settings_are_refused(kw, needle):
    k = 5 if not kw else 1
    with pytest.raises(ConfigError, match=needle):
        GradientCheck(_cfg(**kw), k, 1e-3)
    with pytest.raises(ConfigError):
        RunConfig(**{**dict(num_workers=5, fw=1, check_gradients=k), **kw}).validate()


def test_the_recomputed_gradient_is_the_workers_own_bit_for_bit():
    """No false ban: the PS's recomputation (another process's replica in a deployment) equals
    what the worker sends, for every worker and several steps, dropout included."""
    cfg = RunConfig(num_ps=1, fps=0, num_workers=3, fw=1, model="convnet", batch=16, seed=5)
    check = GradientCheck(cfg, 1, 1e-3)
    state = Replica(cfg, with_test_set=True).state_vector()
    for rank in cfg.worker_ranks:
        worker = Replica(dataclasses.replace(cfg, rank=rank), with_train_shard=True)
        for step in (0, 7, 123):
            sent = worker.gradient_at(state, step)[0].clone()
            assert torch.equal(check._replica_gradient(rank, state, step), sent), (rank, step)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_forging_worker_is_banned_at_every_correct_ps(tmp_path):
    """The launcher's defaults (--check_gradients 1), two forging workers of seven: each correct
    PS bans both (metrics 'banned'), never a correct worker, and the run trains."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "byzsgd.launch", "--num_iter", "60", "--acc_freq", "60",
                          "--fw", "2", "--byz_workers", "2", "--worker_attack", "minsum",
                          "--seed", "0", "--quiet", "--json", "--run_dir", str(run)],
                         capture_output=True, text=True, timeout=800, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    byz = set(summary["byzantine_ranks"])
    assert byz == {9, 10}
    for path in sorted(run.glob("metrics-ps*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        banned = {e["worker"]: e["step"] for e in events if e.get("event") == "banned"}
        assert set(banned) == byz, (path.name, banned)
        quorums = [set(e["quorum"]) for e in events if "quorum" in e and e["step"] > max(banned.values())]
        assert quorums and not any(q & byz for q in quorums)
    assert summary["min_accuracy"] > 80, summary["min_accuracy"]


def test_more_failures_than_fw_turn_the_checks_off_and_lift_every_ban():
    """A PS whose recomputation is not what its correct workers compute (a CUDA worker and a
    CPU PS draw different dropout masks from one seed) would ban correct workers: at most fw
    workers are Byzantine, so a (fw+1)-th failing worker means the setting, not an attack.
    The checks go off, every ban is lifted (the PS keeps q_w workers to ask: before, an
    uncapped ban list left it fewer and it waited for ever), and a resumed PS keeps them off."""
    from byzsgd.roles.ps_step import PSStep

    cfg = RunConfig(num_ps=1, fps=0, num_workers=5, fw=1, rank=0, model="linear", batch=8,
                    dataset="synthetic:1x4x4:3:60:20", loss="cross-entropy", check_gradients=1,
                    worker_momentum=0.9)
    replica = Replica(cfg, with_test_set=True)
    ps = PSStep(cfg, replica, rng=random.Random(0))
    ps.check._recompute = lambda rank, state, step: torch.ones(replica.grad_size)  # nobody's row
    senders = [1, 2, 3, 4]
    rows = torch.randn(4, replica.grad_size)
    first = ps(0, replica.state_vector(), senders, rows)
    assert len(first.banned) == 1 and first.lifted is None and ps.banned == set(first.banned)
    assert ps.gradients.f_now == 0
    second_senders = [w for w in (1, 2, 3, 4, 5) if w not in first.banned]
    second = ps(1, replica.state_vector(), second_senders, rows)
    assert second.banned == [] and second.lifted == first.banned  # the one ban, lifted
    assert ps.banned == set() and ps.check is None and ps.gradients.f_now == cfg.fw
    assert ps(2, replica.state_vector(), senders, rows).banned == []  # no more checks
    state = ps.gradients.state_dict()
    assert state["check_off"] is True and state["banned"] == []
    resumed = PSStep(cfg, Replica(cfg, with_test_set=True), rng=random.Random(0))
    resumed.gradients.load_state_dict(state)
    resumed.check._recompute = lambda rank, s, t: pytest.fail("a resumed PS checked again")
    assert resumed(3, replica.state_vector(), senders, rows).banned == []
    assert resumed.check is None


def test_fw_forgers_alone_never_turn_the_checks_off():
    """The cap counts distinct workers: fw forgers caught again and again stay banned."""
    from byzsgd.roles.ps_step import PSStep

    cfg = RunConfig(num_ps=1, fps=0, num_workers=7, fw=2, rank=0, model="linear", batch=8,
                    dataset="synthetic:1x4x4:3:60:20", loss="cross-entropy", check_gradients=5,
                    worker_momentum=0.9)
    replica = Replica(cfg, with_test_set=True)
    ps = PSStep(cfg, replica, rng=random.Random(0))
    honest = torch.randn(replica.grad_size)
    ps.check._recompute = lambda rank, state, step: honest
    for t in range(3):
        senders = [w for w in (6, 7, 1, 2, 3, 4, 5) if w not in ps.banned][:5]  # forgers first
        rows = torch.stack([honest * (3.0 if w in (6, 7) else 1.0) for w in senders])
        out = ps(t, replica.state_vector(), senders, rows)
        assert out.lifted is None
    assert ps.banned == {6, 7} and ps.check is not None and ps.gradients.f_now == 0
