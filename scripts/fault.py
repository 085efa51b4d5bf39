#!/usr/bin/env python3
"""Fault injection for a deployment started by ``python -m byzsgd.launch --run_dir D``.

    python scripts/fault.py D kill RANK              SIGKILL the node's process group
    python scripts/fault.py D pause RANK [--seconds S]   SIGSTOP it; SIGCONT after S s (S=0: stay stopped)
    python scripts/fault.py D resume RANK            SIGCONT it
    python scripts/fault.py D restart RANK           start a killed node again: same argv, port, env
    python scripts/fault.py D at-step RANK K ACTION [--seconds S]
                                                     wait until every correct PS logged step >= K,
                                                     then ACTION (kill | pause | resume | restart)
    python scripts/fault.py D wait-step K            only the wait of at-step
    python scripts/fault.py D netem RANK --dev IF [--netns NS] [--delay 50ms] [--loss 1%] [--apply|--clear]
                                                     print (or apply) a tc netem recipe
    python scripts/fault.py D status                 ranks, pids, alive/stopped/dead, faults; per
                                                     restarted rank the step it rejoined at (first
                                                     step a correct PS aggregated it again) and
                                                     how many steps it served since

Everything is found in the run directory: ``deployment.json`` (each rank's argv, port, log,
metrics, credentials file), the pid files ``<role><rank>.pid`` and the rank's credentials
``credentials/rank<r>.cred`` (or ``secret`` in ``--insecure_shared_secret`` runs).  A process is signalled only
after checking that it is the node of this run (its ``/proc/PID/cmdline`` carries this run's
``--peers D/deployment.json`` and ``--rank RANK``), so a recycled pid is never hit; nothing
is matched by name.

``D/faults.json`` tells the launcher which failures are on purpose.  It is written (under
a lock, atomically) *before* a signal is sent::

    {"faulty": [ranks whose death is not fatal],          # kill, restart
     "paused": [ranks now stopped],                        # pause / resume
     "restarted": {"rank": pid},                           # the pid of the restarted node
     "events": [{"time", "action", "rank", "pid", "step"}]}

The launcher does not fail when a rank listed in ``faulty`` exits, does not wait for it,
waits for a restarted PS to exit, and stops restarted nodes when it stops the deployment.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzsgd.deploy import rundir  # noqa: E402  (light: no torch import)
from byzsgd.errors import ConfigError  # noqa: E402
from byzsgd.metrics import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET_FILE_ENV = "BYZSGD_SECRET_FILE"
SECRET_ENVS = ("BYZSGD_SECRET", SECRET_FILE_ENV, "BYZSGD_CREDENTIALS")
FAULTS = rundir.FAULTS


class FaultError(Exception):
    pass


# -- the run directory -----------------------------------------------------------------
def load_deployment(run_dir: Path) -> dict:
    try:
        return rundir.read_deployment(run_dir)
    except ConfigError as exc:
        raise FaultError(str(exc)) from None


def rank_info(doc: dict, rank: int) -> dict:
    for r in doc["ranks"]:
        if int(r["rank"]) == rank:
            return r
    raise FaultError(f"no rank {rank} in this deployment (ranks 0..{len(doc['ranks']) - 1})")


def pid_file(run_dir: Path, info: dict) -> Path:
    return rundir.rank_file(run_dir, info["role"], int(info["rank"]), "pid")


_atomic_write = rundir.atomic_write
_locked = rundir.faults_lock
read_faults = rundir.read_faults


def update_faults(run_dir: Path, rank: int, action: str, pid: int | None, *, faulty: bool | None = None,
                  paused: bool | None = None, restarted_pid: int | None | bool = False) -> dict:
    """Record one fault (atomically, under a lock) before it is carried out."""
    with _locked(run_dir):
        doc = read_faults(run_dir)
        if faulty is True and rank not in doc["faulty"]:
            doc["faulty"] = sorted(doc["faulty"] + [rank])
        if paused is True and rank not in doc["paused"]:
            doc["paused"] = sorted(doc["paused"] + [rank])
        if paused is False and rank in doc["paused"]:
            doc["paused"] = [r for r in doc["paused"] if r != rank]
        if restarted_pid is None:
            doc["restarted"].pop(str(rank), None)
        elif restarted_pid is not False:
            doc["restarted"][str(rank)] = int(restarted_pid)
        doc["events"].append(dict(time=time.time(), action=action, rank=rank, pid=pid,
                                  step=current_step(run_dir)))
        rundir.write_faults(run_dir, doc)
        return doc


# -- processes ---------------------------------------------------------------------------
def _proc_state(pid: int) -> str | None:
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
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def is_node(pid: int, run_dir: Path, rank: int, pidfile: Path | None = None) -> bool:
    """``pid`` is rank ``rank`` of this run (not a recycled pid).

    A node started with exec (launcher ``--spawn exec``, or a restart) runs its own argv:
    ``--rank RANK --peers RUN_DIR/deployment.json``.  A node forked by the launcher
    (``--spawn fork``) shows the launcher's command line; it is accepted when it leads its
    own session and started before its pid file was written (a recycled pid starts later)."""
    args = _cmdline(pid)
    peers = rundir.deployment_path(run_dir).resolve()
    try:
        if "--peers" in args and "--rank" in args:
            return (args[args.index("--rank") + 1] == str(rank) and
                    Path(args[args.index("--peers") + 1]).resolve() == peers)
    except IndexError:
        return False
    if not any("byzsgd.launch" in a for a in args) or pidfile is None:
        return False
    try:
        if os.getsid(pid) != pid:
            return False
        started, written = _start_time(pid), pidfile.stat().st_mtime
    except OSError:
        return False
    return started is not None and started <= written + 1.0


def node_pid(run_dir: Path, info: dict) -> int | None:
    """The node's pid from its pid file, if that process is alive and is this node."""
    try:
        pid = int(pid_file(run_dir, info).read_text().strip())
    except (OSError, ValueError):
        return None
    if alive(pid) and is_node(pid, run_dir, int(info["rank"]), pid_file(run_dir, info)):
        return pid
    return None


def _signal_group(pid: int, sig: int) -> None:
    # every node runs in its own session (start_new_session=True): its pgid is its pid
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    if pgid != pid:
        raise FaultError(f"pid {pid} does not lead its process group ({pgid}); not signalling it")
    os.killpg(pgid, sig)


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- metrics -----------------------------------------------------------------------------
def _records(path: str | None):
    return read_metrics(path) if path else iter(())


def ps_steps(run_dir: Path) -> dict[int, int]:
    """The last completed step logged by each correct PS (-1 when none yet)."""
    load_deployment(run_dir)  # FaultError when there is no deployment (yet)
    return rundir.ps_steps(run_dir)


def current_step(run_dir: Path) -> int | None:
    try:
        steps = ps_steps(run_dir)
    except FaultError:
        return None
    return max(steps.values()) if steps else None


def wait_step(run_dir: Path, k: int, *, timeout: float = 900.0, poll: float = 0.2) -> dict[int, int]:
    """Wait until every correct PS that is not faulty or paused logged a step >= k."""
    deadline = time.monotonic() + timeout
    while not rundir.deployment_path(run_dir).exists():
        if time.monotonic() > deadline:
            raise FaultError(f"no deployment in {run_dir}")
        time.sleep(poll)
    while True:
        faults = read_faults(run_dir)
        skip = set(faults["faulty"]) | set(faults["paused"])
        steps = ps_steps(run_dir)
        watched = {r: s for r, s in steps.items() if r not in skip}
        if watched and min(watched.values()) >= k:
            return steps
        if watched and all(_done(run_dir, r) for r in watched):
            raise FaultError(f"the run ended before step {k} (steps: {steps})")
        if time.monotonic() > deadline:
            raise FaultError(f"step {k} not reached in {timeout:.0f} s (steps: {steps})")
        time.sleep(poll)


def _done(run_dir: Path, rank: int) -> bool:
    info = rank_info(load_deployment(run_dir), rank)
    return any(rec.get("event") == "done" for rec in _records(info.get("metrics")))


# -- actions -----------------------------------------------------------------------------
def kill(run_dir: Path, rank: int) -> int:
    info = rank_info(load_deployment(run_dir), rank)
    pid = node_pid(run_dir, info)
    if pid is None:
        raise FaultError(f"rank {rank} has no live process of this run (pid file {pid_file(run_dir, info)})")
    update_faults(run_dir, rank, "kill", pid, faulty=True, paused=False, restarted_pid=None)
    _signal_group(pid, signal.SIGKILL)
    if not wait_dead(pid):
        raise FaultError(f"rank {rank} (pid {pid}) still alive 10 s after SIGKILL")
    return pid


def pause(run_dir: Path, rank: int, seconds: float = 0.0) -> int:
    info = rank_info(load_deployment(run_dir), rank)
    pid = node_pid(run_dir, info)
    if pid is None:
        raise FaultError(f"rank {rank} has no live process of this run")
    update_faults(run_dir, rank, "pause", pid, paused=True)
    _signal_group(pid, signal.SIGSTOP)
    if seconds > 0:
        time.sleep(seconds)
        resume(run_dir, rank)
    return pid


def resume(run_dir: Path, rank: int) -> int:
    info = rank_info(load_deployment(run_dir), rank)
    pid = node_pid(run_dir, info)
    if pid is None:
        raise FaultError(f"rank {rank} has no live process of this run")
    update_faults(run_dir, rank, "resume", pid, paused=False)
    _signal_group(pid, signal.SIGCONT)
    return pid


def node_env(run_dir: Path) -> dict:
    """The environment the launcher gives a node (launch.start): ours, without an inherited
    secret or credentials (the node's argv names its own ``--credentials`` file), with the
    run's secret file in ``--insecure_shared_secret`` runs only, and one thread."""
    env = dict(os.environ)
    for var in SECRET_ENVS:
        env.pop(var, None)
    if (run_dir / rundir.SECRET).exists():
        env[SECRET_FILE_ENV] = str(run_dir / rundir.SECRET)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def rank_credentials(info: dict) -> str | None:
    """The ``--credentials`` file named in a rank's argv (None: none named)."""
    cmd = list(info.get("cmd") or [])
    for i, word in enumerate(cmd):
        if word == "--credentials" and i + 1 < len(cmd):
            return cmd[i + 1]
        if word.startswith("--credentials="):
            return word.partition("=")[2]
    return None


def restart(run_dir: Path, rank: int) -> int:
    """Start rank ``rank`` again with its exact argv (same port), appending to its log."""
    doc = load_deployment(run_dir)
    info = rank_info(doc, rank)
    old = node_pid(run_dir, info)
    if old is not None:
        raise FaultError(f"rank {rank} is still running (pid {old}); kill it first")
    cred = rank_credentials(info)
    if cred is not None and not Path(cred).is_file():
        raise FaultError(f"rank {rank}'s credentials file {cred} is gone; it cannot prove its rank")
    if cred is None and not (run_dir / rundir.SECRET).exists():
        raise FaultError(f"rank {rank}'s command names no --credentials and {run_dir} holds no "
                         f"secret file: it could not authenticate")
    # faulty first: the launcher must never take the restarted node's exit for the old one's
    update_faults(run_dir, rank, "restart", None, faulty=True, paused=False)
    with open(info["log"], "ab") as log:
        log.write(f"\n=== fault.py: restarting rank {rank} at {time.strftime('%H:%M:%S')} ===\n".encode())
        log.flush()
        proc = subprocess.Popen(info["cmd"], stdout=log, stderr=subprocess.STDOUT, env=node_env(run_dir),
                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    _atomic_write(pid_file(run_dir, info), str(proc.pid))
    with _locked(run_dir):
        rundir.set_rank_pid(run_dir, rank, proc.pid)
    update_faults(run_dir, rank, "restarted", proc.pid, restarted_pid=proc.pid)
    return proc.pid


def netem_recipe(dev: str, netns: str | None, delay: str | None, loss: str | None,
                 clear: bool = False) -> list[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    if clear:
        return prefix + ["tc", "qdisc", "del", "dev", dev, "root"]
    args = []
    if delay:
        args += ["delay", delay]
    if loss:
        args += ["loss", loss]
    if not args:
        raise FaultError("netem needs --delay and/or --loss")
    return prefix + ["tc", "qdisc", "replace", "dev", dev, "root", "netem", *args]


ACTIONS = ("kill", "pause", "resume", "restart")


def act(run_dir: Path, action: str, rank: int, seconds: float = 0.0) -> str:
    if action == "kill":
        return f"killed rank {rank} (pid {kill(run_dir, rank)})"
    if action == "pause":
        pid = pause(run_dir, rank, seconds)
        return f"paused rank {rank} (pid {pid})" + (f" for {seconds:g} s, resumed" if seconds > 0 else "")
    if action == "resume":
        return f"resumed rank {rank} (pid {resume(run_dir, rank)})"
    if action == "restart":
        return f"restarted rank {rank} (pid {restart(run_dir, rank)})"
    raise FaultError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")


def status(run_dir: Path) -> list[str]:
    doc = load_deployment(run_dir)
    faults = read_faults(run_dir)
    steps = ps_steps(run_dir)
    rejoined = rundir.rejoins(run_dir)
    lines = []
    for info in doc["ranks"]:
        rank = int(info["rank"])
        pid = node_pid(run_dir, info)
        state = {None: "dead", "T": "stopped", "t": "stopped"}.get(_proc_state(pid) if pid else None, "alive")
        extra = f" step {steps[rank]}" if rank in steps else ""
        lines.append(f"{info['role']}{rank} port {info['port']} pid {pid or '-'} {state}"
                     f"{' byzantine' if info['byzantine'] else ''}"
                     f"{' faulty' if rank in faults['faulty'] else ''}{extra}{_rejoin_text(rejoined.get(str(rank)))}")
    return lines


def _rejoin_text(r: dict | None) -> str:
    """How a restarted rank is doing (rundir.rejoins): when it served again and how much."""
    if r is None:
        return ""
    if r["rejoined_step"] is None:
        return f" restarted at step {r['restart_step']}, not aggregated since"
    after = f" ({r['rejoined_after_s']:.1f} s after)" if r["rejoined_after_s"] is not None else ""
    return (f" restarted at step {r['restart_step']}, rejoined at step {r['rejoined_step']}{after},"
            f" served {r['steps_served']} steps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/fault.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the launcher's --run_dir")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("kill", help="SIGKILL a node's process group")
    s.add_argument("rank", type=int)
    s = sub.add_parser("pause", help="SIGSTOP a node (SIGCONT after --seconds)")
    s.add_argument("rank", type=int)
    s.add_argument("--seconds", type=float, default=0.0, help="resume after S s (0: stay stopped)")
    s = sub.add_parser("resume", help="SIGCONT a paused node")
    s.add_argument("rank", type=int)
    s = sub.add_parser("restart", help="start a killed node again (same argv, port, env)")
    s.add_argument("rank", type=int)
    s = sub.add_parser("at-step", help="wait for step K on every correct PS, then act")
    s.add_argument("rank", type=int)
    s.add_argument("step", type=int)
    s.add_argument("action", choices=ACTIONS)
    s.add_argument("--seconds", type=float, default=0.0, help="pause: resume after S s")
    s.add_argument("--timeout", type=float, default=900.0, help="give up after S s")
    s = sub.add_parser("wait-step", help="wait until every correct PS logged step >= K")
    s.add_argument("step", type=int)
    s.add_argument("--timeout", type=float, default=900.0)
    s = sub.add_parser("netem", help="print (or apply) a tc netem recipe for a node's interface")
    s.add_argument("rank", type=int)
    s.add_argument("--dev", default="eth0", help="interface (netns_cluster.sh: eth0 in the namespace)")
    s.add_argument("--netns", default=None, help="the node's network namespace (e.g. byz2)")
    s.add_argument("--delay", default="50ms")
    s.add_argument("--loss", default="1%")
    s.add_argument("--apply", action="store_true", help="run it (needs root) instead of printing it")
    s.add_argument("--clear", action="store_true", help="the recipe that removes the qdisc")
    sub.add_parser("status", help="ranks, pids, states, faults")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = args.run_dir.resolve()
    try:
        if args.command in ACTIONS:
            print(act(run_dir, args.command, args.rank, getattr(args, "seconds", 0.0)), flush=True)
        elif args.command == "at-step":
            steps = wait_step(run_dir, args.step, timeout=args.timeout)
            print(f"step {args.step} reached (PS steps {steps})", flush=True)
            print(act(run_dir, args.action, args.rank, args.seconds), flush=True)
        elif args.command == "wait-step":
            print(json.dumps(wait_step(run_dir, args.step, timeout=args.timeout)))
        elif args.command == "netem":
            info = rank_info(load_deployment(run_dir), args.rank)
            cmd = netem_recipe(args.dev, args.netns, args.delay, args.loss, args.clear)
            print(f"# {info['role']}{args.rank} at {info['host']}:{info['port']}: egress of {args.dev}"
                  f"{' in netns ' + args.netns if args.netns else ''}")
            print(shlex.join(cmd))
            if args.apply:
                if not args.netns and info["host"] in ("127.0.0.1", "localhost", "::1"):
                    raise FaultError("refusing to impair a loopback deployment's host interface; "
                                     "run the nodes in namespaces (scripts/netns_cluster.sh) and give --netns")
                update_faults(run_dir, args.rank, "netem-clear" if args.clear else "netem", None)
                subprocess.run(cmd, check=True)
        elif args.command == "status":
            print("\n".join(status(run_dir)))
    except (FaultError, subprocess.CalledProcessError) as exc:
        print(f"fault.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
