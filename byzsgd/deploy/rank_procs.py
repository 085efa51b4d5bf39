"""Which process is a rank of a run, found by the run directory's own records, and
signalling it: what the fault injector (:mod:`byzsgd.deploy.faults`) and ``kill.sh``
(:mod:`byzsgd.deploy.stop`) act on, whatever started the run (``byzsgd-launch``, ``python -m
byzsgd.launch``, ``run_exp.sh``, a trainer).  Linux ``/proc`` only; nothing is matched by name.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy.host_scripts import RUN_ID_ENV  # what marks a run_exp.sh rank's process
from byzsgd.errors import ConfigError


def pid_file(run_dir: Path, info: dict) -> Path:
    """The pid file of a rank entry of ``deployment.json``."""
    return rundir.rank_file(run_dir, info["role"], int(info["rank"]), "pid")


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, T, Z, ...) or None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def alive(pid: int | None) -> bool:
    """A live process (a zombie is dead)."""
    if not pid:
        return False
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.decode(errors="replace").partition("=")[::2] for kv in raw.split(b"\0") if b"=" in kv)


def _int_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def is_node(pid: int, run_dir: Path, rank: int, pidfile: Path | None = None) -> bool:
    """``pid`` is rank ``rank`` of this run (not a recycled pid), whatever started it.

    A node whose argv names its rank and this run's peers file (``--rank RANK --peers
    RUN_DIR/deployment.json``: an exec'd node, a restart) is recognised by it.  Any other
    must have started before its pid file was written (a recycled pid starts later) and
    belong to the run by its origin: a child of the run's launcher (``launcher_pid``: nodes
    forked by ``byzsgd-launch`` or ``python -m byzsgd.launch``, which show their launcher's
    command line), or a trainer of ``run_exp.sh`` (its environment carries the run's
    ``BYZSGD_RUN_ID``, or its process group is the one of its ``.pgid`` file)."""
    args = cmdline(pid)
    peers = rundir.deployment_path(run_dir).resolve()
    if "--peers" in args and "--rank" in args:
        try:
            return (args[args.index("--rank") + 1] == str(rank) and
                    Path(args[args.index("--peers") + 1]).resolve() == peers)
        except IndexError:
            return False
    if "--master" in args and "--rank" in args and args[args.index("--rank") + 1:][:1] != [str(rank)]:
        return False  # a trainer (run_exp.sh) of another rank
    if pidfile is None:
        return False
    try:
        started, written = start_time(pid), pidfile.stat().st_mtime
        doc = rundir.read_deployment(run_dir)
    except (OSError, ConfigError):
        return False
    if started is None or started > written + 1.0:
        return False
    if doc.get("launcher_pid") and ppid(pid) == doc["launcher_pid"]:
        return True
    if doc.get("run_id") and environ(pid).get(RUN_ID_ENV) == doc["run_id"]:
        return True
    pgid_file = pidfile.with_suffix(".pgid")
    try:
        return pgid_file.exists() and os.getpgid(pid) == _int_file(pgid_file)
    except OSError:
        return False


def node_pid(run_dir: Path, info: dict) -> int | None:
    """The node's pid from its pid file, if that process is alive and is this node."""
    try:
        pid = int(pid_file(run_dir, info).read_text().strip())
    except (OSError, ValueError):
        return None
    if alive(pid) and is_node(pid, run_dir, int(info["rank"]), pid_file(run_dir, info)):
        return pid
    return None


def signal_node(pid: int, sig: int) -> None:
    """Signal the node's process group when it leads one (the launcher's nodes run in their own
    session), else the node alone (a ``run_exp.sh`` trainer: its wrapper leads the group and
    must survive to record the exit code)."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid == pid:
        os.killpg(pgid, sig)
    else:
        os.kill(pid, sig)


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
