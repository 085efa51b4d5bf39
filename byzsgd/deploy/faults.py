"""Fault injection into a running deployment: ``byzsgd-fault RUN_DIR ACTION ...``.

    byzsgd-fault D kill RANK              SIGKILL the node (its process group when it leads one)
    byzsgd-fault D pause RANK [--seconds S]   SIGSTOP it; SIGCONT after S s (S=0: stay stopped)
    byzsgd-fault D resume RANK            SIGCONT it
    byzsgd-fault D restart RANK [--rejoin_timeout S]
                                          start a killed node again (same argv, port, env,
                                          interpreter and package as the run) and wait until
                                          it served a step (exit 1 with the reason if it does not)
    byzsgd-fault D at-step RANK K ACTION [--seconds S]
                                          wait until every correct PS logged step >= K, then
                                          ACTION (kill | pause | resume | restart)
    byzsgd-fault D wait-step K            only the wait of at-step
    byzsgd-fault D netem RANK --dev IF [--netns NS] [--delay 50ms] [--loss 1%] [--apply|--clear]
                                          print (or apply) a tc netem recipe
    byzsgd-fault D status                 ranks, pids, alive/stopped/dead, faults; per restarted
                                          rank the step it rejoined at and how many it served

Nodes are found by the run directory's own records, whatever started them (``byzsgd-launch``,
``python -m byzsgd.launch``, ``scripts/run_exp.sh``, a trainer): ``deployment.json`` (each
rank's argv, port, log, metrics), the pid files ``<role><rank>.pid``, ``run.json`` (the
interpreter and package the run uses) and the credentials.  A pid is trusted only when it is
that rank of this run: a process whose argv names ``--rank RANK --peers RUN_DIR/
deployment.json``, or else one that started before its pid file was written (a recycled pid
starts later).  Nothing is matched by name.

``D/faults.json`` tells the launcher which failures are on purpose.  It is written (under
a lock, atomically) *before* a signal is sent::

    {"faulty": [ranks whose death is not fatal],          # kill, restart
     "paused": [ranks now stopped],                        # pause / resume
     "restarted": {"rank": pid},                           # the pid of the restarted node
     "events": [{"time", "action", "rank", "pid", "step"}]}  # + "reason" (restart_failed)

The launcher does not fail when a rank listed in ``faulty`` exits, does not wait for it,
waits for a restarted PS to exit, and stops restarted nodes when it stops the deployment.
A restart is recorded as ``restarted`` once the new process runs, and as ``restart_failed``
(with the reason) when it exits before serving: the summary reports a rejoin only then
(byzsgd.deploy.summary.rejoins).
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

from byzsgd import rundir  # light: no torch import
from byzsgd.deploy import summary as runsum
from byzsgd.deploy.rank_procs import alive, node_pid, pid_file, proc_state, signal_node, wait_dead
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.metrics import read_metrics

SECRET_FILE_ENV = "BYZSGD_SECRET_FILE"
SECRET_ENVS = ("BYZSGD_SECRET", SECRET_FILE_ENV, "BYZSGD_CREDENTIALS")
FAULTS = rundir.FAULTS
#: how long ``restart`` waits for the restarted rank to serve a step (a node needs ~15-20 s to
#: start on a loaded 2-core box; then a step)
REJOIN_TIMEOUT_S = 180.0


class FaultError(ByzSGDError):
    """A fault that cannot be injected (no such rank, no live process, a restart that did not
    rejoin); the command prints it as one line and exits 1."""


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


_atomic_write = rundir.atomic_write
_locked = rundir.faults_lock
read_faults = rundir.read_faults


def update_faults(run_dir: Path, rank: int, action: str, pid: int | None, *, faulty: bool | None = None,
                  paused: bool | None = None, restarted_pid: int | None | bool = False,
                  **extra) -> dict:
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
                                  step=current_step(run_dir), **extra))
        rundir.write_faults(run_dir, doc)
        return doc


# -- metrics -----------------------------------------------------------------------------
def _records(path: str | None):
    return read_metrics(path) if path else iter(())


def ps_steps(run_dir: Path) -> dict[int, int]:
    """The last completed step logged by each correct PS (-1 when none yet)."""
    load_deployment(run_dir)  # FaultError when there is no deployment (yet)
    return runsum.ps_steps(run_dir)


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
    signal_node(pid, signal.SIGKILL)
    if not wait_dead(pid):
        raise FaultError(f"rank {rank} (pid {pid}) still alive 10 s after SIGKILL")
    return pid


def _live_pid(run_dir: Path, rank: int) -> int:
    """The pid of ``rank``'s live process of this run (FaultError when it has none)."""
    pid = node_pid(run_dir, rank_info(load_deployment(run_dir), rank))
    if pid is None:
        raise FaultError(f"rank {rank} has no live process of this run")
    return pid


def pause(run_dir: Path, rank: int, seconds: float = 0.0) -> int:
    pid = _live_pid(run_dir, rank)
    update_faults(run_dir, rank, "pause", pid, paused=True)
    signal_node(pid, signal.SIGSTOP)
    if seconds > 0:
        time.sleep(seconds)
        resume(run_dir, rank)
    return pid


def resume(run_dir: Path, rank: int) -> int:
    pid = _live_pid(run_dir, rank)
    update_faults(run_dir, rank, "resume", pid, paused=False)
    signal_node(pid, signal.SIGCONT)
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


def restart_command(run_dir: Path, info: dict) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start ``info``'s rank again as the run started it: its
    recorded argv, under the run's interpreter, importing the run's package (``run.json``)
    rather than whatever ``byzsgd`` the current directory or this interpreter would find."""
    cmd = [str(a) for a in info.get("cmd") or ()]
    if not cmd:
        raise FaultError(f"rank {info['rank']} has no recorded command in deployment.json (a "
                         f"multi-host or SLURM rank): restart it through its own launcher")
    run = rundir.read_run_record(run_dir)
    env = node_env(run_dir)
    if run.get("python") and len(cmd) > 1 and cmd[1] in ("-m", "-c"):
        cmd[0] = str(run["python"])
    if run.get("package"):
        root = str(Path(run["package"]).parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return cmd, env


def restart(run_dir: Path, rank: int, *, rejoin_timeout: float = 0.0) -> int:
    """Start rank ``rank`` again with its exact argv (same port), appending to its log; with
    ``rejoin_timeout`` > 0 (the command's default), wait until it served a step.  Refused
    while the rank runs.  Returns the new pid; FaultError when the new process exits before
    it served (recorded as ``restart_failed`` with the reason) or does not serve in time."""
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
    cmd, env = restart_command(run_dir, info)
    # faulty first: the launcher must never take the restarted node's exit for the old one's
    update_faults(run_dir, rank, "restart", None, faulty=True, paused=False)
    log_path = Path(info.get("log") or rundir.rank_file(run_dir, info["role"], rank, "log"))
    with open(log_path, "ab") as log:
        log.write(f"\n=== byzsgd-fault: restarting rank {rank} at {time.strftime('%H:%M:%S')} ===\n".encode())
        log.flush()
        # cwd: the run directory, never a checkout whose byzsgd would shadow the run's package
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, cwd=run_dir, start_new_session=True)
    _atomic_write(pid_file(run_dir, info), str(proc.pid))
    with _locked(run_dir):
        rundir.set_rank_pid(run_dir, rank, proc.pid)
    update_faults(run_dir, rank, "restarted", proc.pid, restarted_pid=proc.pid)
    if rejoin_timeout > 0:
        wait_rejoin(run_dir, rank, proc, log_path, rejoin_timeout)
    return proc.pid


def wait_rejoin(run_dir: Path, rank: int, proc: subprocess.Popen, log: Path, timeout: float,
                poll: float = 0.25) -> dict:
    """Wait until the restarted ``rank`` served a step (summary.rejoins); FaultError with the
    reason when its process exits first, the run ends first, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    started = time.time()
    while True:
        code = proc.poll()  # first: records of the rank count only while its new process lives
        entry = runsum.rejoins(run_dir).get(str(rank)) or {}
        if entry.get("rejoined_step") is not None and code in (None, 0):
            update_faults(run_dir, rank, "rejoined", proc.pid, rejoined_step=entry["rejoined_step"])
            return entry
        if code is not None:
            reason = f"exited {code} before it served a step: {runsum.last_error_line(log) or 'no log line'}"
            update_faults(run_dir, rank, "restart_failed", proc.pid, restarted_pid=None, reason=reason)
            raise FaultError(f"rank {rank} (pid {proc.pid}) {reason} (log {log})")
        summary = run_dir / rundir.SUMMARY
        if summary.exists() and summary.stat().st_mtime > started:
            raise FaultError(f"the run ended before the restarted rank {rank} (pid {proc.pid}) served a step")
        if time.monotonic() > deadline:
            raise FaultError(f"rank {rank} (pid {proc.pid}) runs but served no step in {timeout:.0f} s "
                             f"(log {log})")
        time.sleep(poll)


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


def act(run_dir: Path, action: str, rank: int, seconds: float = 0.0,
        rejoin_timeout: float = REJOIN_TIMEOUT_S) -> str:
    if action == "kill":
        return f"killed rank {rank} (pid {kill(run_dir, rank)})"
    if action == "pause":
        pid = pause(run_dir, rank, seconds)
        return f"paused rank {rank} (pid {pid})" + (f" for {seconds:g} s, resumed" if seconds > 0 else "")
    if action == "resume":
        return f"resumed rank {rank} (pid {resume(run_dir, rank)})"
    if action == "restart":
        pid = restart(run_dir, rank, rejoin_timeout=rejoin_timeout)
        if rejoin_timeout <= 0:
            return f"started rank {rank} again (pid {pid}); its rejoin was not awaited (--rejoin_timeout 0)"
        return f"restarted rank {rank} (pid {pid}): it rejoined{_rejoin_text(runsum.rejoins(run_dir).get(str(rank)))}"
    raise FaultError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")


def status(run_dir: Path) -> list[str]:
    doc = load_deployment(run_dir)
    faults = read_faults(run_dir)
    steps = ps_steps(run_dir)
    rejoined = runsum.rejoins(run_dir)
    lines = []
    for info in doc["ranks"]:
        rank = int(info["rank"])
        pid = node_pid(run_dir, info)
        state = {None: "dead", "T": "stopped", "t": "stopped"}.get(proc_state(pid) if pid else None, "alive")
        extra = f" step {steps[rank]}" if rank in steps else ""
        lines.append(f"{info['role']}{rank} port {info.get('port', '-')} pid {pid or '-'} {state}"
                     f"{' byzantine' if info.get('byzantine') else ''}"
                     f"{' faulty' if rank in faults['faulty'] else ''}{extra}{_rejoin_text(rejoined.get(str(rank)))}")
    return lines


def _rejoin_text(r: dict | None) -> str:
    """How a restarted rank is doing (summary.rejoins): when it served again and how much."""
    if r is None:
        return ""
    if r.get("failed"):
        return f" restart at step {r['restart_step']} failed: {r['failed']}"
    if r["rejoined_step"] is None:
        return f" restarted at step {r['restart_step']}, not aggregated since"
    after = f" ({r['rejoined_after_s']:.1f} s after)" if r["rejoined_after_s"] is not None else ""
    return (f" restarted at step {r['restart_step']}, rejoined at step {r['rejoined_step']}{after},"
            f" served {r['steps_served']} steps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byzsgd-fault", description=__doc__.split("\n\n")[0],
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
    s = sub.add_parser("restart", help="start a killed node again (same argv, port, env, code) and "
                       "wait until it served a step")
    s.add_argument("rank", type=int)
    s.add_argument("--rejoin_timeout", type=float, default=REJOIN_TIMEOUT_S,
                   help="give up (exit 1) when it served no step after S s (0: do not wait)")
    s = sub.add_parser("at-step", help="wait for step K on every correct PS, then act")
    s.add_argument("rank", type=int)
    s.add_argument("step", type=int)
    s.add_argument("action", choices=ACTIONS)
    s.add_argument("--seconds", type=float, default=0.0, help="pause: resume after S s")
    s.add_argument("--timeout", type=float, default=900.0, help="give up after S s")
    s.add_argument("--rejoin_timeout", type=float, default=REJOIN_TIMEOUT_S,
                   help="restart: give up when it served no step after S s (0: do not wait)")
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
            print(act(run_dir, args.command, args.rank, getattr(args, "seconds", 0.0),
                      getattr(args, "rejoin_timeout", REJOIN_TIMEOUT_S)), flush=True)
        elif args.command == "at-step":
            steps = wait_step(run_dir, args.step, timeout=args.timeout)
            print(f"step {args.step} reached (PS steps {steps})", flush=True)
            print(act(run_dir, args.action, args.rank, args.seconds, args.rejoin_timeout), flush=True)
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
    except (ByzSGDError, subprocess.CalledProcessError) as exc:
        print(f"byzsgd-fault: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
