#!/usr/bin/env python3
"""Run N small deployments with one crashed or silent PS and count the ones that hang.

The liveness check of issue 13 (the last-step hang): 4 PS (fps=1, one of them Byzantine:
``crash`` or ``silent``, alternately) and 7 workers (fw=1), 40 steps each, a different seed
per run.  A run *hangs* when the launcher does not see every correct PS finish within
``--bound`` seconds (it kills the deployment then), or when a correct node exits with an
error.  Prints one line per run (wall time, outcome) and ``N runs, K hangs``; exits 1 if
any run hung.

    python scripts/hang_check.py                # 30 runs x 40 steps (the full check)
    python scripts/hang_check.py -n 6 --bound 120
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(i: int, attack: str, args, run_dir: Path) -> tuple[bool, float, str]:
    """(hung, wall seconds, what happened) of run ``i``."""
    cmd = [sys.executable, "-m", "byzsgd.launch", "--num_ps", "4", "--fps", "1", "--num_workers", "7",
           "--fw", "1", "--byz_ps", "1", "--ps_attack", attack, "--num_iter", str(args.steps),
           "--seed", str(args.seed + i), "--dataset", args.dataset, "--timeout", str(args.bound),
           "--run_dir", str(run_dir), "--quiet", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.bound + 60)
    except subprocess.TimeoutExpired:
        return True, time.monotonic() - started, "launcher did not return"
    wall = time.monotonic() - started
    summary = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            summary = json.loads(line)
            break
        except ValueError:
            continue
    if summary is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return True, wall, f"no summary (exit {proc.returncode}): {tail}"
    outcome = summary.get("outcome")
    if outcome != "ok" or proc.returncode != 0:
        return True, wall, f"outcome {outcome} (exit {proc.returncode})"
    return False, wall, "ok"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=30, help="deployments to run")
    ap.add_argument("--steps", type=int, default=40, help="steps per deployment")
    ap.add_argument("--bound", type=float, default=240.0,
                    help="seconds a deployment may take before it counts as a hang")
    ap.add_argument("--attacks", default="crash,silent", help="PS attacks, used in turn")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    attacks = [a for a in args.attacks.split(",") if a]
    hangs = 0
    walls = []
    with tempfile.TemporaryDirectory(prefix="hang_check_") as tmp:
        for i in range(args.runs):
            attack = attacks[i % len(attacks)]
            hung, wall, what = one_run(i, attack, args, Path(tmp) / f"run{i}")
            hangs += hung
            walls.append(wall)
            print(f"run {i + 1}/{args.runs}: ps_attack={attack} seed={args.seed + i} "
                  f"{wall:.1f} s {'HANG: ' + what if hung else what}", flush=True)
    print(f"{args.runs} runs, {hangs} hangs; wall time min {min(walls, default=0):.1f} s, "
          f"max {max(walls, default=0):.1f} s")
    return 1 if hangs else 0


if __name__ == "__main__":
    sys.exit(main())
