#!/usr/bin/env python3
"""Training throughput, side by side in one run: vanilla vs ByzSGD (vs paper mode).

(a) vanilla: 1 PS, ``average``, 7 workers, fw=0;
(b) byzsgd:  4 PS fps=1, 7 workers fw=1, ``median`` (the default, Garfield's mode);
(c) paper:   4 PS fps=1, 7 workers fw=1 in ``--mode paper`` (its default rule, ``mda``;
             the diameter measured at every gather, as by default);
(d) paper_sync: the same with ``--sync true`` (one filtered pull per worker and step)
(skip (c) and (d) with --no-paper).  ``--gather_periods 1,10,auto`` adds paper and
paper_sync rows per gather period T (``paper_T10``, ``paper_sync_Tauto``, ...; T = 1 is the
plain ``paper`` / ``paper_sync`` rows): the paper's throughput overhead over vanilla SGD
(El-Mhamdi et al. report 28-220 % asynchronous, 24-176 % synchronous).
MNIST convnet, batch 32, SGD lr 0.1 (Garfield's configuration), 200 steps each, every node a
process on this machine.  Reports the median step time after warm-up, the lowest final test
accuracy among the correct PSes and the **convergence overhead**: the steps a deployment
needs to reach a target accuracy (lowest correct PS, evaluated every ``--eval_every`` steps
on ``--eval_samples`` test images) over the steps vanilla needs (the paper reports about
32 %).  The target is vanilla's accuracy at three quarters of the run, so that vanilla
reaches it inside the run and the others have room to (``--target`` sets it).  ``--json``: one JSON object as the last line::

    {"vanilla_s_per_step": a, "byzsgd_s_per_step": b, "byzsgd_accuracy": acc, "steps": 200,
     "paper_s_per_step": c, "paper_over_vanilla": c / a, "paper_sync_s_per_step": d, ...,
     "rows": {name: {"s_per_step", "over_vanilla", "accuracy", "steps_to_target",
                     "convergence_overhead"}}}
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
    base, _, period = name.partition("_T")
    flags = CONFIGS[base] + (["--gather_period", period] if period else [])
    cmd = [sys.executable, "-m", "byzsgd.launch", *COMMON, *flags, "--num_iter", str(steps),
           "--run_dir", str(workdir / name), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench_train: the {name} deployment failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["curve"] = lowest_correct_curve(workdir / name)
    return result


def lowest_correct_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(steps done, lowest accuracy among the correct PSes) at each evaluation."""
    from byzsgd.deploy.summary import ps_series

    by_step: dict[int, list[float]] = {}
    for series in ps_series(run_dir).values():
        for step, acc, _ in series["evals"]:
            if acc is not None:
                by_step.setdefault(step + 1, []).append(acc)
    return sorted((s, min(a)) for s, a in by_step.items())


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, a in curve if a >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-mode deployment")
    p.add_argument("--keep", default=None, help="keep run directories here")
    p.add_argument("--gather_periods", default="1",
                   help="comma-separated gather periods T for the paper rows (integers or auto)")
    p.add_argument("--eval_every", type=int, default=20, help="evaluate every N steps")
    p.add_argument("--target", type=float, default=None,
                   help="target accuracy %% of the convergence overhead (default: vanilla's at 3/4 "
                        "of the run)")
    p.add_argument("--eval_samples", type=int, default=2000,
                   help="test images per intermediate evaluation (the last is the full set)")
    args = p.parse_args(argv)
    periods = [x.strip() for x in args.gather_periods.split(",") if x.strip()]
    names = ["vanilla", "byzsgd"]
    if not args.no_paper:
        for mode in ("paper", "paper_sync"):
            names += [mode if T == "1" else f"{mode}_T{T}" for T in periods]
    extra = ["--acc_freq", str(args.eval_every), "--eval_samples", str(args.eval_samples)]
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        results = {name: run_deployment(name, args.steps, workdir, extra) for name in names}
    base = results["vanilla"]["median_step_time"]
    curve = results["vanilla"]["curve"]
    target = args.target if args.target is not None else \
        min(curve, key=lambda sa: abs(sa[0] - 0.75 * args.steps))[1]
    vanilla_steps = steps_to(results["vanilla"]["curve"], target)
    rows = {}
    print(f"{'deployment':<17} {'s/step':>8} {'x vanilla':>10} {'min acc %':>10} "
          f"{'steps to ' + format(target, '.2f') + '%':>17} {'conv. overhead':>15} {'wall s':>8}")
    for name in names:
        r = results[name]
        reached = steps_to(r["curve"], target)
        overhead = (reached / vanilla_steps - 1.0) if (reached and vanilla_steps) else None
        rows[name] = {"s_per_step": r["median_step_time"], "over_vanilla": r["median_step_time"] / base,
                      "accuracy": r["min_accuracy"], "steps_to_target": reached,
                      "convergence_overhead": overhead}
        print(f"{name:<17} {r['median_step_time']:8.4f} {r['median_step_time'] / base:10.2f} "
              f"{r['min_accuracy']:10.2f} {reached if reached else 'not reached':>17} "
              f"{format(overhead, '+.0%') if overhead is not None else '-':>15} {r['wall_time']:8.1f}")
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
    out["target_accuracy"] = target
    out["rows"] = rows
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
