"""Stop a whole run and leave its outcome: ``scripts/kill.sh [RUN_DIR] [--grace S]``
(``python -m byzsgd.deploy.stop``).

A stopped run must not read as a finished one.  Before any signal goes out, ``stop.json``
names who stops the run (``kill.sh``); the run's own launcher, when it is still there, sees
the SIGTERM, stops its nodes and writes ``summary.json``; otherwise the ranks are stopped here
(``run_exp.sh`` runs: through their runner, :func:`byzsgd.deploy.multihost.kill`; one-machine
runs: their process groups from the pid files).  Then the summary is settled here: outcome
``killed`` by ``kill.sh``, and each rank that was running when it was signalled reports exit
code 143 (128 + SIGTERM) in the summary and in its ``<role><rank>.rc`` — a node stopped by
SIGTERM closes cleanly and exits 0, which is what made a killed run look finished.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy import rank_procs
from byzsgd.deploy import summary as runsum
from byzsgd.errors import ByzSGDError

#: how long a run's launcher gets to stop its nodes and write its summary after SIGTERM
LAUNCHER_GRACE_S = 60.0


def _launcher(doc: dict) -> int | None:
    """The run's launcher process when it still runs (``launcher_pid``, started before the
    run's ``started`` time: a recycled pid starts later)."""
    pid = doc.get("launcher_pid")
    if not isinstance(pid, int) or pid == os.getpid() or not rank_procs.alive(pid):
        return None
    started = rank_procs.start_time(pid)
    when = doc.get("started") or 0
    return pid if started is not None and (not when or started <= float(when) + 1.0) else None


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(rank_procs.alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if rank_procs.alive(p)]


def _read_rc(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _stop_local_ranks(run_dir: Path, doc: dict, grace: float) -> tuple[list[int], list[int]]:
    """SIGTERM each live rank (found by its pid file, byzsgd.deploy.rank_procs.node_pid), SIGKILL
    what is left after ``grace``; returns (the ranks signalled, the pids left)."""
    live = {}
    for info in doc["ranks"]:
        pid = rank_procs.node_pid(run_dir, info)
        if pid is not None:
            live[int(info["rank"])] = pid
    for pid in live.values():
        rank_procs.signal_node(pid, signal.SIGTERM)
    left = _wait_gone(list(live.values()), grace)
    for pid in left:
        rank_procs.signal_node(pid, signal.SIGKILL)
    return sorted(live), _wait_gone(left, 5.0)


def stop_run(run_dir: str | os.PathLike, *, grace: float = 5.0, by: str = "kill.sh",
             runner: str | None = None) -> dict:
    """Stop every rank of the run in ``run_dir`` and write its ``summary.json`` with outcome
    ``killed`` (``by``); returns the summary, plus ``left_behind`` ({where: [pids]}) when
    some process could not be stopped.  A run that had already ended keeps its outcome."""
    run_dir = Path(run_dir).resolve()
    doc = rundir.read_deployment(run_dir)
    before = rundir.read_summary(run_dir)
    ours = rundir.read_stop(run_dir) == {}
    rundir.record_stop(run_dir, by, signal="SIGTERM")  # before any signal: the summary names it
    t0 = time.time()
    launcher = _launcher(doc)
    left: dict[str, list[int]] = {}
    if "run_id" in doc:  # run_exp.sh: the ranks, through the run's runner
        from byzsgd.deploy import multihost

        status = multihost.poll(doc, runner or doc.get("runner"))
        stopped = sorted(r for r, s in status.items() if s.get("alive"))
        left = {h: p for h, p in multihost.kill(doc, grace, runner).items() if p}
        if launcher:  # a run_exp.sh still waiting notices and writes its summary first
            _wait_gone([launcher], LAUNCHER_GRACE_S)
        if all("remote_log" in r for r in doc["ranks"]):  # hand-made descriptions have none
            multihost.collect(doc, runner)
    else:  # one machine: the launcher stops its nodes; else they are stopped here
        stopped = sorted(int(i["rank"]) for i in doc["ranks"] if rank_procs.node_pid(run_dir, i) is not None)
        if launcher:
            os.kill(launcher, signal.SIGTERM)
            if _wait_gone([launcher], LAUNCHER_GRACE_S):
                left["launcher"] = [launcher]
        signalled, pids = _stop_local_ranks(run_dir, doc, grace)  # what a gone launcher left
        stopped = sorted(set(stopped) | set(signalled))
        if pids:
            left.setdefault("localhost", []).extend(pids)
    if before and not stopped and not launcher:  # over before this stop: its summary stands
        if ours:
            rundir.clear_stop(run_dir)
        return before
    codes = {}
    for info in doc["ranks"]:
        rank = int(info["rank"])
        rc = rundir.rank_file(run_dir, info["role"], rank, "rc")
        codes[rank] = _read_rc(rc)
    summary = rundir.read_summary(run_dir)
    fresh = summary and (run_dir / rundir.SUMMARY).stat().st_mtime >= t0
    if not fresh:
        observed = "stopped"
        if "run_id" in doc and "started" in doc:
            from byzsgd.deploy import multihost

            summary = multihost.summarize(doc, observed, codes)
        else:
            summary = runsum.run_summary(run_dir, observed, started=float(doc.get("started") or t0),
                                         returncodes=codes, byzantine_ranks=doc.get("byzantine_ranks") or [])
    else:
        observed = summary.get("outcome") or "stopped"
        summary["returncodes"] = {**{str(k): v for k, v in codes.items() if v is not None},
                                  **{k: v for k, v in (summary.get("returncodes") or {}).items() if v is not None}}
    faulty = set(rundir.read_faults(run_dir)["faulty"])
    runsum.apply_outcome(summary, run_dir, "stopped" if observed in ("killed", "interrupted") else observed,
                         stopped_ranks=stopped, faulty=faulty)
    if summary["outcome"] == "killed":
        for info in doc["ranks"]:  # the exit code files say it too
            code = summary["returncodes"].get(str(info["rank"]))
            if int(info["rank"]) in stopped and code is not None:
                rundir.rank_file(run_dir, info["role"], int(info["rank"]), "rc").write_text(f"{code}\n")
    if left:
        summary["left_behind"] = left
    rundir.write_summary(run_dir, summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/kill.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", nargs="?", default=None,
                   help="the run (default: the latest run_exp.sh started from this checkout)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.run_dir is None:
            from byzsgd.deploy.latest import latest_run

            args.run_dir = str(latest_run())
            print(f"kill.sh: the latest run: {args.run_dir}", file=sys.stderr)
        summary = stop_run(args.run_dir, grace=args.grace,
                           runner=os.environ.get("BYZSGD_RUNNER") or None)
    except ByzSGDError as exc:
        print(f"kill.sh: error: {exc}", file=sys.stderr)
        return 2
    print(f"kill.sh: {args.run_dir}: outcome {runsum.outcome_line(summary)}", file=sys.stderr)
    codes = summary.get("returncodes") or {}
    if codes:
        print("kill.sh: exit codes " + ", ".join(f"{r}:{c}" for r, c in codes.items()), file=sys.stderr)
    if summary.get("left_behind"):
        print(f"kill.sh: processes left behind: {summary['left_behind']}", file=sys.stderr)
        return 1
    print(f"kill.sh: no process of the run {args.run_dir} is left", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
