#!/usr/bin/env python3
"""Each protocol attack once, from one Byzantine node: the table attack -> outcome.

    python scripts/protocol_attacks_table.py [--steps 300] [--gar median] [--only huge_step,...] [--out DIR]

4 PS (fps=1) + 7 workers (fw=1), MNIST, the launcher's default configuration otherwise; a
no-attack run of the same length and seed first.  One row per run: finished (every correct
node exited 0), the least correct-PS accuracy, refusals counted by the correct nodes (their
logs' ``closing connection ... REASON`` lines, by reason), stall warnings, the worst step time
of a correct PS, and the Byzantine node's share of the quorums it could enter (workers: the
gradient quorums; PSes: the model quorums).  ``rendezvous_lie`` needs rank 0 as a rendezvous
master, which the launcher (``--peers``) has not: it is tested on live nodes in
tests/test_protocol_attacks.py, not here.  Every run's directory stays under ``--out``.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: name -> (launcher flags making one node Byzantine with it)
CASES = {
    "none": [],
    "impersonate": ["--byz_workers", "1", "--worker_attack", "impersonate", "--worker_attack_args", '{"every": 25}'],
    "request_flood(ps)": ["--byz_ps", "1", "--ps_attack", "request_flood"],
    "request_flood(worker)": ["--byz_workers", "1", "--worker_attack", "request_flood"],
    "huge_step(ps)": ["--byz_ps", "1", "--ps_attack", "huge_step"],
    "huge_step(worker)": ["--byz_workers", "1", "--worker_attack", "huge_step"],
    "far_future": ["--byz_ps", "1", "--ps_attack", "far_future"],
    "withhold_from": ["--byz_workers", "1", "--worker_attack", "withhold_from",
                      "--worker_attack_args", '{"ranks": [0, 1]}'],
}
_CLOSING = re.compile(r"closing connection from .*?\(rank [^)]*\): (\w+):")
_SUPPRESSED = re.compile(r"suppressed (\d+) similar lines \(closing connection: (\w+)\)")
_STALL = "not reached after"


def outcome(run_dir: Path, summary: dict) -> dict:
    """What a run shows: see the module docstring."""
    from byzsgd import rundir
    from byzsgd.metrics import read_metrics
    from byzsgd.roles.protocol_attacks import parse_report

    doc = rundir.read_deployment(run_dir)
    byz = {int(r["rank"]) for r in doc["ranks"] if r.get("byzantine")}
    rejected: collections.Counter = collections.Counter()
    stalls, report = 0, None
    for r in doc["ranks"]:
        try:
            text = Path(r["log"]).read_text(errors="replace")
        except OSError:
            continue
        if int(r["rank"]) in byz:
            report = parse_report(text) or report
            continue
        rejected.update(m.group(1) for m in _CLOSING.finditer(text))
        for m in _SUPPRESSED.finditer(text):  # the node's log is rate-limited (net/ratelog.py)
            rejected[m.group(2)] += int(m.group(1))
        stalls += text.count(_STALL)
    worst, entered, possible = 0.0, 0, 0
    for r in doc["ranks"]:
        if r.get("role") != "ps" or int(r["rank"]) in byz or not r.get("metrics"):
            continue
        for rec in read_metrics(r["metrics"]):
            if "event" in rec or "step_time" not in rec:
                continue
            if rec["step"] >= 3:  # warm-up left out
                worst = max(worst, float(rec["step_time"]))
            for b in byz:
                key = "model_quorum" if b < doc["num_ps"] else "quorum"
                if isinstance(rec.get(key), list):
                    possible += 1
                    entered += b in rec[key]
    codes = summary.get("returncodes", {})
    finished = summary.get("outcome") == "ok" and all(
        v == 0 for k, v in codes.items() if int(k) not in byz)
    return dict(finished=finished, min_accuracy=summary.get("min_accuracy"), rejected=dict(rejected),
                stall_warnings=stalls, worst_step_s=round(worst, 3),
                byzantine_share=round(entered / possible, 3) if possible else None,
                attack_report=report, byzantine_ranks=sorted(byz))


def run_case(out: Path, name: str, steps: int, gar: str, extra: list[str] = ()) -> dict:
    from byzsgd.deploy.launch import deploy

    run_dir = out / f"{re.sub(r'[^a-z_]', '_', name)}-{gar}"
    flags = ["--num_iter", str(steps), "--gar", gar, "--run_dir", str(run_dir), "--acc_freq", str(max(steps // 2, 1)),
             "--step_timeout", "10", "--timeout", str(120 + 2 * steps), *CASES[name], *extra]
    summary = deploy(flags)
    return outcome(run_dir, summary)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/protocol_attacks_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gar", default="median")
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--out", type=Path, default=Path("runs") / time.strftime("protocol-attacks-%Y%m%d-%H%M%S"))
    args = p.parse_args(argv)
    names = [n for n in CASES if not args.only or n in args.only.split(",") or n == "none"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in names:
        t0 = time.time()
        rows[name] = row = run_case(args.out, name, args.steps, args.gar)
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    base = rows["none"]["min_accuracy"]
    print(f"{args.steps} steps, {args.gar}, 4 PS (fps=1) + 7 workers (fw=1), MNIST; no attack: {base}%")
    print(f"{'attack':24} {'finished':8} {'min acc':>8} {'vs none':>8} {'worst step':>10} "
          f"{'byz share':>9} {'stalls':>6}  refusals counted / attack's own counters")
    for name, r in rows.items():
        acc = r["min_accuracy"]
        diff = f"{acc - base:+.2f}" if acc is not None and base is not None else "-"
        share = "-" if r["byzantine_share"] is None else f"{r['byzantine_share']:.2f}"
        print(f"{name:24} {str(r['finished']):8} {acc if acc is not None else '-':>8} {diff:>8} "
              f"{r['worst_step_s']:>9.2f}s {share:>9} {r['stall_warnings']:>6}  {r['rejected'] or '-'}"
              f" / {r['attack_report'] or '-'}")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
