"""Metrics: one JSON object per line, flushed as written, so a crash loses nothing.

The launcher's progress bar, the experiment harness and the benchmarks read these files
while the deployment runs (``read_metrics`` tolerates a half-written last line).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as strings so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Append-only JSON-lines file; every record gets the wall time ``time``."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, **record: Any) -> None:
        if self._fh is None:
            return
        record.setdefault("time", time.time())
        self._fh.write(json.dumps(_clean(record), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def diameter(rows) -> float:
    """Largest pairwise Euclidean distance between the rows of a [n, d] tensor.

    The quantity the gather phase contracts (ByzSGD's DMC); NaN rows give NaN."""
    import torch

    if rows.shape[0] < 2:
        return 0.0
    return float(torch.cdist(rows.double(), rows.double()).max())


def read_metrics(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a metrics file; a truncated last line (writer still running) is skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:  # a line still being written
                    continue
    except OSError:  # not there (yet), or unreadable: nothing to report
        return
