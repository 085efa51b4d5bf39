"""Running the cells of an experiment grid (:mod:`byzsgd.experiments.grid` loads and validates
it into :mod:`byzsgd.experiments.spec`'s cells, all this module imports of it): one launcher
process per cell (``python -m byzsgd.launch``, or ``scripts/run_exp.sh`` for a multi-host
cell), stopped at the cell's hard limit or on Ctrl-C with every node it started,
its result record appended to the results file; the progress bar over cells.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.errors import ConfigError
from byzsgd.experiments.spec import ROOT, Cell, Experiment
from byzsgd.experiments.results import append_result, read_results

#: seconds the harness waits past [experiment] timeout before it stops a cell itself (the
#: launcher's own --timeout normally fires first; a multi-host script may not have one)
HARD_LIMIT_SLACK = 120.0

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
    steps = runsum.ps_steps(run_dir)
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
    record.update(runsum.summarize_run(run_dir))
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
