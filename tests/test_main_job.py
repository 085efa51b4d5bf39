"""The main job as the README runs it: the launcher's defaults, not --quiet, shortened steps.

Checks what a user sees: the deployment line (the README's 4 PS fps=1 + 7 workers fw=1,
median after nnm of per-worker momentums), the progress bar, and one final accuracy per PS that matches the PS's own metrics.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_main_job_prints_progress_and_every_ps_accuracy(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "byzsgd.launch", "--num_iter", str(STEPS), "--acc_freq", "20",
                          "--run_dir", str(run)], capture_output=True, text=True, timeout=280, env=env,
                         stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert ("4 PS (fps=1) + 7 workers (fw=1), gar=median after pre_agg=nnm, worker_momentum=0.9, "
            "garfield mode, mnist/convnet") in out
    bars = re.findall(r"\[([#.]{30})\] step (\d+)/%d loss (\S+) acc\(min over correct PS\) (\S+)" % STEPS, out)
    assert bars, f"no progress bar in:\n{out[-2000:]}"
    steps = [int(s) for _, s, _, _ in bars]
    assert steps == sorted(steps)
    printed = {int(r): float(a) for r, a in re.findall(r"PS (\d) final accuracy ([\d.]+)%", out)}
    assert sorted(printed) == [0, 1, 2, 3]
    for rank, acc in printed.items():
        records = [json.loads(line) for line in (run / f"metrics-ps{rank}.jsonl").read_text().splitlines()]
        done = [r for r in records if r.get("event") == "done"]
        assert done and done[-1]["final_accuracy"] == pytest.approx(acc, abs=0.006)
        assert acc > 80.0, f"PS {rank} at {acc}% after {STEPS} steps (about 89% measured)"
    assert re.search(r"median step time [\d.]+ s, wall time [\d.]+ s", out)


def test_the_launchers_paper_mode_defaults_are_its_own_and_explicit_flags_win():
    """--mode paper has no gradient check, so its main-job defaults are the rule alone's best
    worst case (docs/worst_case.md): momentums 0.99 at lr 0.005; garfield mode keeps 0.9 at
    0.05 with the check.  A flag given explicitly is never replaced by a mode default."""
    from byzsgd.deploy.options import LaunchConfig

    g = LaunchConfig.from_argv([]).run
    assert (g.worker_momentum, g.opt_args["lr"], g.check_gradients) == (0.9, "0.05", 1)
    p = LaunchConfig.from_argv(["--mode", "paper"]).run
    assert (p.worker_momentum, p.opt_args["lr"], p.check_gradients) == (0.99, "0.005", 0)
    mine = LaunchConfig.from_argv(["--mode", "paper", "--worker_momentum", "0.9",
                                   "--opt_args", '{"lr": "0.02"}']).run
    assert (mine.worker_momentum, mine.opt_args) == (0.9, {"lr": "0.02"})
    grid = LaunchConfig.from_values({"mode": "paper"}).run
    assert (grid.worker_momentum, grid.opt_args["lr"], grid.check_gradients) == (0.99, "0.005", 0)
    assert LaunchConfig.from_values({"mode": "paper", "worker_momentum": 0.5}).run.worker_momentum == 0.5


def test_the_launchers_defaults_validate_in_both_modes():
    """``byzsgd-launch --mode paper`` with no other flag was refused at start: its default
    optimizer momentum (0.9) was not its default worker momentum (0.99), so the check that a
    momentum is never applied twice refused the launcher's own defaults."""
    from byzsgd.deploy.options import LaunchConfig

    for argv in ([], ["--mode", "paper"]):
        run = LaunchConfig.from_argv(argv).run
        run.validate()  # raised ConfigError: "--worker_momentum 0.99 with optimizer momentum 0.9"
        assert float(run.opt_args.get("momentum", 0)) in (0.0, run.worker_momentum), argv
