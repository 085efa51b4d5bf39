#!/usr/bin/env python3
"""The acceptance of the main job's defaults: real deployments (``python -m byzsgd.launch``),
one after the other, worker and PS attacks; one JSON line per run.

Each run is the launcher with its defaults plus ``--num_iter STEPS --seed SEED`` plus the
cell's flags (``--config`` adds flags to every cell, e.g. to measure another candidate).
Per run: the lowest final accuracy among the correct PSes, and how often the Byzantine workers
reached the rule (from the PSes' metrics ``quorum`` field: an attack that never reached the rule
proves nothing).  Each JSON line has ``attack`` (the cell without its ``fw2:`` prefix), ``fw``,
``seed``, ``steps``, ``min_accuracy``, ``schedule`` and

* ``byz_share``: over the gradient phases of the correct PSes (every step record with a
  ``quorum``, all correct PSes pooled) at which a Byzantine worker was still eligible (not banned
  by ``--check_gradients`` at an earlier step), the share whose quorum held **every** eligible
  Byzantine worker (:func:`byzsgd.roles.adversary_schedule.byzantine_in_quorums`);
  ``byz_share_min``: the same share at the correct PS where it is lowest; ``byz_steps``: how many
  gradient phases that is (pooled; None without a Byzantine worker);
* ``byzantine_in_quorum``: the share of all PSes' step records whose quorum held **a**
  Byzantine worker (the older, weaker figure).

``--schedule adversarial`` runs the worker-attack cells under the launcher's test harness that
plays the network adversary (``python -m byzsgd.launch --schedule adversarial``): the
Byzantine workers are in every quorum (byz_share >= 0.95 expected) and forge from the quorum's
honest gradients, leaked to them.  ``none`` and ``ps:`` cells run without it (nothing to order).

    python scripts/deploy_defaults.py --out runs/defaults.jsonl              # every cell
    python scripts/deploy_defaults.py --cells none,optimal_alie --steps 300
    python scripts/deploy_defaults.py --schedule adversarial --seeds 0,1 --cells fw2:none,fw2:minmax+mom
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
                  "nan", "mimic", "label_flip", "optimal_alie", "optimal_ipm", "silent", "minmax", "minsum",
                  "fang", "stealth")
#: cell variants: the attack arguments they add
VARIANTS = {"": {}, "collude": {"collude": True}, "mom": {"momentum_aware": True, "collude": True}}
PS_ATTACKS = ("random", "reverse", "drop", "nan", "equivocate", "stale", "silent", "delay", "crash")
#: the default cell list: every worker attack at fw=1, the collude variants, the strongest at fw=2,
#: every PS attack
DEFAULT_CELLS = (["none"] + list(WORKER_ATTACKS) + ["optimal_alie+collude", "alie+collude"]
                 + [f"fw2:{a}" for a in ("none", "optimal_alie", "optimal_ipm", "alie", "ipm", "empire",
                                         "optimal_alie+collude", "minmax", "minmax+mom", "minsum+mom",
                                         "fang+mom", "stealth")]
                 + [f"ps:{a}" for a in PS_ATTACKS])


def split_cell(cell: str) -> tuple[str, int]:
    """(attack label, fw) of a cell: ``fw2:minmax+mom`` -> (``minmax+mom``, 2)."""
    return (cell[4:], 2) if cell.startswith("fw2:") else (cell, 1)


def cell_flags(cell: str, schedule: str = "none") -> list[str]:
    """Launcher flags of one cell: ``none``, ``ATTACK``, ``ATTACK+collude``, ``ATTACK+mom``
    (momentum-aware: attack_args momentum_aware and collude true), each optionally with the
    ``fw2:`` prefix (two Byzantine workers of seven, ``--fw 2``), or ``ps:ATTACK`` (one Byzantine
    PS)."""
    # ``schedule``: the launcher's --schedule, for the worker-attack cells only
    if cell.startswith("ps:"):
        attack = cell[3:]
        if attack not in PS_ATTACKS:
            raise SystemExit(f"unknown PS attack in cell {cell!r}; known: {', '.join(PS_ATTACKS)}")
        return ["--byz_ps", "1", "--ps_attack", attack]
    label, fw = split_cell(cell)
    fw_flags = ["--fw", "2"] if fw == 2 else []
    if label == "none":
        return fw_flags
    attack, _, variant = label.partition("+")
    if attack not in WORKER_ATTACKS or variant not in VARIANTS:
        raise SystemExit(f"unknown worker cell {cell!r}; attacks: {', '.join(WORKER_ATTACKS)} "
                         f"(optionally +{', +'.join(v for v in VARIANTS if v)}; fw2: prefix)")
    args = {**ATTACK_ARGS.get(attack, {}), **VARIANTS[variant]}
    flags = fw_flags + ["--byz_workers", str(fw), "--worker_attack", attack]
    if schedule != "none":
        flags += ["--schedule", schedule]
    return flags + (["--worker_attack_args", json.dumps(args)] if args else [])


def byz_shares(run_dir: Path, summary: dict) -> tuple[float | None, float | None, int | None]:
    """(pooled share, lowest per correct PS, gradient phases counted) of the correct PSes'
    gradient phases whose quorum held every eligible Byzantine worker (see the module
    docstring); Nones without one."""
    sys.path.insert(0, str(ROOT))
    from byzsgd.deploy.summary import ps_series
    from byzsgd.metrics import read_metrics
    from byzsgd.roles.adversary_schedule import byzantine_in_quorums

    workers = {int(r) for r in summary.get("quorum_share", {})}
    byz = set(summary.get("byzantine_ranks", [])) & workers
    if not byz:
        return None, None, None
    counts = [byzantine_in_quorums(read_metrics(s["metrics"]), byz) for s in ps_series(run_dir).values()]
    counts = [(hits, n) for hits, n in counts if n]
    total = sum(n for _, n in counts)
    if not total:
        return None, None, 0
    pooled = sum(h for h, _ in counts) / total
    return round(pooled, 4), round(min(h / n for h, n in counts), 4), total


def quorum_share(run_dir: Path, byzantine: set[int]) -> float | None:
    """Share of the PSes' step records whose quorum held a Byzantine worker."""
    hits = total = 0
    for path in sorted(run_dir.glob("metrics-ps*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "quorum" in rec:
                total += 1
                hits += bool(byzantine & set(rec["quorum"]))
    return hits / total if total else None


def table(lines: list[dict]) -> str:
    """A markdown table of JSON lines written by this script (``--table FILE``): one row per run,
    its accuracy against the no-attack run of the same length, seed, configuration and fw (fw = 1's
    when there is none at that fw)."""
    def key(r: dict, fw: int) -> tuple:
        return r["steps"], r["seed"], r["config"], fw

    def fw_of(r: dict) -> int:
        return int(r.get("fw", split_cell(r["cell"])[1]))

    none = {key(r, fw_of(r)): r.get("min_accuracy") for r in lines
            if r.get("attack", split_cell(r["cell"])[0]) == "none"}
    out = ["| cell | schedule | steps | seed | min accuracy (%) | vs none (points) | Byz. share | outcome | wall (s) |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in lines:
        acc = r.get("min_accuracy")
        base = none.get(key(r, fw_of(r)), none.get(key(r, 1)))
        delta = f"{acc - base:+.2f}" if acc is not None and base is not None and r["cell"] not in ("none", "fw2:none") else ""
        # ps: cells: the share of the gathers that used the Byzantine PS's model; worker cells:
        # every Byzantine worker in the quorum (byz_share), or older lines' "any of them"
        share = r.get("byzantine_in_model_quorum", r.get("byz_share", r.get("byzantine_in_quorum")))
        out.append(f"| {r['cell']} | {r.get('schedule', 'none')} | {r['steps']} | {r['seed']} | "
                   f"{acc if acc is not None else 'failed'} | "
                   f"{delta} | {'' if share is None else f'{share:.2f}'} | "
                   f"{r.get('outcome', r.get('error', ''))} | {r['wall_s']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                    help="comma-separated cells (default: all): " + cell_flags.__doc__.split(":", 1)[1].strip())
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, each cell run once per seed "
                    "(overrides --seed)")
    ap.add_argument("--schedule", default="none", choices=("none", "adversarial"),
                    help="adversarial: the worker-attack cells run under the launcher's test harness "
                    "that puts the Byzantine workers in every quorum (--schedule adversarial)")
    ap.add_argument("--config", default="", help="flags added to every cell (a candidate)")
    ap.add_argument("--out", default=None, help="append JSON lines here too")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--table", default=None, metavar="FILE", help="print the markdown table of FILE's lines and exit")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    runs = [(cell, seed) for cell in args.cells.split(",") for seed in seeds]
    for cell, seed in runs:
        flags = shlex.split(args.config) + cell_flags(cell, args.schedule)
        attack, fw = split_cell(cell)
        with tempfile.TemporaryDirectory(prefix="byzsgd-defaults-") as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "byzsgd.launch", "--num_iter", str(args.steps), "--seed",
                   str(seed), "--acc_freq", str(args.steps), "--quiet", "--json",
                   "--run_dir", str(run_dir), "--timeout", str(args.timeout)] + flags
            started = time.time()
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
            row = {"cell": cell, "attack": attack, "fw": fw, "steps": args.steps, "seed": seed,
                   "config": args.config, "schedule": args.schedule if "--schedule" in flags else "none",
                   "rc": res.returncode, "wall_s": round(time.time() - started, 1)}
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
                byz = set(summary.get("byzantine_ranks", []))
                share, share_min, share_steps = byz_shares(run_dir, summary)
                row.update(min_accuracy=summary.get("min_accuracy"), outcome=summary.get("outcome"),
                           byzantine_ranks=sorted(byz), byz_share=share, byz_share_min=share_min,
                           byz_steps=share_steps,
                           byzantine_in_quorum=quorum_share(run_dir, byz))
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
