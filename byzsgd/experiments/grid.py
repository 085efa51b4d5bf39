"""Experiment grids: ``python -m byzsgd.experiment CONFIG`` (TOML, or YAML with PyYAML).

A config has two tables::

    [experiment]                 # harness options (all optional)
    name = "mnist_attacks"
    results = "runs/mnist_attacks/results.jsonl"   # JSON lines, one per finished cell
    runs_dir = "runs/mnist_attacks"                 # each cell's run directory goes below
    timeout = 900                                   # seconds per cell (0: none)
    # multi-host, through scripts/run_exp.sh instead of the local launcher (host files as in
    # scripts/servers.example; no Byzantine nodes there yet: attacks must be "none"):
    # servers = "servers"
    # workers = "workers"
    # run_exp = "scripts/run_exp.sh"

    [grid]                       # launcher fields: every flag of ``python -m byzsgd.launch``
    gar = ["average", "median"]  # a list is an axis of the grid ...
    worker_attack = ["none", "alie"]
    num_iter = 150               # ... a scalar is shared by every cell

Cells are the cartesian product of every list-valued field, in the order the fields are
written (the first list is the outermost loop).  ``worker_attack = "none"`` (or
``ps_attack = "none"``) means no Byzantine worker (PS) in that cell; with an attack,
``byz_workers`` (``byz_ps``) defaults to ``fw`` (``fps``): as many Byzantine nodes as
tolerated.  A dict value (``opt_args``, ``gar_args``, ``*_attack_args``) is a scalar; a
list of dicts is an axis.  An attack axis entry may carry its own arguments as a one-key
table, ``worker_attack = ["none", "reverse", {alie = {z = 100}}]``: that cell runs ``alie``
with ``worker_attack_args = {z = 100}`` (and the report labels it ``alie{"z":100}``).

Every cell is validated (flags, resilience bounds, attack names and arguments) before
anything runs; unknown keys and bad values are a clear error.  Each finished cell appends
one JSON line to the results file::

    {"key": <canonical config JSON>, "cell": {...}, "outcome": "ok" | "failed:<rank>" |
     "timeout" | "error", "final_accuracy": .., "best_accuracy": .., "steps": ..,
     "steps_per_s": .., "bytes_sent": .., "bytes_received": .., "wall_time": .., "run_dir": ..}

* ``final_accuracy``: min over the correct PSes of their final accuracy (full test set);
* ``best_accuracy``: max over the evaluation steps of the min over the correct PSes (the
  periodic evaluations use ``eval_samples`` test samples, the last one the whole set);
* ``steps_per_s``: completed steps / (time of the last step - time of the first step),
  slowest correct PS (evaluation pauses included, start-up excluded);
* ``bytes_sent`` / ``bytes_received``: totals over the correct PSes (workers keep no
  metrics file); ``wall_time``: the whole cell, start-up included.

Resumable: a cell whose canonical key already has a line in the results file is skipped
(``--retry-failed`` runs the failed ones again; the report takes the last line of a key).
A cell that fails is recorded with its outcome and the grid goes on.  Ctrl-C stops the
running cell cleanly and records nothing for it: rerun the same command to resume.

This module loads and validates an experiment (and is its CLI); what it builds is
:mod:`byzsgd.experiments.spec`'s, and the cells run in :mod:`byzsgd.experiments.runner`, which
imports neither this module nor its CLI.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import itertools
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Iterable

from byzsgd.config import RunConfig
from byzsgd.deploy.options import LAUNCH_DEFAULTS, LaunchConfig
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.flags import flag_fields
from byzsgd.experiments.results import read_results
from byzsgd.experiments.spec import HARNESS_FLAGS, Cell, Experiment, short, canonical_key

EXPERIMENT_KEYS = {
    "name": "a name for the experiment (titles of the plots)",
    "description": "free text",
    "results": "results file, JSON lines (default: <runs_dir>/results.jsonl)",
    "runs_dir": "directory of the cells' run directories (default: runs/<name>)",
    "timeout": "seconds a cell may run before it is stopped and recorded as 'timeout' (0: none)",
    "servers": "multi-host: parameter-server host file of scripts/run_exp.sh (with 'workers')",
    "workers": "multi-host: worker host file of scripts/run_exp.sh (with 'servers')",
    "run_exp": "multi-host: the script that runs a cell (default scripts/run_exp.sh)",
}
NONE_ATTACK = "none"

# --------------------------------------------------------------------------------------------
# configuration


def grid_fields() -> dict[str, str]:
    """The launcher fields a grid may set: name -> help (every LaunchConfig / RunConfig flag
    but those the harness sets per cell)."""
    return {f.name: fl.help for cls in (RunConfig, LaunchConfig) for f, fl in flag_fields(cls)
            if f.name not in HARNESS_FLAGS}


def load_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the experiment config {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            doc = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML, which is not installed "
                              "(pip install pyyaml), or write the config in TOML") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    else:
        raise ConfigError(f"{path}: the experiment config must end in .toml, .yaml or .yml")
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a table/mapping")
    return doc


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:60].strip("_")


def _resolve(fields, defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Canonical cell values: 'none' attacks, Byzantine counts defaulting to fw / fps."""
    out = dict(values)
    for attack, count, args, tol in (("worker_attack", "byz_workers", "worker_attack_args", "fw"),
                                     ("ps_attack", "byz_ps", "ps_attack_args", "fps")):
        name = out.get(attack)
        if isinstance(name, dict):  # {name = {args}}: that attack with those arguments
            if len(name) != 1 or not isinstance(next(iter(name.values())), dict):
                raise ConfigError(f"{attack}: a table entry is a one-key table {{<attack> = {{<arguments>}}}}, got {name!r}")
            if args in out:
                raise ConfigError(f"{attack}: {name!r} gives its arguments; drop {args} from [grid]")
            (name, given), = name.items()
            out[attack] = name
            if given:
                out[args] = dict(given)
        if name is None or (isinstance(name, str) and name.strip().lower() == NONE_ATTACK):
            out[attack] = NONE_ATTACK
            out[count] = 0
            out.pop(args, None)
        else:
            if count not in out:
                out[count] = out.get(tol, defaults.get(tol, 0))
    return out


def build_cells(grid: dict[str, Any]) -> tuple[list[Cell], list[str]]:
    fields = grid_fields()
    unknown = [k for k in grid if k not in fields]
    if unknown:
        k = unknown[0]
        why = " (the harness sets it per cell)" if k in HARNESS_FLAGS else _suggest(k, fields)
        raise ConfigError(f"[grid]: unknown launcher field {k!r}{why}; known: {', '.join(sorted(fields))}")
    axes = [k for k, v in grid.items() if isinstance(v, list)]
    for k in axes:
        if not grid[k]:
            raise ConfigError(f"[grid] {k}: an empty list makes an empty grid")
        if len({canonical_key({"v": v}) for v in grid[k]}) != len(grid[k]):
            raise ConfigError(f"[grid] {k}: repeated values {grid[k]!r}")
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for index, combo in enumerate(itertools.product(*(grid[k] for k in axes))):
        chosen = dict(zip(axes, combo))
        values = {k: (chosen[k] if k in chosen else v) for k, v in grid.items()}
        values = _resolve(fields, LAUNCH_DEFAULTS, values)
        key = canonical_key(values)
        where = f"cell {index} ({Cell(index, values, chosen, None, key, '').describe()})"
        if key in seen:
            raise ConfigError(f"cells {seen[key]} and {index} are the same configuration "
                              f"({where.split('(', 1)[1]}")
        seen[key] = index
        launch_values = {k: v for k, v in values.items() if not (
            k in ("worker_attack", "ps_attack") and v == NONE_ATTACK)}
        for k, v in launch_values.items():
            if isinstance(v, (list, tuple)):
                raise ConfigError(f"{k}: nested lists are not supported")
        try:
            config = LaunchConfig.from_values(launch_values)
        except ByzSGDError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        label = f"{index:03d}-" + "-".join(_slug(short(v)) for v in chosen.values())
        label = (label[:100] + "-" + digest).replace("--", "-")
        cells.append(Cell(index, values, chosen, config, key, label))
    return cells, axes


def validate_cell(cell: Cell) -> None:
    """Everything the launcher would refuse, refused now (nothing is started)."""
    where = f"cell {cell.index} ({cell.describe()})"
    lc = cell.config
    try:
        lc.validate()
        if lc.byz_workers == 0 and lc.worker_attack:
            raise ConfigError(f"worker_attack={lc.worker_attack!r} with 0 Byzantine workers "
                              "(fw=0): set byz_workers, or use worker_attack='none'")
        if lc.byz_ps == 0 and lc.ps_attack:
            raise ConfigError(f"ps_attack={lc.ps_attack!r} with 0 Byzantine PSes (fps=0): "
                              "set byz_ps, or use ps_attack='none'")
    except ByzSGDError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE a TOML/JSON value (``150``, ``["a","b"]``); else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        import tomllib

        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
    return key, value


def load_experiment(path: str | os.PathLike, *, overrides: Iterable[str] = (),
                    results: str | None = None, runs_dir: str | None = None,
                    validate: bool = True) -> Experiment:
    doc = load_config_file(path)
    top_unknown = [k for k in doc if k not in ("experiment", "grid")]
    if top_unknown:
        k = top_unknown[0]
        hint = (" (launcher fields go in the [grid] table)" if k in grid_fields()
                else _suggest(k, ["experiment", "grid"]))
        raise ConfigError(f"{path}: unknown top-level key {k!r}{hint}; expected the tables "
                          "[experiment] and [grid]")
    exp = doc.get("experiment") or {}
    grid = doc.get("grid") or {}
    if not isinstance(exp, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{path}: [experiment] and [grid] must be tables")
    exp, grid = dict(exp), dict(grid)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("experiment."):
            exp[key.split(".", 1)[1]] = value
        else:
            grid[key.removeprefix("grid.")] = value
    for k in exp:
        if k not in EXPERIMENT_KEYS:
            raise ConfigError(f"[experiment]: unknown key {k!r}{_suggest(k, EXPERIMENT_KEYS)}; known: "
                              f"{', '.join(sorted(EXPERIMENT_KEYS))}")
    name = str(exp.get("name") or Path(path).stem)
    run_root = Path(runs_dir or exp.get("runs_dir") or Path("runs") / _slug(name))
    res = Path(results or exp.get("results") or run_root / "results.jsonl")
    timeout = exp.get("timeout", 1800)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ConfigError(f"[experiment] timeout must be a number of seconds >= 0, got {timeout!r}")
    remote = {k: str(exp[k]) for k in ("servers", "workers", "run_exp") if k in exp}
    if ("servers" in remote) != ("workers" in remote):
        raise ConfigError("[experiment]: 'servers' and 'workers' go together")
    if "run_exp" in remote and "servers" not in remote:
        raise ConfigError("[experiment]: 'run_exp' needs 'servers' + 'workers'")
    for k in ("servers", "workers"):
        if k in remote and not Path(remote[k]).is_file():
            raise ConfigError(f"[experiment] {k}: no such file {remote[k]!r}")
    cells, axes = build_cells(grid)
    if validate:
        for cell in cells:
            validate_cell(cell)
            if remote and (cell.values.get("byz_workers") or cell.values.get("byz_ps")):
                raise ConfigError(f"cell {cell.index} ({cell.describe()}): multi-host cells "
                                  "(scripts/run_exp.sh) cannot have Byzantine nodes yet; use "
                                  "worker_attack = \"none\" and ps_attack = \"none\"")
    return Experiment(name, res, run_root, float(timeout), cells, axes, remote, str(path))


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m byzsgd.experiment",
        description="Run a grid of ByzSGD deployments described by a TOML/YAML config "
                    "(every list-valued launcher field is an axis); results go to a JSON-lines "
                    "file, one line per cell, and an interrupted grid resumes where it stopped.")
    p.add_argument("config", help="experiment config (.toml, or .yaml/.yml with PyYAML)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the cells; run nothing")
    p.add_argument("--results", default=None, help="results file (overrides [experiment] results)")
    p.add_argument("--runs-dir", default=None, help="cells' run directories (overrides runs_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [grid] field (or experiment.KEY); VALUE is TOML/JSON, "
                        "e.g. --set num_iter=20 --set 'gar=[\"median\"]'")
    p.add_argument("--retry-failed", action="store_true", help="run again the cells recorded as failed")
    p.add_argument("--max-cells", type=int, default=None, help="run at most N cells this time")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        exp = load_experiment(args.config, overrides=args.set, results=args.results,
                              runs_dir=args.runs_dir)
    except ByzSGDError as exc:
        print(f"byzsgd.experiment: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        done = {r["key"]: r for r in read_results(exp.results)} if exp.results.exists() else {}
        print(f"{exp.name}: {len(exp.cells)} cells (axes: {', '.join(exp.axes) or 'none'}); "
              f"results: {exp.results}; runs: {exp.runs_dir}"
              + (f"; multi-host via {exp.remote.get('run_exp', 'scripts/run_exp.sh')}" if exp.remote else ""))
        for cell in exp.cells:
            rec = done.get(cell.key)
            state = f"done ({rec['outcome']})" if rec else "todo"
            print(f"  {cell.index:3d} [{state}] {cell.describe()}")
        return 0

    def on_term(signum, frame):
        raise KeyboardInterrupt

    from byzsgd.experiments.runner import run_experiment

    signal.signal(signal.SIGTERM, on_term)
    try:
        counts = run_experiment(exp, retry_failed=args.retry_failed, quiet=args.quiet,
                                max_cells=args.max_cells)
    except KeyboardInterrupt:
        print(f"\nbyzsgd.experiment: interrupted; the running cell was stopped and not recorded. "
              f"Run the same command again to resume.", file=sys.stderr)
        return 130
    except ByzSGDError as exc:
        print(f"byzsgd.experiment: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"byzsgd.experiment: {counts['ran']} cells run ({counts['ok']} ok, {counts['failed']} "
              f"failed), {counts['skipped']} skipped; results in {exp.results}", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
