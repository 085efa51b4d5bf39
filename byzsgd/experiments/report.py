"""Plots of an experiment grid: ``python -m byzsgd.report RESULTS [--out DIR]``.

Reads the results file of :mod:`byzsgd.experiments.grid` (:mod:`byzsgd.experiments.results`) (the last line of each cell) and the
cells' metrics files, and writes into ``--out`` (default: the results file's directory):

* ``accuracy_vs_step.png`` / ``accuracy_vs_time.png``: test accuracy (min over the correct
  PSes) against the step and against the wall time since the deployment started, one panel
  per rule, one line per attack (and seed);
* ``heatmap.png``: rule x attack, final accuracy (min over the correct PSes; mean over seeds,
  with ``±`` half their range and ``n=`` the seeds that finished, ``n=1/2`` when one failed); a
  cell with no finished seed is grey and marked ``fail``.  When other fields vary too (fw,
  mode, ...), one ``heatmap-<field=value...>.png`` per combination;
* ``worst_case.png`` + ``worst_case.md``: per rule, the worst final accuracy over the attacks
  ("none" excluded when there are attacks; a failed cell counts as 0 %; error bars: the seeds'
  range), with the full rule x attack table in markdown and, under it, what is missing: each
  seed that did not finish, its outcome and why (exit code, the run's own summary).

Every title says what was run: steps, n_ps (fps), n_w (fw), the Byzantine nodes (f), mode and
rule; seeds of one attack share its colour and differ in line style and marker.

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
from byzsgd.deploy.summary import outcome_line, ps_series
from byzsgd.experiments.results import read_results

#: fields that are the heatmap's axes (or are averaged over): everything else is a facet
_RULE = "gar"
_ATTACK_FIELDS = ("worker_attack", "worker_attack_args", "ps_attack", "ps_attack_args",
                  "byz_workers", "byz_ps")
_AVERAGED = ("seed",)
#: the seeds of one attack: its colour, each seed its own line style and marker
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


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


class Stat(tuple):
    """One cell over its seeds: ``(mean, half range, seeds finished, seeds run, min, max)``."""

    mean = property(lambda self: self[0])
    spread = property(lambda self: self[1])
    n_ok = property(lambda self: self[2])
    n = property(lambda self: self[3])

    def text(self, digits: int = 2) -> str:
        """``83.12 ±4.16 (n=2)``, ``96.00 (n=1)``, ``78.96 (n=1/2)``, ``fail (n=0/2)``."""
        if self.mean is None:
            return f"fail (n=0/{self.n})"
        count = f"n={self.n_ok}" if self.n_ok == self.n else f"n={self.n_ok}/{self.n}"
        spread = f" ±{self.spread:.{digits}f}" if self.n_ok > 1 else ""
        return f"{self.mean:.{digits}f}{spread} ({count})"


class Table:
    """rule x attack -> the cell's seeds: mean final accuracy (None: every seed failed), spread
    and counts (:meth:`stat`)."""

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
        return self.stat(rule, attack).mean

    def stat(self, rule: str, attack: str) -> Stat:
        """Mean, half the range over the seeds that finished, how many finished of how many."""
        runs = self.cells.get((rule, attack), [])
        vals = [v for v in runs if v is not None]
        if not vals:
            return Stat((None, None, 0, len(runs), None, None))
        return Stat((sum(vals) / len(vals), (max(vals) - min(vals)) / 2, len(vals), len(runs),
                     min(vals), max(vals)))

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
    seeds = []
    for r in records:
        seed = (r.get("cell") or {}).get("seed")
        if seed not in seeds:
            seeds.append(seed)
    style = {seed: (_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)])
             for i, seed in enumerate(seeds)}  # one attack's seeds: its colour, their own style
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
                linestyle, marker = style[(r.get("cell") or {}).get("seed")]
                ax.plot(xs, accs, marker=marker, markersize=3.5, linewidth=1.5, linestyle=linestyle,
                        color=color[attack_label(r.get("cell") or {}, varying)], label=label)
            ax.set_title(textwrap.fill(f"{name} ({run_context(recs, rule=False)})", 52), fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylim(0, 100)
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        for row in axs:
            row[0].set_ylabel("test accuracy (%)\nmin over correct PSes")
        fig.suptitle(textwrap.fill(f"{title}: accuracy vs {xkind}; {run_context(records)}",
                                   int(4.6 * ncols * 11)), fontsize=10)
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
            else:
                st = table.stat(rule, attack)
                count = f"n={st.n_ok}" if st.n_ok == st.n else f"n={st.n_ok}/{st.n}"
                if st.mean is None:
                    text = f"fail\n{count}"
                else:
                    text = f"{st.mean:.1f}" + (f" ±{st.spread:.1f}" if st.n_ok > 1 else "") + f"\n{count}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
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
    stats = [table.stat(r, w[1]) if w[1] is not None else None for r, w in zip(rules, worst)]
    low = [v - st[4] if st is not None and st.mean is not None else 0.0 for v, st in zip(values, stats)]
    high = [st[5] - v if st is not None and st.mean is not None else 0.0 for v, st in zip(values, stats)]
    bars = ax.bar(range(len(rules)), values, color=plt.get_cmap("RdYlGn")([v / 100 for v in values]),
                  edgecolor="black", yerr=[low, high], capsize=4, error_kw={"elinewidth": 1})
    for b, rule, (v, which), st, up in zip(bars, rules, worst, stats, high):
        failed = which is not None and table.value(rule, which) is None
        count = "" if st is None else (f" n={st.n_ok}" if st.n_ok == st.n else f" n={st.n_ok}/{st.n}")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + up + 1.5,
                ("fail" if failed else f"{(v or 0):.1f}") + (f" ±{st.spread:.1f}" if st and st.n_ok > 1 else "")
                + f"{count}\n{which or ''}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rules)), rules)
    ax.set_ylim(0, 115)
    ax.set_ylabel("worst-case final accuracy (%)")
    ax.set_title(textwrap.fill(title, int(max(4.0, 1.1 * len(rules) + 1.5) * 9)), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def worst_case_markdown(table: Table, title: str, records: list[dict] | None = None) -> str:
    attacks = table.attacks
    lines = [f"# {title}", ""]
    if records:
        lines += [f"Runs: {run_context(records)}.", ""]
    lines += ["Final test accuracy (%) of the correct parameter servers (min over them; mean over "
              "seeds ± half their range, n = seeds that finished, n=k/m when some did not), per "
              "aggregation rule and attack. Worst case: the minimum over the attacks (\"none\" "
              "excluded when attacks exist; a failed cell counts as 0).", "",
              "| rule | worst case | worst attack | " + " | ".join(attacks) + " |",
              "|---|---:|---|" + "---:|" * len(attacks)]
    for rule in table.rules:
        worst, which = table.worst(rule)
        st = table.stat(rule, which) if which is not None else None
        row = [rule, "fail" if worst is None else (f"{worst:.2f}" if st is None or st.mean is None
                                                    else st.text()), which or "-"]
        row += [table.stat(rule, a).text() if table.present(rule, a) else "-" for a in attacks]
        lines.append("| " + " | ".join(row) + " |")
    missing = missing_runs(records or [])
    if missing:
        lines += ["", f"Missing ({len(missing)} of {len(records)} runs did not finish):", ""]
        lines += [f"- {m}" for m in missing]
    return "\n".join(lines) + "\n"


#: what a title says about the runs: (label, fields of the cell, LaunchConfig's default)
_CONTEXT = (("steps", ("num_iter",)), ("n_ps", ("num_ps",)), ("fps", ("fps",)),
            ("n_w", ("num_workers",)), ("fw", ("fw",)), ("f", ("byz_workers", "byz_ps")),
            ("mode", ("mode",)), ("rule", ("gar",)))


def _values(records: list[dict], field: str) -> list:
    out = []
    for r in records:
        v = (r.get("cell") or {}).get(field)
        if v is not None and v not in out:
            out.append(v)
    return out


def run_context(records: list[dict], *, rule: bool = True) -> str:
    """``steps 200, n_ps 4, fps 1, n_w 6, fw 1, f 1 worker + 0 PS, mode garfield, rule median``:
    what the records ran, a field that varies as its values (``fw 1|2``); fields the cells do
    not record are left out."""
    parts = []
    for label, fields in _CONTEXT:
        if label == "rule" and not rule:
            continue
        if label == "f":
            w, p = _values(records, "byz_workers"), _values(records, "byz_ps")
            if w or p:
                parts.append("f " + " + ".join(x for x in (
                    f"{'|'.join(map(str, w))} worker" if w else "",
                    f"{'|'.join(map(str, p))} PS" if p else "") if x))
            continue
        vals = _values(records, fields[0])
        if vals:
            parts.append(f"{label} {'|'.join(_short(v) for v in vals)}")
    return ", ".join(parts) or "settings not recorded"


def _why(record: dict) -> str:
    """Why a run did not finish, from its record and its run directory's summary.json."""
    out = [f"outcome {record.get('outcome') or 'not recorded'}"]
    if record.get("returncode") not in (None, 0):
        out.append(f"exit {record.get('returncode')}")
    for key in ("error", "reason"):
        if record.get(key):
            out.append(str(record[key]))
    run_dir = record.get("run_dir")
    if run_dir:
        summary = Path(run_dir) / "summary.json"
        try:
            doc = json.loads(summary.read_text())
        except (OSError, ValueError):
            doc = None
        if doc is None:
            out.append(f"no summary.json in {run_dir}" if Path(run_dir).is_dir()
                       else f"run directory {run_dir} missing")
        else:
            if doc.get("outcome_detail") is not None:  # the run's own outcome: who killed it, which rank failed
                out.append(f"run {outcome_line(doc)}")
            for key in ("failed", "killed", "reason", "error", "last_error"):
                if doc.get(key):
                    out.append(f"{key}: {_short(doc[key])}")
    elif record.get("final_accuracy") is None:
        out.append("no run directory recorded")
    return "; ".join(out)


def missing_runs(records: list[dict]) -> list[str]:
    """One line per run that gave no final accuracy: rule, attack, seed and why."""
    lines = []
    for r in records:
        if _ok_accuracy(r) is not None:
            continue
        cell = r.get("cell") or {}
        seed = cell.get("seed")
        lines.append(f"{rule_label(cell)} / {attack_label(cell, set())}"
                     f"{'' if seed is None else f' / seed {seed}'}: {_why(r)}")
    return lines


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
        context = run_context(recs)
        written.append(plot_heatmap(plt, table, out / f"heatmap{suffix}.png",
                                    f"{ftitle}: final accuracy (min over correct PSes; mean "
                                    f"± half range over seeds); {context}"))
        written.append(plot_worst_case(plt, table, out / f"worst_case{suffix}.png",
                                       f"{ftitle}: worst case over attacks (bars: the seeds' "
                                       f"range); {context}"))
        md.append(worst_case_markdown(table, ftitle, recs))
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
    missing = missing_runs(read_results(args.results))
    if missing:
        print(f"byzsgd.report: {len(missing)} run(s) did not finish (worst_case.md lists them):",
              file=sys.stderr)
        for line in missing:
            print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
