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
