"""scripts/gpu_check.sh --smoke: the GPU check's whole pipeline (tests, the rules against the
copy floor, three deployments against vanilla, one JSON line) at a tiny size on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = dict(os.environ, BYZSGD_PYTHON=sys.executable, BYZSGD_GPU_CHECK_OUT=str(tmp_path),
               BYZSGD_GPU_CHECK_BUDGET="200", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["check"].startswith("smoke")
    assert report["tests"]["device"]["rc"] == 0, report
    assert report["bench_gars"]["device"] == "cpu"
    assert {"average", "median", "krum"} <= set(report["bench_gars"]["x_floor"])
    dep = report["deployments"]
    assert dep["outcome"] == {"vanilla": "ok", "garfield": "ok", "paper": "ok"}, (dep, proc.stderr[-3000:])
    assert all(dep["s_per_step"][k] > 0 for k in ("vanilla", "garfield", "paper"))
    assert set(dep["ratio"]) == {"paper/vanilla", "garfield/vanilla", "garfield/(n_ps*vanilla)"}
    assert set(report["goals"]) == {"paper <= 1.5x vanilla", "garfield <= 1.2 x n_ps x vanilla",
                                    "median family <= 3x copy floor", "krum <= 3x copy floor"}
