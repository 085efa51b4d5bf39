"""A run killed mid-way continues with ``byzsgd-launch --resume RUN_DIR`` (issue 27).

One real deployment (4 PS fps=1 + 5 workers fw=1, median, MNIST, 200 steps, as
tests/test_faults.py) started by the console script: the fault injector sees its nodes;
``kill.sh`` stops it after the PSes checkpointed (into the run directory: ``--checkpoint_every``
without ``--checkpoint_dir``), leaving outcome "killed" by kill.sh and exit codes 143; the
resumed run starts from the newest checkpoint every PS has and ends in the accuracy band of
an uninterrupted run (93.4% at 200 steps on this configuration; a fault costs a few points).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.deploy import faults
from byzsgd.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--num_ps", "4", "--fps", "1", "--num_workers", "5", "--fw", "1", "--gar", "median",
         "--opt_args", '{"lr":"0.1"}', "--resend_after", "5"]
STEPS, EVERY = 200, 40
#: the uninterrupted reference is ~93.4% at 200 steps (tests/test_faults.py)
GOOD_ACCURACY = 88.0


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "byzsgd-launch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "byzsgd.launch"]


def _common_checkpoint(ckpt: Path, ranks=range(4)) -> int:
    steps = []
    for r in ranks:
        mine = [int(m.group(1)) for p in ckpt.glob(f"ckpt-r{r}-s*.pt")
                if (m := re.match(rf"ckpt-r{r}-s(\d+)\.pt$", p.name))]
        steps.append(max(mine, default=0))
    return min(steps)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_run_resumes_into_the_same_accuracy_band(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([*_launcher(), "--quiet", "--json", "--run_dir", str(run_dir), *SMALL,
                              "--num_iter", str(STEPS), "--acc_freq", str(STEPS), "--checkpoint_every",
                              str(EVERY), "--timeout", "400"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ckpt = run_dir / "checkpoints"
        _wait(lambda: (run_dir / "deployment.json").exists() and
              all(f"worker{r}" in "".join(faults.status(run_dir)) for r in range(4, 9)) and
              _common_checkpoint(ckpt) >= 2 * EVERY, 400, "two checkpoints of every PS")
        # the fault injector sees every node of a console-script run (issue 27: "pid - dead")
        states = faults.status(run_dir)
        assert all(" alive" in line for line in states), states
        res = subprocess.run(["bash", str(ROOT / "scripts" / "kill.sh"), str(run_dir)],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, "BYZSGD_PYTHON": sys.executable})
        assert res.returncode == 0, res.stderr
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    killed = json.loads((run_dir / "summary.json").read_text())
    assert killed["outcome"] == "killed" and killed["outcome_detail"]["by"] == "kill.sh", killed
    assert set(killed["returncodes"].values()) <= {143, 0} and 143 in killed["returncodes"].values(), killed
    assert (run_dir / "ps0.rc").read_text().strip() == "143"
    assert "outcome killed by kill.sh" in res.stderr
    resumed_from = _common_checkpoint(run_dir / "checkpoints")

    second = subprocess.run([*_launcher(), "--resume", str(run_dir), "--quiet", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=500)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok", summary
    accs = summary["final_accuracy"]
    assert min(accs.values()) >= GOOD_ACCURACY, accs
    # each PS's second life started at the common checkpoint, not at step 0
    recs = list(read_metrics(run_dir / "metrics-ps0.jsonl"))
    starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
    assert len(starts) == 2
    steps = [r["step"] for r in recs[starts[1]:] if "step_time" in r and "event" not in r]
    assert steps and steps[0] >= resumed_from >= 2 * EVERY, (steps[:3], resumed_from)
    assert not (run_dir / "stop.json").exists()
    print(f"\nFIGURES resume: killed after the checkpoint of step {resumed_from} "
          f"(killed summary wall {killed['wall_time']:.1f} s), resumed at step {steps[0]}, final "
          f"accuracy {accs}, resumed wall {summary['wall_time']:.1f} s")


def test_long_runs_checkpoint_into_their_run_directory_by_default(tmp_path):
    from byzsgd.deploy.launch import CHECKPOINT_EVERY, LONG_RUN_STEPS, with_checkpoints
    from byzsgd.deploy.options import LaunchConfig

    long = with_checkpoints(LaunchConfig.from_argv(["--run_dir", str(tmp_path / "r"), "--num_iter",
                                                    str(LONG_RUN_STEPS)]))
    assert long.run.checkpoint_dir == str((tmp_path / "r" / "checkpoints").resolve())
    assert long.run.checkpoint_every == CHECKPOINT_EVERY == 100
    short = with_checkpoints(LaunchConfig.from_argv(["--run_dir", str(tmp_path / "r"), "--num_iter", "50"]))
    assert short.run.checkpoint_dir is None and short.run.checkpoint_every == 0
    chosen = with_checkpoints(LaunchConfig.from_argv(["--num_iter", "1000", "--checkpoint_dir", str(tmp_path / "c"),
                                                      "--checkpoint_every", "7"]))
    assert (chosen.run.checkpoint_dir, chosen.run.checkpoint_every) == (str(tmp_path / "c"), 7)
    assert chosen.run_dir  # fixed before the nodes are laid out: the default checkpoints go there


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    from byzsgd import rundir
    from byzsgd.deploy.launch import _resume_argv, main

    assert _resume_argv(["--resume", "true", "--num_iter", "5"]) == (None, ["--resume", "true", "--num_iter", "5"])
    assert _resume_argv(["--quiet", f"--resume={tmp_path}"]) == (str(tmp_path), ["--quiet"])
    assert main(["--resume", str(tmp_path)]) == 2  # no run.json: not a launcher's run
    rundir.write_run_record(tmp_path, launcher="byzsgd.launch", argv=["--num_iter", "20"])
    assert main(["--resume", str(tmp_path)]) == 2  # no checkpoint to resume from
