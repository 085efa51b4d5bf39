"""Plots of an experiment grid: ``python -m byzsgd.report RESULTS [--out DIR]``.

Reads the results file of :mod:`byzsgd.experiments.grid` (:mod:`byzsgd.experiments.results`) (the last line of each cell) and the
cells' metrics files, and writes into ``--out`` (default: the results file's directory):

* ``accuracy_vs_step.png`` / ``accuracy_vs_time.png``: test accuracy (min over the correct
  PSes) against the step and against the wall time since the deployment started, one panel
  per rule, one line per attack (and seed);
* ``heatmap.png``: rule x attack, final accuracy (min over the correct PSes; mean over seeds
  when the grid has several); a failed cell is grey and marked ``fail``.  When other fields
  vary too (fw, mode, ...), one ``heatmap-<field=value...>.png`` per combination;
* ``worst_case.png`` + ``worst_case.md``: per rule, the worst final accuracy over the attacks
  ("none" excluded when there are attacks; a failed cell counts as 0 %), with the full
  rule x attack table in markdown.

The rule is ``gar``; the attack is ``worker_attack`` and/or ``ps:<ps_attack>``, with their
arguments whenever a cell gives some (an attack's strength is part of what it is:
``alie{"z":100}``).  Matplotlib runs headless (Agg).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.deploy.rundir import ps_series
from byzsgd.experiments.results import read_results

#: fields that are the heatmap's axes (or are averaged over): everything else is a facet
_RULE = "gar"
_ATTACK_FIELDS = ("worker_attack", "worker_attack_args", "ps_attack", "ps_attack_args",
                  "byz_workers", "byz_ps")
_AVERAGED = ("seed",)


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("byzsgd.report needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def attack_label(cell: dict, varying: set[str]) -> str:
    parts = []
    w = cell.get("worker_attack", "none") or "none"
    p = cell.get("ps_attack", "none") or "none"
    if w != "none":
        args = cell.get("worker_attack_args")
        parts.append(w + (_short(args) if args else ""))  # an attack's strength is part of its name
    if p != "none":
        args = cell.get("ps_attack_args")
        parts.append("ps:" + p + (_short(args) if args else ""))
    return "+".join(parts) or "none"


def rule_label(cell: dict) -> str:
    return str(cell.get(_RULE, "?"))


def facet_of(record: dict) -> tuple[tuple[str, str], ...]:
    axes = record.get("axes") or {}
    return tuple((k, _short(v)) for k, v in axes.items()
                 if k != _RULE and k not in _ATTACK_FIELDS and k not in _AVERAGED)


def _ok_accuracy(record: dict) -> float | None:
    acc = record.get("final_accuracy")
    if record.get("outcome") != "ok" or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        return None
    return float(acc)


class Table:
    """rule x attack -> mean final accuracy over seeds (None: every seed failed)."""

    def __init__(self, records: list[dict]):
        varying = set()
        for r in records:
            varying |= set((r.get("axes") or {}).keys())
        self.rules: list[str] = []
        self.attacks: list[str] = []
        cells: dict[tuple[str, str], list[float | None]] = OrderedDict()
        for r in records:
            cell = r.get("cell") or {}
            rule, attack = rule_label(cell), attack_label(cell, varying)
            if rule not in self.rules:
                self.rules.append(rule)
            if attack not in self.attacks:
                self.attacks.append(attack)
            cells.setdefault((rule, attack), []).append(_ok_accuracy(r))
        if "none" in self.attacks:  # the clean baseline first
            self.attacks.remove("none")
            self.attacks.insert(0, "none")
        self.cells = cells

    def value(self, rule: str, attack: str) -> float | None:
        vals = [v for v in self.cells.get((rule, attack), []) if v is not None]
        return sum(vals) / len(vals) if vals else None

    def present(self, rule: str, attack: str) -> bool:
        return (rule, attack) in self.cells

    def worst(self, rule: str) -> tuple[float | None, str | None]:
        attacks = [a for a in self.attacks if a != "none"] or list(self.attacks)
        worst, which = None, None
        for a in attacks:
            if not self.present(rule, a):
                continue
            v = self.value(rule, a)
            v = 0.0 if v is None else v  # a failed cell is the worst case
            if worst is None or v < worst:
                worst, which = v, a
        return worst, which


def _curve(record: dict) -> tuple[list[int], list[float], list[float]]:
    """(steps, min accuracy over correct PSes, seconds since start) at the evaluation steps."""
    run_dir = record.get("run_dir")
    if not run_dir or not Path(run_dir).exists():
        return [], [], []
    series = ps_series(run_dir)
    per_step: dict[int, list[tuple[float | None, float | None]]] = {}
    for s in series.values():
        for step, acc, t in s["evals"]:
            per_step.setdefault(step, []).append((acc, t))
    steps, accs, times = [], [], []
    for step in sorted(per_step):
        vals = per_step[step]
        if len(vals) != len(series) or any(a is None for a, _ in vals):
            continue
        steps.append(step + 1)
        accs.append(min(a for a, _ in vals))
        ts = [t for _, t in vals if t is not None]
        times.append(max(ts) if ts else float("nan"))
    return steps, accs, times


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")[:80]


def plot_curves(plt, records: list[dict], out: Path, title: str) -> list[Path]:
    varying = set()
    for r in records:
        varying |= set((r.get("axes") or {}).keys())
    groups: dict[str, list[dict]] = OrderedDict()
    for r in records:
        facet = facet_of(r)
        name = rule_label(r.get("cell") or {}) + ("" if not facet else " | " + " ".join(
            f"{k}={v}" for k, v in facet))
        groups.setdefault(name, []).append(r)
    attacks = []
    for r in records:
        a = attack_label(r.get("cell") or {}, varying)
        if a not in attacks:
            attacks.append(a)
    cmap = plt.get_cmap("tab10")
    color = {a: cmap(i % 10) for i, a in enumerate(attacks)}
    written = []
    curves = {id(r): _curve(r) for r in records}
    for xkind, fname, xlabel in (("step", "accuracy_vs_step.png", "step"),
                                 ("time", "accuracy_vs_time.png", "wall time since start (s)")):
        n = max(1, len(groups))
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False,
                                sharey=True)
        for ax in axs.flat[n:]:
            ax.set_visible(False)
        for ax, (name, recs) in zip(axs.flat, groups.items()):
            for r in recs:
                steps, accs, times = curves[id(r)]
                if not steps:
                    continue
                label = attack_label(r.get("cell") or {}, varying)
                if "seed" in varying:
                    label += f" s{(r.get('cell') or {}).get('seed')}"
                if r.get("outcome") != "ok":
                    label += f" ({r.get('outcome')})"
                xs = steps if xkind == "step" else times
                ax.plot(xs, accs, marker="o", markersize=3, linewidth=1.5,
                        color=color[attack_label(r.get("cell") or {}, varying)], label=label)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylim(0, 100)
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        for row in axs:
            row[0].set_ylabel("test accuracy (%)\nmin over correct PSes")
        fig.suptitle(textwrap.fill(f"{title}: accuracy vs {xkind}", int(4.6 * ncols * 11)), fontsize=11)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_heatmap(plt, table: Table, path: Path, title: str) -> Path:
    import numpy as np

    data = np.full((len(table.rules), len(table.attacks)), np.nan)
    for i, rule in enumerate(table.rules):
        for j, attack in enumerate(table.attacks):
            v = table.value(rule, attack)
            if v is not None:
                data[i, j] = v
    width = max(5.5, 1.3 * len(table.attacks) + 2.6)
    fig, ax = plt.subplots(figsize=(width, 0.6 * len(table.rules) + 2.0))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#bbbbbb")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(table.attacks)), table.attacks, rotation=30, ha="right")
    ax.set_yticks(range(len(table.rules)), table.rules)
    ax.set_xlabel("worker / PS attack")
    ax.set_ylabel("aggregation rule")
    for i, rule in enumerate(table.rules):
        for j, attack in enumerate(table.attacks):
            if not table.present(rule, attack):
                text = ""
            elif math.isnan(data[i, j]):
                text = "fail"
            else:
                text = f"{data[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="black" if math.isnan(data[i, j]) or 25 < data[i, j] < 85 else "white")
    fig.colorbar(im, ax=ax, label="final test accuracy (%)")
    ax.set_title(textwrap.fill(title, int(width * 9)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_worst_case(plt, table: Table, path: Path, title: str) -> Path:
    rules = table.rules
    worst = [table.worst(r) for r in rules]
    values = [w[0] if w[0] is not None else 0.0 for w in worst]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rules) + 1.5), 3.6))
    bars = ax.bar(range(len(rules)), values, color=plt.get_cmap("RdYlGn")([v / 100 for v in values]),
                  edgecolor="black")
    for b, rule, (v, which) in zip(bars, rules, worst):
        failed = which is not None and table.value(rule, which) is None
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1.5,
                ("fail" if failed else f"{(v or 0):.1f}") + f"\n{which or ''}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rules)), rules)
    ax.set_ylim(0, 115)
    ax.set_ylabel("worst-case final accuracy (%)")
    ax.set_title(textwrap.fill(title, int(max(4.0, 1.1 * len(rules) + 1.5) * 9)), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def worst_case_markdown(table: Table, title: str) -> str:
    def fmt(v):
        return "fail" if v is None else f"{v:.2f}"

    attacks = table.attacks
    lines = [f"# {title}", "",
             "Final test accuracy (%) of the correct parameter servers (min over them; mean over "
             "seeds), per aggregation rule and attack. Worst case: the minimum over the attacks "
             "(\"none\" excluded when attacks exist; a failed cell counts as 0).", "",
             "| rule | worst case | worst attack | " + " | ".join(attacks) + " |",
             "|---|---:|---|" + "---:|" * len(attacks)]
    for rule in table.rules:
        worst, which = table.worst(rule)
        row = [rule, fmt(worst), which or "-"]
        row += [fmt(table.value(rule, a)) if table.present(rule, a) else "-" for a in attacks]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def make_report(results: str | os.PathLike, out: str | os.PathLike | None = None, *,
                title: str | None = None) -> list[Path]:
    results = Path(results)
    if not results.exists():
        raise ConfigError(f"no results file {results}")
    records = read_results(results)
    if not records:
        raise ConfigError(f"{results} holds no cell results")
    out = Path(out) if out else results.parent
    out.mkdir(parents=True, exist_ok=True)
    title = title or str(records[0].get("experiment") or results.stem)
    plt = _matplotlib()
    written = plot_curves(plt, records, out, title)
    facets: dict[tuple, list[dict]] = OrderedDict()
    for r in records:
        facets.setdefault(facet_of(r), []).append(r)
    md = []
    for facet, recs in facets.items():
        suffix = "" if len(facets) == 1 else "-" + _slug("_".join(f"{k}={v}" for k, v in facet))
        ftitle = title + ("" if not facet else " (" + ", ".join(f"{k}={v}" for k, v in facet) + ")")
        table = Table(recs)
        written.append(plot_heatmap(plt, table, out / f"heatmap{suffix}.png",
                                    f"{ftitle}: final accuracy (min over correct PSes)"))
        written.append(plot_worst_case(plt, table, out / f"worst_case{suffix}.png",
                                       f"{ftitle}: worst case over attacks"))
        md.append(worst_case_markdown(table, ftitle))
    md_path = out / "worst_case.md"
    md_path.write_text("\n".join(md))
    written.append(md_path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m byzsgd.report",
                                description="Plots (PNG) and a worst-case table of an experiment's results.")
    p.add_argument("results", help="results file written by python -m byzsgd.experiment")
    p.add_argument("--out", default=None, help="output directory (default: the results file's)")
    p.add_argument("--title", default=None, help="title of the plots (default: the experiment name)")
    args = p.parse_args(argv)
    try:
        written = make_report(args.results, args.out, title=args.title)
    except ByzSGDError as exc:
        print(f"byzsgd.report: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
