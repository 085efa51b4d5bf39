"""One process per host that imports torch and byzsgd once and forks that host's ranks.

``python -m byzsgd.deploy.fork_server STEM NODE-ARGS... [--next STEM NODE-ARGS...]...``

Why: a multi-host deployment (``scripts/run_exp.sh``, ``scripts/slurm_byzsgd.sbatch``) used to
start one interpreter per rank, each importing torch: 300+ MB of PSS and ~10 s to the first
step per rank.  Forked from one parent that has done the imports, the ranks of a host share
those pages, as the one-machine launcher's nodes do (:mod:`byzsgd.deploy.spawn`).

``NODE-ARGS`` are exactly those of ``python -m byzsgd.deploy.shipped`` (the rank's configuration
file, then per-rank flags, if any): the child runs that entry point on them.  Each rank keeps
the contract of the per-rank wrapper (:data:`byzsgd.deploy.host_scripts.WRAPPER`): its own
session (process group id = its pid, in ``STEM.pgid``), its exact pid in ``STEM.pid`` (both
written once it runs), its output appended to ``STEM.log``, and at its exit ``STEM.rc``: its
exit status, 128 + N when signal N ended it.  Its local index (``BYZSGD_LOCAL_INDEX``) is its
position on the command line.

The server outlives any rank, reaps every child, passes SIGTERM, SIGINT and SIGHUP on to every
rank's process group as SIGTERM (a rank stops cleanly), and exits once every rank has: 0 when
every rank exited 0, else the first non-zero exit status in command-line order (128 + N when a
signal stopped it before it started them all); 2 for a bad command line, 3 when the
interpreter cannot import what a node needs.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from byzsgd.device import LOCAL_INDEX_ENV
from byzsgd.deploy import spawn
from byzsgd.rundir import atomic_write

PROG = "byzsgd.fork_server"
#: the word between two ranks on the command line
NEXT = "--next"
#: imported first, in this order: the first that fails is named (as the exec path's probe does)
NEEDED = ("msgpack", "numpy", "torch", "byzsgd.net")


class UsageError(ValueError):
    """A command line the server cannot read (exit 2)."""


@dataclass
class RankSpec:
    """One rank to fork: where its files go (``STEM.{pid,pgid,log,rc}``) and its node arguments."""
    stem: str
    node_args: list[str]
    pid: int | None = None
    code: int | None = None

    def path(self, suffix: str) -> Path:
        return Path(self.stem + suffix)


def parse(argv: list[str]) -> list[RankSpec]:
    """``STEM NODE-ARGS... [--next STEM NODE-ARGS...]...`` -> one spec per rank."""
    groups: list[list[str]] = [[]]
    for word in argv:
        if word == NEXT:
            groups.append([])
        else:
            groups[-1].append(word)
    specs = []
    for i, group in enumerate(groups):
        if len(group) < 2 or not group[0] or group[0].startswith("-"):
            raise UsageError(f"rank {i} on the command line: expected STEM CONFIG [PER-RANK FLAGS], "
                             f"got {group!r}")
        specs.append(RankSpec(group[0], group[1:]))
    return specs


def exit_status(waitstatus: int) -> int:
    """What a shell's ``$?`` says for a child's wait status: its code, or 128 + N for signal N."""
    code = os.waitstatus_to_exitcode(waitstatus)
    return 128 - code if code < 0 else code


def preload(first_config: str) -> str | None:
    """Import what every rank needs, once; the first module that cannot be imported, as
    ``"module (Error: message)"``, or None.  Everything a rank imports after the fork is its
    own copy: the node's entry point and checks are imported here too, and torch._dynamo when
    the run's optimizer is a torch.optim one (whose constructor, in each rank's optimizer
    check, would otherwise import it: ~1 s of CPU and ~90 MB of private heap a rank; ``sgd``,
    the default, is checked and stepped without it).  Then the first rank's dataset, decoded
    into the cache (:mod:`byzsgd.deploy.spawn`)."""
    import importlib

    for name in NEEDED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - named, then the server stops
            return f"{name} ({type(exc).__name__}: {exc})"
    from byzsgd.deploy import preflight, shipped  # noqa: F401  (the rank's entry point, checks)
    from byzsgd.errors import ByzSGDError
    from byzsgd.learning.optim import steps_flat
    from byzsgd.roles import entry  # noqa: F401

    spawn.preload_roles()
    try:
        cfg = shipped.load(first_config)
    except ByzSGDError:
        return None  # each rank reports its own configuration's error
    if not steps_flat(cfg.optimizer):
        spawn.preload_optimizer()
    spawn.warm_dataset_cache(cfg.dataset, cfg.data_root)
    return None


def _run_node(node_args: list[str]) -> int:
    """The child: ``python -m byzsgd.deploy.shipped NODE-ARGS``, in this process."""
    from byzsgd.deploy.shipped import PROG as NODE_PROG, main
    from byzsgd.roles.process import exit_now

    sys.argv = [NODE_PROG, *node_args]
    exit_now(main(node_args))
    return 1  # not reached: exit_now leaves


class Server:
    """The ranks of this host, their children, and the signals passed on to them."""

    def __init__(self, specs: list[RankSpec]):
        self.specs = specs
        self.pid = os.getpid()
        self.stopped_by: int | None = None

    def on_signal(self, signum: int, _frame=None) -> None:
        if os.getpid() != self.pid:  # a child of warm_dataset_cache (fork_node's block them)
            os._exit(128 + signum)
        self.stopped_by = self.stopped_by or signum
        for spec in self.specs:
            if spec.pid is not None and spec.code is None:
                _terminate(spec.pid)

    def fork_all(self) -> None:
        """Fork each rank (none once a stop signal came), recording its pgid and pid."""
        base = dict(os.environ)
        for index, spec in enumerate(self.specs):
            if self.stopped_by is not None:
                break
            env = dict(base, **{LOCAL_INDEX_ENV: str(index)})
            proc = spawn.fork_node(lambda a=spec.node_args: _run_node(a), str(spec.path(".log")), env,
                                   name="byzsgd.deploy.shipped")
            spec.pid = proc.pid
            try:
                atomic_write(spec.path(".pgid"), f"{proc.pid}\n")  # it leads its own session
                atomic_write(spec.path(".pid"), f"{proc.pid}\n")
            except OSError as exc:
                print(f"{PROG}: cannot write the pid files of {spec.stem}: {exc}", file=sys.stderr)
            print(f"{PROG}: {spec.stem}: pid {proc.pid}", file=sys.stderr, flush=True)
        if self.stopped_by is not None:  # a signal between a fork and its pid's record
            self.on_signal(self.stopped_by)
        # the heap stays frozen: a collection here would write into every page the ranks share

    def reap(self) -> None:
        """Wait for every child; each rank's exit status into its ``.rc`` as it ends."""
        by_pid = {s.pid: s for s in self.specs if s.pid is not None}
        while any(s.code is None for s in by_pid.values()):
            try:
                pid, status = os.wait()  # retried after a signal handler (PEP 475)
            except ChildProcessError:
                break
            spec = by_pid.get(pid)
            if spec is None:
                continue
            spec.code = exit_status(status)
            try:
                atomic_write(spec.path(".rc"), f"{spec.code}\n")
            except OSError as exc:
                print(f"{PROG}: cannot write {spec.stem}.rc: {exc}", file=sys.stderr)
            print(f"{PROG}: {spec.stem}: exit {spec.code}", file=sys.stderr, flush=True)

    def status(self) -> int:
        started = [s for s in self.specs if s.pid is not None]
        for spec in started:
            if spec.code:
                return spec.code
        if len(started) < len(self.specs):
            return 128 + (self.stopped_by or signal.SIGTERM)
        return 0


def _terminate(pid: int) -> None:
    """SIGTERM the rank's process group (its session), or the rank alone before it leads one."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        specs = parse(argv)
    except UsageError as exc:
        print(f"usage: python -m byzsgd.deploy.fork_server STEM CONFIG [PER-RANK FLAGS] "
              f"[{NEXT} STEM CONFIG ...]\n"
              f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    server = Server(specs)
    for sig in spawn.STOP_SIGNALS:
        signal.signal(sig, server.on_signal)
    missing = preload(specs[0].node_args[0])
    if missing:
        print(f"byzsgd-error: {socket.gethostname()}: {sys.executable} cannot import {missing}",
              file=sys.stderr)
        return 3
    server.fork_all()
    server.reap()
    return server.status()


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # nothing to tear down: no interpreter shutdown over torch's modules
