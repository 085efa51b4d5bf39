#!/usr/bin/env python3
"""Regenerate the tables of docs/worst_case.md from the committed JSON lines, or check them.

    python scripts/worst_case_tables.py            # rewrite the tables in place
    python scripts/worst_case_tables.py --check    # exit 1 if a table and its data disagree

Each table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in the document;
NAME is a data file under docs/data/ (``NAME.jsonl``): lines of the worst-case screen
(``python -m byzsgd.experiments.screen --out ...``) or of the scheduled deployments
(``scripts/deploy_defaults.py --schedule adversarial``).  A table has one row per attack and one
column per fw: the mean over the seeds of the final accuracy (for deployments, the lowest among
the correct PSes), its spread (min-max over seeds) and the seed count, then the difference
from the no-attack run of the same fw and the Byzantine share of the quorums.  A cell that
misses the bar (1.5 points below no attack at fw = 1, 2.0 at fw = 2, or under 90%) is bold.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "worst_case.md"
DATA = ROOT / "docs" / "data"
BAR = {1: 1.5, 2: 2.0}
FLOOR = 90.0
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def load(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _acc(row: dict) -> float | None:
    v = row.get("accuracy", row.get("min_accuracy"))
    return float(v) if isinstance(v, (int, float)) else None


def table(rows: list[dict]) -> str:
    """The markdown table of one data file (see the module docstring)."""
    configs = sorted({r.get("config", "") for r in rows})
    if len(configs) > 1:  # one block of rows per configuration
        return "\n".join(f"`{c}`:\n\n" + table([r for r in rows if r.get("config", "") == c])
                         for c in configs)
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["attack"], int(r["fw"]))].append(r)
    fws = sorted({fw for _, fw in cells})
    steps = sorted({int(r["steps"]) for r in rows})
    attacks = sorted({a for a, _ in cells}, key=lambda a: (a != "none", a))
    none = {fw: [x for x in (_acc(r) for r in cells.get(("none", fw), []) or cells.get(("none", 1), []))
                 if x is not None] for fw in fws}
    head = "| attack | " + " | ".join(f"fw = {fw}: accuracy (%) | vs none | Byz. share" for fw in fws) + " |"
    sep = "|---|" + "---:|---:|---:|" * len(fws)
    lines = [f"Steps: {', '.join(map(str, steps))}. Mean over seeds, [min-max], (seeds).", "", head, sep]
    for a in attacks:
        out = [a]
        for fw in fws:
            rs = cells.get((a, fw), [])
            accs = [x for x in (_acc(r) for r in rs) if x is not None]
            if a == "none" and not rs:
                rs = cells.get(("none", 1), [])
                accs = [x for x in (_acc(r) for r in rs) if x is not None]
            if not accs:
                out += ["failed" if rs else "", "", ""]
                continue
            mean = statistics.fmean(accs)
            spread = f" [{min(accs):.2f}-{max(accs):.2f}]" if len(accs) > 1 else ""
            text = f"{mean:.2f}{spread} ({len(accs)})"
            delta = ""
            if a != "none" and none.get(fw):
                d = mean - statistics.fmean(none[fw])
                delta = f"{d:+.2f}"
                if -d > BAR.get(fw, 2.0) or mean < FLOOR:
                    text, delta = f"**{text}**", f"**{delta}**"
            elif mean < FLOOR:
                text = f"**{text}**"
            shares = [float(r["byz_share"]) for r in rs if isinstance(r.get("byz_share"), (int, float))]
            share = f"{min(shares):.2f}" if shares and a not in ("none",) else ""
            out += [text, delta, share]
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def render(doc: str) -> str:
    def one(m: re.Match) -> str:
        return m.group(1) + table(load(m.group("name"))) + m.group(4)
    return _BLOCK.sub(one, doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a table disagrees with its data")
    p.add_argument("--doc", default=str(DOC))
    a = p.parse_args(argv)
    doc_path = Path(a.doc)
    doc = doc_path.read_text()
    new = render(doc)
    if a.check:
        if new != doc:
            names = [m.group("name") for m in _BLOCK.finditer(doc)
                     if table(load(m.group("name"))) != m.group("body")]
            print(f"{doc_path}: tables out of date with their data: {', '.join(names)} "
                  f"(run python scripts/worst_case_tables.py)", file=sys.stderr)
            return 1
        return 0
    doc_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
