#!/usr/bin/env python3
"""Attack x rule table: final accuracy of real deployments under every attack.

Each cell is a whole local deployment (every PS and worker a process on loopback, MNIST
convnet): the lowest final test accuracy among the correct PSes.  Rows: ``none`` (no
Byzantine node), every worker attack (``fw`` Byzantine workers) and every PS attack, as
``ps:<name>`` (``fps`` Byzantine PSes).  Columns: the aggregation rules, applied to gradients
and models alike as in Garfield; a rule that cannot aggregate q_ps models with fps
Byzantine (Krum needs 2f+3) aggregates the models with the coordinate-wise median instead,
and the table marks it with ``*``.

``--json``: one JSON object as the last line, ``{"none": {"median": 97.1, ...}, "alie": {...},
"ps:equivocate": {...}, ...}`` (``null`` where a deployment failed).  The default grid
(4 PS fps=1, 7 workers fw=1, 80 steps) takes about 20-25 minutes on 2 cores; ``--quick``
runs a smaller one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzsgd import gars  # noqa: E402
from byzsgd.errors import ByzSGDError  # noqa: E402
from byzsgd.launch import deploy  # noqa: E402
from byzsgd.roles.byzantine import PS_ATTACKS, worker_attack_names  # noqa: E402

RULES = ["average", "median", "trimmed_mean", "krum", "mda"]
QUICK_WORKER = ["alie", "ipm", "sign_flip", "nan", "label_flip"]
QUICK_PS = ["equivocate", "nan", "stale"]


def model_rule_for(rule: str, num_ps: int, fps: int) -> str | None:
    """None when ``rule`` can aggregate the models too; else the fallback rule."""
    q_ps = num_ps - fps
    if num_ps == 1 or q_ps >= gars.min_inputs(rule, fps):
        return None
    return "median"


def cell(args, rule: str, row: str, workdir: Path) -> dict | None:
    flags = ["--num_ps", str(args.num_ps), "--fps", str(args.fps), "--num_workers", str(args.num_workers),
             "--fw", str(args.fw), "--gar", rule, "--num_iter", str(args.steps), "--acc_freq",
             str(args.steps), "--batch", "32", "--opt_args", json.dumps({"lr": str(args.lr)}),
             "--seed", str(args.seed), "--run_dir", str(workdir / f"{row.replace(':', '_')}-{rule}"),
             "--timeout", str(args.cell_timeout)]
    fallback = model_rule_for(rule, args.num_ps, args.fps)
    if fallback:
        flags += ["--model_gar", fallback]
    if row.startswith("ps:"):
        flags += ["--byz_ps", str(args.fps), "--ps_attack", row[3:]]
    elif row != "none":
        flags += ["--byz_workers", str(args.fw), "--worker_attack", row]
    try:
        summary = deploy(flags)
    except ByzSGDError as exc:
        print(f"bench_attacks: {row} x {rule}: refused: {exc}", file=sys.stderr)
        return None
    if summary.get("outcome") != "ok":
        print(f"bench_attacks: {row} x {rule}: {summary.get('outcome')}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    p.add_argument("--quick", action="store_true",
                   help=f"rows none + {QUICK_WORKER} + ps:{QUICK_PS}, 60 steps")
    p.add_argument("--steps", type=int, default=None, help="steps per deployment (default 80; quick 60)")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated rules (columns)")
    p.add_argument("--worker_attacks", default=None, help="comma-separated worker attacks (rows)")
    p.add_argument("--ps_attacks", default=None, help="comma-separated PS attacks (rows)")
    p.add_argument("--num_ps", type=int, default=4)
    p.add_argument("--fps", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=7)
    p.add_argument("--fw", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell_timeout", type=float, default=300)
    p.add_argument("--keep", default=None, help="keep the run directories here")
    args = p.parse_args(argv)
    args.steps = args.steps or (60 if args.quick else 80)
    rules = [r for r in args.rules.split(",") if r]
    worker = (args.worker_attacks.split(",") if args.worker_attacks is not None
              else QUICK_WORKER if args.quick else [a for a in worker_attack_names() if a != "silent"])
    ps = (args.ps_attacks.split(",") if args.ps_attacks is not None
          else QUICK_PS if args.quick else list(PS_ATTACKS))
    rows = ["none"] + [w for w in worker if w] + [f"ps:{a}" for a in ps if a]
    table: dict[str, dict[str, float | None]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_attacks-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        total, done = len(rows) * len(rules), 0
        for row in rows:
            table[row] = {}
            for rule in rules:
                summary = cell(args, rule, row, workdir)
                done += 1
                acc = summary.get("min_accuracy") if summary else None
                table[row][rule] = acc
                print(f"[{done}/{total}] {row:>16} x {rule:<12} -> "
                      f"{'failed' if acc is None else f'{acc:.2f}%'} ({time.time() - started:.0f} s)",
                      file=sys.stderr, flush=True)
    marks = {r: "*" if model_rule_for(r, args.num_ps, args.fps) else "" for r in rules}
    print(f"final accuracy (%), lowest among the correct PSes; {args.num_ps} PS (fps={args.fps}), "
          f"{args.num_workers} workers (fw={args.fw}), {args.steps} steps, MNIST convnet")
    print(f"{'attack':>16} " + " ".join(f"{r + marks[r]:>13}" for r in rules))
    for row, accs in table.items():
        print(f"{row:>16} " + " ".join(f"{'fail' if a is None else f'{a:.2f}':>13}" for a in accs.values()))
    if any(marks.values()):
        print("* models aggregated with the coordinate-wise median (too few PSes for the rule)")
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
