#!/usr/bin/env python
"""Deployments on one machine's GPU(s) against vanilla, in one run: one JSON line.

Three deployments of ``python -m byzsgd.launch --device auto`` (each rank on the device its
local index maps to), the same workers, model, data and batch:

* ``garfield``: 4 PS (fps=1) + 7 workers (fw=1), the launcher's main-job rules;
* ``paper``:    the same deployment in ``--mode paper`` (MDA, DMC every T = auto steps);
* ``vanilla``:  1 PS, ``--gar average``, the same 7 workers, no Byzantine tolerance.

Default: ResNet-18 on a synthetic CIFAR-shaped set (``synthetic:3x32x32:10``), batch 128,
100 steps.  Prints (stdout, last line) one JSON object::

    {"device": ..., "s_per_step": {"garfield": s, "paper": s, "vanilla": s},
     "ratio": {"paper/vanilla": r, "garfield/vanilla": r, "garfield/(n_ps*vanilla)": r},
     "goals": {"paper <= 1.5x vanilla": bool, "garfield <= 1.2 x n_ps x vanilla": bool},
     "gpu_util": {"<deployment>": {"mean": %, "max": %, "mem_max_mib": m}} | null, ...}

``s_per_step`` is each run's median step time (the launcher's summary, correct PSes).  GPU
utilisation is sampled with ``nvidia-smi`` every 0.5 s while a deployment runs (null without
it).  ``--smoke``: the same pipeline at a tiny size on the CPU (what the CPU test suite runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def deployments(a) -> dict[str, list[str]]:
    common = ["--dataset", a.dataset, "--model", a.model, "--loss", "cross-entropy",
              "--batch", str(a.batch), "--num_iter", str(a.steps), "--acc_freq", str(a.steps),
              "--eval_samples", "256", "--num_workers", str(a.workers), "--device", a.device,
              "--seed", "1", "--quiet", "--json", "--spawn", a.spawn, "--timeout", str(a.timeout)]
    byz = ["--num_ps", str(a.num_ps), "--fps", str(a.fps), "--fw", str(a.fw)]
    return {
        "vanilla": common + ["--num_ps", "1", "--fps", "0", "--fw", "0", "--gar", "average",
                             "--pre_agg", "none", "--worker_momentum", "0",
                             "--opt_args", '{"lr": "0.05", "momentum": "0.9"}'],
        "garfield": common + byz + ["--mode", "garfield"],
        "paper": common + byz + ["--mode", "paper", "--pre_agg", "none", "--worker_momentum", "0",
                                 "--opt_args", '{"lr": "0.05"}'],
    }


class GpuSampler:
    """``nvidia-smi`` utilisation / memory every ``period`` s in a thread (None without it)."""

    def __init__(self, period: float = 0.5):
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = None
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=5).stdout
                for line in out.strip().splitlines()[:1]:  # the first GPU (gpu_check: one)
                    util, mem = (float(v) for v in line.split(","))
                    self.samples.append((util, mem))
            except Exception:  # noqa: BLE001 - a sample missed is not an error
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self):
        if not self.available or not self.samples:
            return None
        utils = [u for u, _ in self.samples]
        return {"mean": round(sum(utils) / len(utils), 1), "max": max(utils),
                "mem_max_mib": max(m for _, m in self.samples), "samples": len(utils)}


def run_one(name: str, argv: list[str], run_dir: Path, log) -> dict:
    cmd = [sys.executable, "-m", "byzsgd.launch", *argv, "--run_dir", str(run_dir)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    with GpuSampler() as gpu:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    log.write(f"== {name}: {' '.join(cmd)}\n{proc.stderr[-4000:]}\n")
    summary = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    print(f"bench_gpu: {name}: {summary.get('outcome', 'no summary')} "
          f"({summary.get('median_step_time')} s/step, {wall:.0f} s wall)", file=sys.stderr, flush=True)
    return {"summary": summary, "wall_s": round(wall, 1), "gpu": gpu.summary(), "rc": proc.returncode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run of the same pipeline (convnet on 1x28x28, 3 steps, 4 workers)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", default="synthetic:3x32x32:10")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--num_ps", type=int, default=4)
    ap.add_argument("--fps", type=int, default=1)
    ap.add_argument("--workers", type=int, default=7)
    ap.add_argument("--fw", type=int, default=1)
    ap.add_argument("--spawn", default="exec", choices=("fork", "exec"),
                    help="exec (default): each node a fresh interpreter (no CUDA state shared)")
    ap.add_argument("--timeout", type=float, default=150.0, help="per deployment (s)")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds for all the deployments together (0: no limit): each gets at "
                         "most an equal share of what is left (a run cut short reports the "
                         "median of the steps it made)")
    ap.add_argument("--only", default="vanilla,garfield,paper")
    ap.add_argument("--run_root", default=None, help="where the run directories go (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.device, a.dataset, a.model = "cpu", "synthetic:1x28x28:10:256:64", "convnet"
        a.batch, a.steps, a.workers, a.spawn = 8, 3, 4, "fork"
        a.timeout = min(a.timeout, 120.0)
    root = Path(a.run_root or tempfile.mkdtemp(prefix="byzsgd-bench-gpu-"))
    root.mkdir(parents=True, exist_ok=True)
    plans = deployments(a)
    results = {}
    names = [n for n in a.only.split(",") if n]
    deadline = time.monotonic() + a.budget if a.budget > 0 else None
    with open(root / "bench_gpu.log", "w") as log:
        for i, name in enumerate(names):
            argv = plans[name]
            if deadline is not None:
                share = max(20.0, (deadline - time.monotonic()) / (len(names) - i))
                argv = argv + ["--timeout", f"{min(a.timeout, share):.0f}"]  # the last one wins
            results[name] = run_one(name, argv, root / name, log)
    step = {k: v["summary"].get("median_step_time") for k, v in results.items()}
    van = step.get("vanilla")

    def ratio(x, scale=1.0):
        return round(x / (scale * van), 3) if x and van else None

    ratios = {"paper/vanilla": ratio(step.get("paper")), "garfield/vanilla": ratio(step.get("garfield")),
              f"garfield/(n_ps*vanilla)": ratio(step.get("garfield"), a.num_ps)}
    goals = {"paper <= 1.5x vanilla": None if ratios["paper/vanilla"] is None else ratios["paper/vanilla"] <= 1.5,
             "garfield <= 1.2 x n_ps x vanilla": None if ratios["garfield/(n_ps*vanilla)"] is None
             else ratios["garfield/(n_ps*vanilla)"] <= 1.2}
    try:
        import torch
        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    except Exception:  # noqa: BLE001
        dev = "unknown"
    out = {"device": dev, "device_flag": a.device, "model": a.model, "dataset": a.dataset,
           "batch": a.batch, "steps": a.steps, "num_ps": a.num_ps, "workers": a.workers,
           "s_per_step": step, "ratio": ratios, "goals": goals,
           "outcome": {k: v["summary"].get("outcome") for k, v in results.items()},
           "wall_s": {k: v["wall_s"] for k, v in results.items()},
           "gpu_util": {k: v["gpu"] for k, v in results.items()} if any(v["gpu"] for v in results.values()) else None,
           "run_root": str(root)}
    print(json.dumps(out), flush=True)
    return 0 if all(v["summary"].get("outcome") == "ok" for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
