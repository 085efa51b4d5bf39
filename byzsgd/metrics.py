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
from typing import Any, Iterable, Iterator


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
        """Append ``record``; a value JSON has no form for (bytes, a tensor) is written as its
        ``str``: a record never ends the run that writes it."""
        if self._fh is None:
            return
        record.setdefault("time", time.time())
        self._fh.write(json.dumps(_clean(record), separators=(",", ":"), default=str) + "\n")

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


def gather_diameters(records: dict[int, list[dict[str, Any]]], correct: Iterable[int]) -> list[dict[str, Any]]:
    """Per gather step, the diameter of the **correct** PSes' models before and after it.

    Each PS logs (paper mode) the pairwise distances among the models it gathered at step t
    (``distances_before``, keys ``"i-j"``) and, once its peers' models after the gather came,
    its distance to each of them (``diameter_after`` events, which also carry the
    ``distances_before`` to the peers whose models came after the quorum).  Who is correct is known to the
    experimenter, not to the PSes, so the max over correct pairs is taken here.  A row:
    ``{"step", "before", "after", "pairs_before", "pairs_after", "pairs"}`` — ``pairs`` is how
    many correct pairs exist; a diameter over fewer pairs is a lower bound."""
    correct = sorted(set(correct))
    wanted = {f"{a}-{b}" for i, a in enumerate(correct) for b in correct[i + 1:]}
    before: dict[int, dict[str, float]] = {}
    after: dict[int, dict[str, float]] = {}
    for rank, recs in records.items():
        if rank not in correct:
            continue
        for rec in recs:
            event = rec.get("event")
            if event is None or event == "diameter_after":
                found = [(before, rec.get("distances_before")),
                         (after, rec.get("distances") if event else None)]
            else:
                continue
            for table, dists in found:
                if not isinstance(dists, dict):
                    continue
                target = table.setdefault(int(rec["step"]), {})
                for pair, d in dists.items():
                    if pair in wanted and isinstance(d, (int, float)):
                        target[pair] = max(target.get(pair, 0.0), float(d))
    rows = []
    for step in sorted(set(before) | set(after)):
        b, a = before.get(step, {}), after.get(step, {})
        rows.append(dict(step=step, before=max(b.values()) if b else None,
                         after=max(a.values()) if a else None, pairs_before=len(b), pairs_after=len(a),
                         pairs=len(wanted)))
    return rows


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
