#!/usr/bin/env python3
"""The acceptance of the main job's defaults: real deployments (``python -m byzsgd.launch``),
one after the other, worker and PS attacks; one JSON line per run.

Each run is the launcher with its defaults plus ``--num_iter STEPS --seed SEED`` plus the
cell's flags (``--config`` adds flags to every cell, e.g. to measure another candidate).
Per run: the lowest final accuracy among the correct PSes, and the share of the PS steps
whose gradient quorum held a Byzantine worker (from the PSes' metrics ``quorum`` field: an
attack that never reached the rule proves nothing).

    python scripts/deploy_defaults.py --out runs/defaults.jsonl              # every cell
    python scripts/deploy_defaults.py --cells none,optimal_alie --steps 300
    python scripts/deploy_defaults.py --config "--gar median --opt_args {\\"lr\\":\\"0.05\\",\\"momentum\\":\\"0.9\\"} --worker_momentum 0 --pre_agg none"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: attack arguments strong enough to bite (as scripts/bench_attacks.py): alie z = 100, ipm epsilon = 10
ATTACK_ARGS: dict[str, dict] = {"alie": {"z": 100}, "ipm": {"epsilon": 10}}
WORKER_ATTACKS = ("random", "gaussian", "reverse", "sign_flip", "drop", "alie", "ipm", "empire", "inf",
                  "nan", "mimic", "label_flip", "optimal_alie", "optimal_ipm", "silent")
PS_ATTACKS = ("random", "reverse", "drop", "nan", "equivocate", "stale", "silent", "delay", "crash")
#: the default cell list: every worker attack at fw=1, the collude variants, the strongest at fw=2,
#: every PS attack
DEFAULT_CELLS = (["none"] + list(WORKER_ATTACKS) + ["optimal_alie+collude", "alie+collude"]
                 + [f"fw2:{a}" for a in ("optimal_alie", "optimal_ipm", "alie", "ipm", "empire",
                                         "optimal_alie+collude")]
                 + [f"ps:{a}" for a in PS_ATTACKS])


def cell_flags(cell: str) -> list[str]:
    """Launcher flags of one cell: ``none``, ``ATTACK``, ``ATTACK+collude``, ``fw2:ATTACK[+collude]``
    (two Byzantine workers of seven, ``--fw 2``) or ``ps:ATTACK`` (one Byzantine PS)."""
    if cell == "none":
        return []
    if cell.startswith("ps:"):
        attack = cell[3:]
        if attack not in PS_ATTACKS:
            raise SystemExit(f"unknown PS attack in cell {cell!r}; known: {', '.join(PS_ATTACKS)}")
        return ["--byz_ps", "1", "--ps_attack", attack]
    fw = 1
    if cell.startswith("fw2:"):
        fw, cell = 2, cell[4:]
    attack, _, variant = cell.partition("+")
    if attack not in WORKER_ATTACKS or variant not in ("", "collude"):
        raise SystemExit(f"unknown worker cell {cell!r}; attacks: {', '.join(WORKER_ATTACKS)} "
                         "(optionally +collude, fw2: prefix)")
    args = dict(ATTACK_ARGS.get(attack, {}))
    if variant:
        args["collude"] = True
    flags = (["--fw", "2"] if fw == 2 else []) + ["--byz_workers", str(fw), "--worker_attack", attack]
    return flags + (["--worker_attack_args", json.dumps(args)] if args else [])


def quorum_share(run_dir: Path, byzantine: set[int]) -> float | None:
    """Share of the correct PSes' step records whose quorum held a Byzantine worker."""
    hits = total = 0
    for path in sorted(run_dir.glob("metrics-ps*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "quorum" in rec:
                total += 1
                hits += bool(byzantine & set(rec["quorum"]))
    return hits / total if total else None


def table(lines: list[dict]) -> str:
    """A markdown table of JSON lines written by this script (``--table FILE``): one row per cell,
    its accuracy against the no-attack cell of the same length and seed."""
    none = {(r["steps"], r["seed"], r["config"]): r.get("min_accuracy") for r in lines if r["cell"] == "none"}
    out = ["| cell | steps | min accuracy (%) | vs none (points) | Byz. in quorum (ps: of the gathers) | outcome | wall (s) |",
           "|---|---:|---:|---:|---:|---|---:|"]
    for r in lines:
        acc, base = r.get("min_accuracy"), none.get((r["steps"], r["seed"], r["config"]))
        delta = f"{acc - base:+.2f}" if acc is not None and base is not None and r["cell"] != "none" else ""
        share = r.get("byzantine_in_model_quorum", r.get("byzantine_in_quorum"))
        out.append(f"| {r['cell']} | {r['steps']} | {acc if acc is not None else 'failed'} | {delta} | "
                   f"{'' if share is None else f'{share:.2f}'} | {r.get('outcome', r.get('error', ''))} | "
                   f"{r['wall_s']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                    help="comma-separated cells (default: all): " + cell_flags.__doc__.split(":", 1)[1].strip())
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="", help="flags added to every cell (a candidate)")
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--table", default=None, metavar="FILE", help="print the markdown table of FILE's lines and exit")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for cell in args.cells.split(","):
        flags = shlex.split(args.config) + cell_flags(cell)
        with tempfile.TemporaryDirectory(prefix="byzsgd-defaults-") as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "byzsgd.launch", "--num_iter", str(args.steps), "--seed",
                   str(args.seed), "--acc_freq", str(args.steps), "--quiet", "--json",
                   "--run_dir", str(run_dir), "--timeout", str(args.timeout)] + flags
            started = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
            row = {"cell": cell, "steps": args.steps, "seed": args.seed, "config": args.config,
                   "rc": res.returncode, "wall_s": round(time.time() - started, 1)}
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
                byz = set(summary.get("byzantine_ranks", []))
                row.update(min_accuracy=summary.get("min_accuracy"), outcome=summary.get("outcome"),
                           byzantine_ranks=sorted(byz), byzantine_in_quorum=quorum_share(run_dir, byz))
                if cell.startswith("ps:"):  # a PS attack reaches the rule through the gathers
                    models = summary.get("model_quorum_share") or {}
                    row["byzantine_in_model_quorum"] = max((models.get(str(r), 0.0) for r in byz), default=None)
            except (OSError, ValueError) as exc:
                row.update(error=str(exc), tail=(res.stdout + res.stderr)[-800:])
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
