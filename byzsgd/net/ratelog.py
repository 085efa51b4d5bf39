"""Where repeated log lines are bounded: a rate limit per (peer or address, reason).

A node logs why it closed a connection, refused a handshake or a registration.  One line per
event lets whoever causes the events write the log: an outsider's refused connections wrote
138 KB per PS in 33 s, a member reconnecting 1,730 times in 30 s as much (issue 24).  A
:class:`RateLog` lets ``burst`` lines per key ``(who, reason)`` through per ``interval`` and
counts the rest; once the key's interval is over it writes one line::

    suppressed 1234 similar lines (preauth_evicted) from 127.0.0.2 in the last 10 s

Over all keys at most ``max_lines`` lines (those summaries included) are written per interval,
and what that cap holds back is summed into one more line ("... from 517 sources ..."), so a
flood costs O(1) lines per interval however many addresses it comes from.  At most ``max_keys``
keys are tracked (the oldest is retired first), so memory is bounded too.  Counting is exact:
every event is either written or counted in a summary.

Summaries are written by the next call (any key) once an interval is over, and by
:meth:`flush` (a node flushes when it closes); there is no timer, so the module needs no event
loop and tests drive it with a fake ``clock``.  Not thread-safe: one per event loop.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Hashable

__all__ = ["RateLog"]


class _Window:
    __slots__ = ("start", "written", "held", "level")

    def __init__(self, start: float):
        self.start, self.written, self.held, self.level = start, 0, 0, logging.NOTSET


class RateLog:
    """Rate-limited logging onto ``logger``; ``prefix`` starts every summary (e.g. ``"rank 3: "``)."""

    def __init__(self, logger: logging.Logger, prefix: str = "", *, interval: float = 10.0, burst: int = 3,
                 max_lines: int = 30, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic):
        if not interval > 0 or burst < 1 or max_lines < 1 or max_keys < 1:
            raise ValueError("RateLog needs interval > 0 and burst, max_lines, max_keys >= 1")
        self.logger, self.prefix = logger, prefix
        self.interval, self.burst, self.max_lines, self.max_keys = float(interval), burst, max_lines, max_keys
        self.clock = clock
        self._keys: collections.OrderedDict[tuple, _Window] = collections.OrderedDict()  # oldest window first
        self._start: float | None = None   # the global window (max_lines)
        self._written = 0
        self._agg_held = self._agg_sources = 0
        self._agg_level = logging.NOTSET
        self.suppressed = 0                # lines held back so far, in all (for tests and stats)

    # ------------------------------------------------------------------ logging
    def log(self, level: int, who: Hashable, reason: str, msg: str, *args, **kw) -> bool:
        """Write ``msg % args`` at ``level`` unless ``(who, reason)`` used its burst in this
        interval (then count it); returns whether the line was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        self._expire(now)
        key = (who, reason)
        w = self._keys.get(key)
        if w is None:
            if len(self._keys) >= self.max_keys:
                self._retire(*self._keys.popitem(last=False))
            w = self._keys[key] = _Window(now)
        if w.written < self.burst and self._take():
            w.written += 1
            self.logger.log(level, msg, *args, **kw)
            return True
        w.held += 1
        w.level = max(w.level, level)
        self.suppressed += 1
        return False

    def warning(self, who: Hashable, reason: str, msg: str, *args, **kw) -> bool:
        return self.log(logging.WARNING, who, reason, msg, *args, **kw)

    def info(self, who: Hashable, reason: str, msg: str, *args, **kw) -> bool:
        return self.log(logging.INFO, who, reason, msg, *args, **kw)

    def flush(self) -> None:
        """Write every pending summary now (at close: nothing counted goes unreported)."""
        while self._keys:
            self._retire(*self._keys.popitem(last=False))
        self._write_aggregate(self.clock())

    # ------------------------------------------------------------------ windows
    def _take(self) -> bool:
        if self._written >= self.max_lines:
            return False
        self._written += 1
        return True

    def _expire(self, now: float) -> None:
        if self._start is None:
            self._start = now
        elif now - self._start >= self.interval:
            self._write_aggregate(now)
            self._start, self._written = now, 0
        keys = self._keys
        while keys:
            key, w = next(iter(keys.items()))
            if now - w.start < self.interval:
                break
            del keys[key]
            self._retire(key, w)

    def _retire(self, key: tuple, w: _Window) -> None:
        if not w.held:
            return
        if self._take():
            who, reason = key
            self.logger.log(w.level, "%ssuppressed %d similar lines (%s) from %s in the last %.0f s",
                            self.prefix, w.held, reason, who, self.interval)
        else:
            self._agg_held += w.held
            self._agg_sources += 1
            self._agg_level = max(self._agg_level, w.level)

    def _write_aggregate(self, now: float) -> None:
        if self._agg_held:
            span = max(self.interval, now - (self._start if self._start is not None else now))
            self.logger.log(self._agg_level, "%ssuppressed %d more lines from %d sources in the last %.0f s",
                            self.prefix, self._agg_held, self._agg_sources, span)
            self._agg_held = self._agg_sources = 0
            self._agg_level = logging.NOTSET
