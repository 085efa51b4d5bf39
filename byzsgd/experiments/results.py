"""The results file of an experiment grid: JSON lines, one per finished cell (the last line
of a key wins); written by :mod:`byzsgd.experiments.grid`, read by it and by the report."""
from __future__ import annotations

import json
import os
from pathlib import Path

from byzsgd.metrics import read_metrics


def read_results(path: str | os.PathLike) -> list[dict]:
    """Records of a results file (a truncated last line is skipped); last record per key."""
    latest: dict[str, dict] = {}
    for rec in read_metrics(path):
        if isinstance(rec, dict) and "key" in rec:
            latest.pop(rec["key"], None)
            latest[rec["key"]] = rec
    return list(latest.values())


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
    with open(path, "a+b") as fh:
        # a line cut by a crash mid-write must not swallow this one: start a fresh line
        fh.seek(0, os.SEEK_END)
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = "\n" + line
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
