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
"""
from __future__ import annotations

import argparse
import datetime as _dt
import difflib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from byzsgd.config import RunConfig
from byzsgd.deploy import rundir
from byzsgd.deploy.options import LAUNCH_DEFAULTS, LaunchConfig
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.flags import flag_fields, to_argv
from byzsgd.experiments.results import append_result, read_results

ROOT = Path(__file__).resolve().parents[2]

#: launcher flags the harness sets itself (per cell) or that make no sense in a grid
HARNESS_FLAGS = {"help", "run_dir", "json", "quiet", "timeout", "rank", "peers", "metrics", "attack",
                 "attack_args", "master", "host", "listen_host", "advertise_host", "port"}
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
#: launcher flags that are not trainer flags (a multi-host cell cannot use them)
LAUNCHER_ONLY = ("byz_workers", "worker_attack", "worker_attack_args", "byz_ps", "ps_attack",
                 "ps_attack_args", "node_log")
NONE_ATTACK = "none"
#: seconds the harness waits past [experiment] timeout before it stops a cell itself (the
#: launcher's own --timeout normally fires first; a multi-host script may not have one)
HARD_LIMIT_SLACK = 120.0


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


@dataclass
class Cell:
    index: int
    values: dict[str, Any]           # canonical: the fields of this cell (axes + scalars)
    axes: dict[str, Any]             # the values of the list-valued fields only
    config: LaunchConfig | None      # the cell's deployment (None only while describing)
    key: str
    label: str

    @property
    def flags(self) -> list[str]:
        """Launcher flags of the whole configuration (a cell is exec'd as byzsgd.launch)."""
        return self.config.to_argv(skip=HARNESS_FLAGS)

    @property
    def trainer_flags(self) -> list[str]:
        """Multi-host: the byzsgd.trainer flags of the fields the cell sets."""
        return to_argv(self.config.run, only=set(self.values) - set(LAUNCHER_ONLY))

    def describe(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.axes.items()) or "(single cell)"


@dataclass
class Experiment:
    name: str
    results: Path
    runs_dir: Path
    timeout: float
    cells: list[Cell]
    axes: list[str]
    remote: dict[str, str] = field(default_factory=dict)  # servers + workers [+ run_exp]
    source: str = ""


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:60].strip("_")


def canonical_key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


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
        label = f"{index:03d}-" + "-".join(_slug(_short(v)) for v in chosen.values())
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
# progress


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class CellProgress:
    """A bar over cells on stderr; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, skipped: int, *, stream=None, quiet: bool = False,
                 tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.total, self.skipped, self.quiet = total, skipped, quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.finished = skipped
        self.failed = 0
        self.durations: list[float] = []
        self.started = time.time()
        self.current = ""
        self.cell_started = 0.0

    def _bar(self, extra: str = "", width: int = 24) -> str:
        filled = int(width * self.finished / max(1, self.total))
        eta = ""
        left = self.total - self.finished
        if self.durations and left:
            eta = f" ETA {_fmt_s(left * sum(self.durations) / len(self.durations))}"
        fails = f", {self.failed} failed" if self.failed else ""
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.finished}/{self.total} cells"
                f"{fails}{eta} | {self.current}{extra}")

    def start_cell(self, cell: Cell, position: int) -> None:
        self.current = f"cell {cell.index}: {cell.describe()}"
        self.cell_started = time.time()
        if self.quiet:
            return
        if self.tty:
            self.update("")
        else:
            print(f"[{position}/{self.total}] {self.current} ...", file=self.stream, flush=True)

    def update(self, extra: str) -> None:
        if self.quiet or not self.tty:
            return
        line = self._bar(f" | {extra}" if extra else "")
        cols = shutil.get_terminal_size((120, 20)).columns
        print("\r" + line[:cols - 1].ljust(cols - 1), end="", file=self.stream, flush=True)

    def end_cell(self, cell: Cell, record: dict, position: int) -> None:
        took = time.time() - self.cell_started
        self.durations.append(took)
        self.finished += 1
        if record.get("outcome") != "ok":
            self.failed += 1
        if self.quiet:
            return
        acc = record.get("final_accuracy")
        acc_s = f"{acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
        msg = (f"[{position}/{self.total}] cell {cell.index}: {cell.describe()}: "
               f"{record.get('outcome')}, final accuracy {acc_s} ({took:.0f} s)")
        if self.tty:
            print("\r" + msg.ljust(shutil.get_terminal_size((120, 20)).columns - 1), file=self.stream)
            self.update("")
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.quiet and self.tty:
            print(file=self.stream, flush=True)


def _current_step(run_dir: Path) -> int | None:
    steps = rundir.ps_steps(run_dir)
    return max(steps.values()) + 1 if steps else None


# --------------------------------------------------------------------------------------------
# running


def multihost_runner(exp: Experiment) -> list[str]:
    """What runs a multi-host cell: the experiment's ``run_exp``, else the checkout's
    scripts/run_exp.sh, else (byzsgd installed without its scripts) the module behind it,
    with this interpreter."""
    if "run_exp" in exp.remote:
        return ["bash", exp.remote["run_exp"]]
    script = ROOT / "scripts" / "run_exp.sh"
    if script.is_file():
        return ["bash", str(script)]
    return [sys.executable, "-m", "byzsgd.deploy.cluster", "run"]


def cell_command(exp: Experiment, cell: Cell, run_dir: Path) -> list[str]:
    if exp.remote:
        cmd = [*multihost_runner(exp), "--servers", str(Path(exp.remote["servers"]).resolve()),
               "--workers", str(Path(exp.remote["workers"]).resolve()), "--run_dir", str(run_dir),
               "--json", "--quiet"]
        if exp.timeout:
            cmd += ["--timeout", str(exp.timeout)]
        return cmd + ["--", *cell.trainer_flags]
    cmd = [sys.executable, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(run_dir)]
    if exp.timeout:
        cmd += ["--timeout", str(exp.timeout)]
    return cmd + cell.flags


def _default_sigint() -> None:  # in the child, before exec
    # A harness started in the background has SIGINT ignored, and children inherit that: the
    # launcher must get Python's KeyboardInterrupt (it then stops every node it started).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_leftover_nodes(run_dir: Path) -> None:
    """SIGKILL the node processes a killed launcher left behind (each its own session)."""
    try:
        doc = rundir.read_deployment(run_dir)
    except ConfigError:
        return
    for r in doc.get("ranks", []):
        pid = r.get("pid")
        if not isinstance(pid, int):
            continue
        try:  # make sure the pid is still one of our nodes (not a recycled pid)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"byzsgd" in cmdline and str(run_dir).encode() in cmdline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _stop(proc: subprocess.Popen, run_dir: Path | None = None, grace: float = 30.0) -> None:
    """SIGINT the launcher (it stops its nodes), then SIGKILL whatever lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if run_dir is not None:
        _kill_leftover_nodes(run_dir)


def run_cell(exp: Experiment, cell: Cell, progress: CellProgress | None = None) -> dict:
    """Run one cell to the end; returns its result record (KeyboardInterrupt propagates)."""
    run_dir = (exp.runs_dir / cell.label).resolve()
    if run_dir.exists():  # a cell interrupted earlier: metrics files are appended to, start clean
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = cell_command(exp, cell, run_dir)
    (run_dir / "cell.json").write_text(json.dumps(dict(index=cell.index, key=cell.key, cell=cell.values,
                                                       command=cmd), indent=1))
    started = time.time()
    out_path, err_path = run_dir / "launcher.stdout", run_dir / "launcher.stderr"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    hard_limit = exp.timeout + HARD_LIMIT_SLACK if exp.timeout else None
    outcome, rc = None, None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, start_new_session=True, preexec_fn=_default_sigint)
        try:
            while True:
                try:
                    rc = proc.wait(1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if hard_limit and time.time() - started > hard_limit:
                    _stop(proc, run_dir)
                    rc, outcome = proc.returncode, "timeout"
                    break
                if progress is not None and progress.tty:
                    step = _current_step(run_dir)
                    total = cell.values.get("num_iter", "?")
                    progress.update(f"step {step if step is not None else '-'}/{total} "
                                    f"{_fmt_s(time.time() - started)}")
        except BaseException:
            _stop(proc, run_dir)
            raise
    wall = time.time() - started
    summary: dict = {}
    lines = out_path.read_text(errors="replace").strip().splitlines()
    if lines:
        try:
            summary = json.loads(lines[-1])
        except json.JSONDecodeError:
            summary = {}
    if not summary:
        summary = rundir.read_summary(run_dir)
    if outcome is None:
        outcome = summary.get("outcome") or ("ok" if rc == 0 else "error")
    record = dict(key=cell.key, index=cell.index, label=cell.label, cell=cell.values, axes=cell.axes,
                  outcome=outcome, returncode=rc)
    record.update(rundir.summarize_run(run_dir))
    if record["final_accuracy"] is None and isinstance(summary.get("min_accuracy"), (int, float)):
        record["final_accuracy"] = summary["min_accuracy"]
    record.update(wall_time=wall, median_step_time=summary.get("median_step_time"),
                  byzantine_ranks=summary.get("byzantine_ranks"), run_dir=str(run_dir),
                  started=_dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                  experiment=exp.name, multi_host=bool(exp.remote))
    if outcome != "ok":
        tail = err_path.read_text(errors="replace").strip().splitlines()[-12:]
        record["error"] = "\n".join(tail)[-2000:]
    return record


def run_experiment(exp: Experiment, *, retry_failed: bool = False, quiet: bool = False,
                   stream=None, max_cells: int | None = None) -> dict[str, int]:
    done = {r["key"]: r for r in read_results(exp.results)} if exp.results.exists() else {}

    def is_done(cell: Cell) -> bool:
        rec = done.get(cell.key)
        return rec is not None and (rec.get("outcome") == "ok" or not retry_failed)

    todo = [c for c in exp.cells if not is_done(c)]
    if max_cells is not None:
        todo = todo[:max_cells]
    stream = stream or sys.stderr
    skipped = len(exp.cells) - len([c for c in exp.cells if not is_done(c)])
    if not quiet:
        print(f"byzsgd.experiment: {exp.name}: {len(exp.cells)} cells, {skipped} already in "
              f"{exp.results}, {len(todo)} to run", file=stream, flush=True)
    progress = CellProgress(len(exp.cells), skipped, stream=stream, quiet=quiet)
    counts = dict(total=len(exp.cells), skipped=skipped, ran=0, ok=0, failed=0)
    try:
        for cell in todo:
            progress.start_cell(cell, progress.finished + 1)
            record = run_cell(exp, cell, progress)
            append_result(exp.results, record)
            counts["ran"] += 1
            counts["ok" if record["outcome"] == "ok" else "failed"] += 1
            progress.end_cell(cell, record, progress.finished + 1)
    finally:
        progress.close()
    return counts


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
