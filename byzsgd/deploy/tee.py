"""PS 0's ``--bench`` / ``--log`` lines on the launcher's terminal, as Garfield's trainer
prints them and ``torchrun --tee`` shows a rank's output: ``[ps0] step 12 takes 0.2310 s``.

The nodes write into their own log files (``ps0.log``); a thread of the launcher follows
PS 0's and prints the per-step lines those two flags ask for, rank-prefixed, over the progress
bar (which stays the default and is redrawn after them).  Nothing else of the log is shown:
the other PSes print the same steps, and ``--quiet`` silences both.
"""
from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import TextIO

#: a PS's per-step lines: ``--bench`` (``step N takes S s``) and ``--log`` (``step N loss L
#: accumulated A``), after the log format's ``<time> ps<r> INFO byzsgd.ps:`` prefix
STEP_LINE = re.compile(r" (ps\d+) INFO byzsgd\.ps: (step \d+ (?:takes \S+ s|loss \S+ accumulated \S+))$")


class Ps0Tee:
    """Follows one log file from its start and prints its per-step lines until :meth:`stop`
    (which prints what was written up to then)."""

    def __init__(self, log_path: Path, out: TextIO | None = None, interval: float = 0.2):
        self.log_path = Path(log_path)
        self.out = out
        self.interval = interval
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="byzsgd-tee", daemon=True)

    @classmethod
    def start_for(cls, dep, lc) -> "Ps0Tee | None":
        """A started tee of PS 0 when the run asks for --bench or --log and is not --quiet."""
        cfg = dep.cfg
        if lc.quiet or not (cfg.bench or cfg.log or lc.node_log) or not dep.nodes:
            return None
        tee = cls(dep.nodes[0].log_path)
        tee._thread.start()
        return tee

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.drain()

    def drain(self) -> None:
        """Print the complete lines appended since the last call."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        out = self.out or sys.stderr
        lines = []
        for raw in complete.decode(errors="replace").splitlines():
            m = STEP_LINE.search(raw)
            if m:
                lines.append(f"[{m.group(1)}] {m.group(2)}")
        if lines:
            clear = "\r\033[K" if out.isatty() else ""  # over the progress bar, redrawn next tick
            out.write(clear + "\n".join(lines) + "\n")
            out.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.drain()
