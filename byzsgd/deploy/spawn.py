"""Starting node processes fast: fork them from a parent that has already imported torch.

Importing torch and byzsgd costs a node ~2-4 s of CPU; a deployment of 11 nodes on 2 cores
spends most of its start-up there.  On Linux the launcher imports the roles once and forks
each node from itself ("zygote"): the child starts its own session, points stdout/stderr at
its log, takes its environment and runs the node (``run_role(cfg)``) on the configuration
the launcher holds: no argv is written nor parsed again.  The parent has run no torch computation and
holds no threads when it forks, so the children start clean.  ``exec`` mode (a plain
``subprocess.Popen`` of the same command) stays available everywhere.  A multi-host
deployment's per-host fork server (:mod:`byzsgd.deploy.fork_server`) forks its ranks the same way.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable

FORK_AVAILABLE = hasattr(os, "fork") and sys.platform.startswith("linux")
#: what a parent of forked nodes may handle (and a node must not inherit a handler of)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ForkedProcess:
    """The part of ``subprocess.Popen``'s interface the launcher uses, for a forked child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = self.returncode if self.returncode is not None else 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(delay)  # the launcher waiting on a child, not a node polling a peer
            delay = min(delay * 2, 0.05)
        return self.returncode


def preload_roles() -> None:
    """Import what every node needs, once, in the parent; then move every object the imports
    made out of the garbage collector's reach (``gc.freeze``): a child's collections would
    otherwise write into each of them and copy every page of the shared heap into the child."""
    import byzsgd.roles.nodes  # noqa: F401

    _freeze_heap()


def preload_optimizer() -> None:
    """Import torch._dynamo in the parent, for PSes whose optimizer is a torch.optim one: its
    first ``step()`` imports it (sympy, triton: 2-9 s of CPU and ~80 MB of heap), once here
    rather than once per PS.  Every forked node then maps those pages and its PSS counts a
    share of them: ``sgd`` (the default) does without (:func:`byzsgd.learning.optim.steps_flat`)."""
    import torch._dynamo  # noqa: F401  (it starts no thread)

    _freeze_heap()


def _freeze_heap() -> None:
    import gc

    gc.collect()
    gc.freeze()


def warm_dataset_cache(dataset: str, data_root: str | None, timeout: float = 600.0) -> bool:
    """Decode ``dataset`` (train and test) into the dataset cache once, in a short-lived forked
    child, so that the nodes memory-map it instead of each decoding it (the parent imports no
    decoder and starts no thread).  False when it could not (the nodes then read the source
    themselves, as without a cache)."""
    from byzsgd.learning.dataset import cache_dir

    if not FORK_AVAILABLE or cache_dir() is None:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from byzsgd.learning import data

            for train in (True, False):
                data.load_dataset(dataset, train=train, root=data_root)
            code = 0
        except BaseException:  # noqa: BLE001 - the nodes report a missing dataset themselves
            code = 1
        finally:
            os._exit(code)
    try:
        return ForkedProcess(pid).wait(timeout) == 0
    except subprocess.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return False


def fork_node(target: Callable[[], int], log_path: str, env: dict[str, str], *,
              name: str = "byzsgd-node") -> ForkedProcess:
    """Fork a child that runs ``target()`` (its return value: the exit code) with ``env``,
    output to ``log_path``; ``name`` is its ``sys.argv[0]``.

    The stop signals are blocked across the fork: one that reaches the child before it has
    dropped the parent's handlers waits, and then takes the default action (a handler of the
    parent's, say one that forwards a SIGTERM to every node, must never run in a node)."""
    sys.stdout.flush()
    sys.stderr.flush()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return ForkedProcess(pid)
    code = 1
    try:  # the child: never return into the launcher's code
        os.setsid()
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            if sig != signal.SIGHUP or callable(signal.getsignal(sig)):  # nohup's SIG_IGN stays
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        # whatever the parent had bound to sys.stdout/stderr (a capture, a terminal wrapper)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [name]
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, then leave
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)
