#!/usr/bin/env python3
"""Attack x rule table: final accuracy of real deployments under every attack.

Each cell is a whole local deployment (every PS and worker a process on loopback, MNIST
convnet, batch 32, SGD lr 0.05 momentum 0.9): the lowest final test accuracy among the
correct PSes.  Rows: ``none`` (no Byzantine node), every worker attack (``fw`` Byzantine
workers) and every PS attack, as ``ps:<name>`` (``fps`` Byzantine PSes).  Columns: the
aggregation rules, applied to gradients and models alike as in Garfield; a rule that cannot
aggregate q_ps models with fps Byzantine (Krum needs 2f+3) aggregates the models with the
coordinate-wise median instead, and the table marks it with ``*``.

Attack parameters (``ROW_ARGS``; ``--row_args`` overrides them), chosen so that one
Byzantine worker among 7 bites the average: ``alie`` z = 100 (the paper's z_max for n=7,
f=1 is 0.18, which moves an average by 0.03 sigma), ``ipm`` epsilon = 10 (the same as
``empire``'s default: the quorum's average then points against the honest mean), and the
``inf`` / ``nan`` rows run with ``--drop_nonfinite false`` (by default non-finite rows are left
out before any rule and cannot reach it).  Every other attack runs with its defaults; a
forging Byzantine PS sends its forged model to its peers as soon as each step starts
(``eager``, byzsgd.roles.byzantine.PSAttack), so that it is in the correct PSes' gathers.  By
construction ``sign_flip``, ``label_flip``, ``drop``, ``mimic`` and ``silent`` cannot hurt an
i.i.d. average with an honest majority (see tests/test_byzantine.py): their ``average`` cells
stay high, and that is the expected result, not a failure to attack.

``--json``: one JSON object as the last line, ``{"none": {"median": 97.1, ...}, "alie": {...},
"ps:equivocate": {...}, ...}`` (``null`` where a deployment failed).  The default grid is the
whole one -- 25 rows (none, 15 worker attacks, 9 PS attacks) x 5 rules = 125 deployments of
4 PS (fps=1) + 7 workers (fw=1) -- with **fewer steps: 30** (not the 150-200 of the tests),
so that it finishes in under 25 minutes on the 2-core machine: a deployment costs ~8 s, most
of it start-up and the final full evaluation, whatever its steps (40 steps took 24 minutes
with other jobs on the machine).  At 30 steps the no-attack accuracy is ~85-88% and a cell
is noisy by a few points: the table shows which attacks bite which rule; the tests check
the 1.5-point margins at 150 steps.  ``--quick`` runs a smaller grid.
A deployment that does not finish within ``--cell_timeout`` (default 20 s + 0.5 s a step) is
run once more (``--retries``) and marked ``~``; if it fails again its cell is ``null``.
The parent loads MNIST once before forking the nodes (they inherit it): identical results,
a few seconds less per deployment.
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

import torch  # noqa: E402

from byzsgd import data, gars  # noqa: E402
from byzsgd.errors import ByzSGDError  # noqa: E402
from byzsgd.deploy.launch import deploy  # noqa: E402
from byzsgd.roles.byzantine import PS_ATTACKS, worker_attack_names  # noqa: E402

RULES = ["average", "median", "trimmed_mean", "krum", "mda"]
QUICK_WORKER = ["alie", "ipm", "sign_flip", "nan", "label_flip"]
QUICK_PS = ["equivocate", "nan", "stale"]
DEFAULT_STEPS, QUICK_STEPS = 30, 30
OPT_ARGS = {"lr": "0.05", "momentum": "0.9"}
# per-row launcher flags: attack parameters that make one Byzantine worker in 7 bite the average
ROW_ARGS: dict[str, dict] = {"alie": {"z": 100}, "ipm": {"epsilon": 10}}
ROW_FLAGS: dict[str, list[str]] = {"inf": ["--drop_nonfinite", "false"], "nan": ["--drop_nonfinite", "false"]}


def preload() -> None:
    """Load MNIST in this process before the launcher forks the nodes from it: every node
    inherits the cached tensors instead of decoding the files again.  One intra-op thread,
    so that no OpenMP pool exists in the parent when it forks."""
    torch.set_num_threads(1)
    data.load_dataset("mnist", train=True)
    data.load_dataset("mnist", train=False)


def model_rule_for(rule: str, num_ps: int, fps: int) -> str | None:
    """None when ``rule`` can aggregate the models too; else the fallback rule."""
    q_ps = num_ps - fps
    if num_ps == 1 or q_ps >= gars.min_inputs(rule, fps):
        return None
    return "median"


def cell(args, rule: str, row: str, workdir: Path, suffix: str = "") -> tuple[float | None, str]:
    """(lowest final accuracy among the correct PSes, or None; what went wrong, or "")."""
    flags = ["--num_ps", str(args.num_ps), "--fps", str(args.fps), "--num_workers", str(args.num_workers),
             "--fw", str(args.fw), "--gar", rule, "--num_iter", str(args.steps), "--acc_freq",
             str(args.steps), "--batch", "32", "--opt_args", json.dumps(args.opt_args),
             "--seed", str(args.seed), "--run_dir", str(workdir / f"{row.replace(':', '_')}-{rule}{suffix}"),
             "--timeout", str(args.cell_timeout)]
    fallback = model_rule_for(rule, args.num_ps, args.fps)
    if fallback:
        flags += ["--model_gar", fallback]
    if row.startswith("ps:"):
        flags += ["--byz_ps", str(args.fps), "--ps_attack", row[3:]]
    elif row != "none":
        flags += ["--byz_workers", str(args.fw), "--worker_attack", row] + ROW_FLAGS.get(row, [])
    if row in args.row_args:
        flags += ["--ps_attack_args" if row.startswith("ps:") else "--worker_attack_args",
                  json.dumps(args.row_args[row])]
    try:
        summary = deploy(flags)
    except ByzSGDError as exc:
        print(f"bench_attacks: {row} x {rule}: refused: {exc}", file=sys.stderr)
        return None, "refused"
    outcome = str(summary.get("outcome"))
    if outcome == "interrupted":  # Ctrl-C or SIGTERM while the deployment ran: stop the grid
        raise KeyboardInterrupt
    if outcome != "ok":  # a correct PS that did not finish has no final accuracy: no number
        print(f"bench_attacks: {row} x {rule}: {outcome}; final accuracies "
              f"{summary.get('final_accuracy')}", file=sys.stderr)
        return None, outcome.split(":")[0]
    return summary.get("min_accuracy"), ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    p.add_argument("--quick", action="store_true",
                   help=f"rows none + {QUICK_WORKER} + ps:{QUICK_PS}, {QUICK_STEPS} steps")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per deployment (default {DEFAULT_STEPS}; quick {QUICK_STEPS})")
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated rules (columns)")
    p.add_argument("--worker_attacks", default=None, help="comma-separated worker attacks (rows)")
    p.add_argument("--ps_attacks", default=None, help="comma-separated PS attacks (rows)")
    p.add_argument("--num_ps", type=int, default=4)
    p.add_argument("--fps", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=7)
    p.add_argument("--fw", type=int, default=1)
    p.add_argument("--opt_args", type=json.loads, default=OPT_ARGS, help="optimizer arguments (JSON)")
    p.add_argument("--row_args", type=json.loads, default=None,
                   help=f"JSON {{row: attack arguments}} replacing the defaults {json.dumps(ROW_ARGS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cell_timeout", type=float, default=None,
                   help="seconds before a deployment counts as failed (default 20 + 0.5 s per step)")
    p.add_argument("--retries", type=int, default=1,
                   help="deployments rerun after a timeout (marked ~ in the table)")
    p.add_argument("--keep", default=None, help="keep the run directories here")
    args = p.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.row_args = ROW_ARGS if args.row_args is None else args.row_args
    args.cell_timeout = args.cell_timeout or 20 + 0.5 * args.steps
    rules = [r for r in args.rules.split(",") if r]
    worker = (args.worker_attacks.split(",") if args.worker_attacks is not None
              else QUICK_WORKER if args.quick else worker_attack_names())
    ps = (args.ps_attacks.split(",") if args.ps_attacks is not None
          else QUICK_PS if args.quick else list(PS_ATTACKS))
    rows = ["none"] + [w for w in worker if w] + [f"ps:{a}" for a in ps if a]
    table: dict[str, dict[str, float | None]] = {}
    notes: dict[tuple[str, str], str] = {}
    retried: list[str] = []
    started = time.time()
    preload()
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench_attacks-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        total = len(rows) * len(rules)
        try:
            grid(args, rows, rules, workdir, table, notes, retried, started, total)
        except KeyboardInterrupt:
            interrupted = True
            print("bench_attacks: interrupted; the table so far:", file=sys.stderr)
    print_table(args, rules, table, notes, retried, started)
    return 130 if interrupted else 0


def grid(args, rows, rules, workdir, table, notes, retried, started, total) -> None:
    """Run the cells row by row, filling ``table``, ``notes`` and ``retried``."""
    done = 0
    for row in rows:
        table[row] = {}
        for rule in rules:
            acc, note = cell(args, rule, row, workdir)
            for attempt in range(1, args.retries + 1):
                if note != "timeout":
                    break
                retried.append(f"{row} x {rule}")
                acc, note = cell(args, rule, row, workdir, suffix=f"-retry{attempt}")
                note = note or "~"
            done += 1
            table[row][rule] = acc
            notes[row, rule] = note
            print(f"[{done}/{total}] {row:>16} x {rule:<12} -> "
                  f"{note or 'failed' if acc is None else f'{acc:.2f}%{note}'} ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)


def print_table(args, rules, table, notes, retried, started) -> None:
    marks = {r: "*" if model_rule_for(r, args.num_ps, args.fps) else "" for r in rules}
    print(f"final accuracy (%), lowest among the correct PSes; {args.num_ps} PS (fps={args.fps}), "
          f"{args.num_workers} workers (fw={args.fw}), {args.steps} steps, MNIST convnet, "
          f"opt {json.dumps(args.opt_args)}; attack args {json.dumps(args.row_args)}; "
          f"inf/nan rows with --drop_nonfinite false")
    print(f"{'attack':>16} " + " ".join(f"{r + marks[r]:>13}" for r in rules))
    for row, accs in table.items():
        cells = [(accs.get(r), notes.get((row, r), "-")) for r in rules]  # "-": not run (interrupted)
        print(f"{row:>16} " + " ".join(f"{n or 'fail' if a is None else f'{a:.2f}{n}':>13}" for a, n in cells))
    if any(marks.values()):
        print("* models aggregated with the coordinate-wise median (too few PSes for the rule)")
    if retried:
        print(f"~ rerun after a timeout (a correct PS never finished): {', '.join(retried)}")
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    sys.exit(main())
