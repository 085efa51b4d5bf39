#!/usr/bin/env python3
"""Training throughput, side by side in one run: vanilla vs ByzSGD (vs paper mode).

(a) vanilla: 1 PS, ``average``, 7 workers, fw=0;
(b) byzsgd:  4 PS fps=1, 7 workers fw=1, ``median`` (the default, Garfield's mode);
(c) paper:   4 PS fps=1, 7 workers fw=1 in ``--mode paper`` (its default rule, ``mda``;
             the diameter measured at every gather, as by default);
(d) paper_sync: the same with ``--sync true`` (one filtered pull per worker and step)
(skip (c) and (d) with --no-paper).
MNIST convnet, batch 32, SGD lr 0.1 (Garfield's configuration), 200 steps each, every node a
process on this machine.  Reports the median step time after warm-up and the lowest final
test accuracy among the correct PSes.  ``--json``: one JSON object as the last line::

    {"vanilla_s_per_step": a, "byzsgd_s_per_step": b, "byzsgd_accuracy": acc, "steps": 200,
     "paper_s_per_step": c, "paper_over_vanilla": c / a, "paper_sync_s_per_step": d, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["--dataset", "mnist", "--model", "convnet", "--batch", "32", "--loss", "nll",
          "--optimizer", "sgd", "--opt_args", '{"lr": "0.1"}', "--quiet", "--json"]

CONFIGS = {
    "vanilla": ["--num_ps", "1", "--num_workers", "7", "--fw", "0", "--fps", "0", "--gar", "average"],
    "byzsgd": ["--num_ps", "4", "--num_workers", "7", "--fw", "1", "--fps", "1", "--gar", "median"],
    "paper": ["--num_ps", "4", "--num_workers", "7", "--fw", "1", "--fps", "1", "--mode", "paper"],
    "paper_sync": ["--num_ps", "4", "--num_workers", "7", "--fw", "1", "--fps", "1", "--mode", "paper",
                   "--sync", "true"],
}


def run_deployment(name: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "byzsgd.launch", *COMMON, *CONFIGS[name], "--num_iter", str(steps),
           "--acc_freq", str(steps), "--run_dir", str(workdir / name), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench_train: the {name} deployment failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-mode deployment")
    p.add_argument("--keep", default=None, help="keep run directories here")
    args = p.parse_args(argv)
    names = ["vanilla", "byzsgd"] + ([] if args.no_paper else ["paper", "paper_sync"])
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        results = {name: run_deployment(name, args.steps, workdir, []) for name in names}
    print(f"{'deployment':<11} {'s/step':>8} {'x vanilla':>10} {'min acc %':>10} {'wall s':>8}")
    base = results["vanilla"]["median_step_time"]
    for name in names:
        r = results[name]
        print(f"{name:<11} {r['median_step_time']:8.4f} {r['median_step_time'] / base:10.2f} "
              f"{r['min_accuracy']:10.2f} {r['wall_time']:8.1f}")
    out = {"vanilla_s_per_step": base,
           "byzsgd_s_per_step": results["byzsgd"]["median_step_time"],
           "byzsgd_accuracy": results["byzsgd"]["min_accuracy"],
           "vanilla_accuracy": results["vanilla"]["min_accuracy"],
           "steps": args.steps}
    if "paper" in results:
        out["paper_s_per_step"] = results["paper"]["median_step_time"]
        out["paper_accuracy"] = results["paper"]["min_accuracy"]
        out["paper_over_vanilla"] = out["paper_s_per_step"] / base
        out["paper_sync_s_per_step"] = results["paper_sync"]["median_step_time"]
        out["paper_sync_accuracy"] = results["paper_sync"]["min_accuracy"]
    out["byzsgd_over_vanilla"] = out["byzsgd_s_per_step"] / base
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
