#!/usr/bin/env python3
"""Regenerate every measurement table of README.md and docs/*.md from its committed data, or check.

    python scripts/make_docs_tables.py            # rewrite the tables in place
    python scripts/make_docs_tables.py --check    # exit 1 if a table and its data disagree

A table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; NAME is its data
file: ``docs/data/NAME.jsonl`` or ``.json``, else ``docs/NAME.jsonl``; ``FILE.KEY`` is the table
KEY of a JSON file that holds several (``{"tables": {KEY: {"provenance", "columns", "rows"}}}``).  The data's shape says
how it is drawn:

- lines of the worst-case screen or of scheduled deployments (``attack``, ``fw``): one row per
  attack, one column group per fw: mean over seeds [min-max] (seeds), the difference from no
  attack and the Byzantine share; a cell that misses the bar (1.5 points below no attack at
  fw = 1, 2.0 at fw = 2, or under 90%) is bold;
- lines of ``scripts/deploy_defaults.py`` (``cell``, ``min_accuracy``): one row per run;
- results of ``python -m byzsgd.experiment`` (``cell`` a dict, ``final_accuracy``): the rule x
  attack table of ``byzsgd.report`` (mean ± half range over seeds, seed count);
- a JSON object ``{"provenance", "columns", "rows"}``: measurements recorded by hand (a bench
  script's printout), drawn column by column: ``fmt`` is a ``str.format`` template applied to
  the row's number (to its fields when the value is an object, bold with ``"bold": true``);
  text is shown as it is, a missing value (null) as an empty cell.

``--check`` also lists tables with measurements (a cell holding only a number) that are not
between markers: every such table must come from data.
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
DATA = ROOT / "docs" / "data"
BAR = {1: 1.5, 2: 2.0}
FLOOR = 90.0
#: a table between its markers; an indented marker (a table in a list item) indents the table
_BLOCK = re.compile(r"(?P<indent>^[ \t]*)(?P<open><!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                    r"(?P<close>^[ \t]*<!-- /table:(?P=name) -->)", re.S | re.M)
#: a table cell holding a measurement: a number, maybe with %, a unit or a ratio after it
_NUMERIC_CELL = re.compile(r"\|\s*\**[-+~]?\d[\d,]*(\.\d+)?(%| ?(µs|ms|s|GB|MB|x))?( \([^|]*\))?\**\s*(?=\|)")


def documents() -> list[Path]:
    """README.md and docs/*.md (docs/design.md included: it has no generated table today)."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def data_path(name: str) -> Path:
    for path in (DATA / f"{name}.jsonl", DATA / f"{name}.json", ROOT / "docs" / f"{name}.jsonl"):
        if path.exists():
            return path
    raise SystemExit(f"make_docs_tables: no data file for table {name!r} (docs/data/{name}.jsonl "
                     f"or .json, or docs/{name}.jsonl)")


def load(name: str):
    base, dot, key = name.partition(".")
    if dot:  # FILE.KEY: the table KEY of a data file that holds several: {"tables": {KEY: {...}}}
        return load(base)["tables"][key]
    path = data_path(name)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the screen
def _acc(row: dict) -> float | None:
    v = row.get("accuracy", row.get("min_accuracy"))
    return float(v) if isinstance(v, (int, float)) else None


def screen_table(rows: list[dict]) -> str:
    """The worst-case screen's / scheduled deployments' table (see the module docstring)."""
    configs = sorted({r.get("config", "") for r in rows})
    if len(configs) > 1:  # one block of rows per configuration
        return "\n".join(f"`{c}`:\n\n" + screen_table([r for r in rows if r.get("config", "") == c])
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


# ----------------------------------------------------------------------------- deployments
def deployments_table(rows: list[dict]) -> str:
    """Lines of ``scripts/deploy_defaults.py``: one row per run, against the no-attack run of
    the same steps and configuration."""
    none = {(r["steps"], r.get("config", "")): r.get("min_accuracy") for r in rows if r["cell"] == "none"}
    out = ["| cell | steps | min accuracy (%) | vs none (points) | Byz. in quorum (ps: of the gathers) "
           "| outcome | wall (s) |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        acc = r.get("min_accuracy")
        base = none.get((r["steps"], r.get("config", "")))
        delta = f"{acc - base:+.2f}" if acc is not None and base is not None and r["cell"] != "none" else ""
        share = r.get("byzantine_in_model_quorum", r.get("byzantine_in_quorum"))
        out.append(f"| {r['cell']} | {r['steps']} | {acc if acc is not None else 'failed'} | {delta} | "
                   f"{'' if share is None else f'{share:.2f}'} | {r.get('outcome', '')} | {r['wall_s']} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- experiment grids
def grid_table(records: list[dict]) -> str:
    """Results of ``python -m byzsgd.experiment``: byzsgd.report's rule x attack table."""
    sys.path.insert(0, str(ROOT))
    from byzsgd.experiments.report import Table

    by_key: dict[str, dict] = {}
    for r in records:  # the last record of a cell wins (a re-run)
        by_key[r.get("key", json.dumps(r.get("cell"), sort_keys=True))] = r
    table = Table(list(by_key.values()))
    out = ["| rule | worst case | worst attack | " + " | ".join(table.attacks) + " |",
           "|---|---:|---|" + "---:|" * len(table.attacks)]
    for rule in table.rules:
        worst, which = table.worst(rule)
        st = table.stat(rule, which) if which is not None else None
        row = [rule, "fail" if worst is None else (st.text() if st is not None and st.mean is not None
                                                    else f"{worst:.2f}"), which or "-"]
        row += [table.stat(rule, a).text() if table.present(rule, a) else "-" for a in table.attacks]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- recorded by hand
def _cell(value, fmt: str | None) -> str:
    """A value drawn with its column's template; text as it is (``-``, ``not in 300``); an
    object's fields by name, in bold when it says ``"bold": true``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        text = (fmt or "{}").format(**value)
        return f"**{text}**" if value.get("bold") else text
    return (fmt or "{}").format(value)


def columns_table(doc: dict) -> str:
    """``{"provenance", "columns": [{"title", "key", "fmt"?, "align"?}], "rows": [{key: value}]}``."""
    cols = doc["columns"]
    out = ["| " + " | ".join(c["title"] for c in cols) + " |",
           "|" + "|".join("---:" if c.get("align") == "right" else "---" for c in cols) + "|"]
    for row in doc["rows"]:
        out.append("|" + "".join(f" {text} |" if text else " |"
                                 for text in (_cell(row.get(c["key"]), c.get("fmt")) for c in cols)))
    return "\n".join(out) + "\n"


def table(name: str) -> str:
    """The markdown of table NAME, drawn from its data (see the module docstring)."""
    data = load(name)
    if isinstance(data, dict):
        return columns_table(data)
    first = data[0] if data else {}
    if "attack" in first and "fw" in first:
        return screen_table(data)
    if isinstance(first.get("cell"), dict):
        return grid_table(data)
    if "cell" in first and "min_accuracy" in first:
        return deployments_table(data)
    raise SystemExit(f"make_docs_tables: {data_path(name)}: no known shape of data")


# ----------------------------------------------------------------------------- documents
def _indented(text: str, indent: str) -> str:
    return "".join(indent + line if line.strip() else line for line in text.splitlines(keepends=True))


def render(doc: str) -> str:
    return _BLOCK.sub(lambda m: m.group("indent") + m.group("open")
                      + _indented(table(m.group("name")), m.group("indent")) + m.group("close"), doc)


def stale_tables(doc: str) -> list[str]:
    return [m.group("name") for m in _BLOCK.finditer(doc)
            if _indented(table(m.group("name")), m.group("indent")) != m.group("body")]


def untracked_tables(doc: str) -> list[int]:
    """Line numbers of tables outside markers holding a measurement (a number alone in a cell)."""
    spans = [(m.start(), m.end()) for m in _BLOCK.finditer(doc)]
    found, offset, in_table = [], 0, False
    for number, line in enumerate(doc.splitlines(keepends=True), 1):
        starts = line.lstrip().startswith("|")
        if starts and not in_table and not any(a <= offset < b for a, b in spans):
            block = doc[offset:].split("\n\n", 1)[0]
            rows = [l.strip() for l in block.splitlines() if l.lstrip().startswith("|")][2:]
            if any(_NUMERIC_CELL.search(r) for r in rows):
                found.append(number)
        in_table = starts
        offset += len(line)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a table disagrees with its data")
    p.add_argument("--doc", action="append", default=None,
                   help="a document (repeatable; default: README.md and docs/*.md)")
    a = p.parse_args(argv)
    paths = [Path(d) for d in a.doc] if a.doc else documents()
    bad = 0
    for path in paths:
        doc = path.read_text()
        if a.check:
            stale = stale_tables(doc)
            loose = untracked_tables(doc)
            if stale:
                print(f"{path}: tables out of date with their data: {', '.join(stale)} "
                      f"(run python scripts/make_docs_tables.py)", file=sys.stderr)
            if loose:
                print(f"{path}: tables of measurements without a data file (no <!-- table:NAME --> "
                      f"markers) at line(s) {', '.join(map(str, loose))}", file=sys.stderr)
            bad += bool(stale or loose)
            continue
        new = render(doc)
        if new != doc:
            path.write_text(new)
            print(f"{path}: tables regenerated", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
