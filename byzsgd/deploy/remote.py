"""Running a shell script on a host through the *runner* (``ssh`` by default, ``ip netns exec``,
``local``, any command that runs ``sh -s`` there): the one way a multi-host deployment reaches a
host, with the script on stdin so that nothing secret is ever on a command line.
"""
from __future__ import annotations

import shlex
import subprocess
import threading
from typing import Any, Iterable

def runner_argv(runner: str, host: str) -> list[str]:
    """The local command that runs ``sh -s`` on ``host`` (script on its stdin)."""
    if runner.strip() in ("", "local"):
        return ["sh", "-s"]
    words = shlex.split(runner)
    if any("{host}" in w for w in words):
        words = [w.replace("{host}", host) for w in words]
    else:
        words.append(host)
    return words + ["sh", "-s"]


def run_script(runner: str, host: str, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``script`` with ``sh`` on ``host`` through the runner (never raises on failure)."""
    argv = runner_argv(runner, host)
    try:
        return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # TimeoutExpired carries the partial output as bytes even under text=True
        out = exc.stdout or b""
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        return subprocess.CompletedProcess(argv, 124, out, f"runner timed out after {timeout}s")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", f"cannot run {argv[0]!r}: {exc}")


def parallel(fn, items: Iterable) -> list:
    """``[fn(x) for x in items]``, one thread each (runner calls are I/O bound)."""
    items = list(items)
    results: list[Any] = [None] * len(items)

    def one(i, x):
        results[i] = fn(x)

    threads = [threading.Thread(target=one, args=(i, x), daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
