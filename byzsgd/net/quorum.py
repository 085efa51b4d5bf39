"""Where a quorum is counted: a per-kind mailbox of messages indexed by (step, sender).

The ByzSGD protocol needs "the first q distinct senders for step t, as they arrive, never
waiting for the others" (docs/design.md §3).  A :class:`Mailbox` files each delivered message under its
step and sender and completes a pending :meth:`Mailbox.collect` the moment the q-th distinct
allowed sender arrives: an ``asyncio.Future`` resolved from ``deliver``, no polling, no sleeps.

Rules (a Byzantine sender must never count twice nor make the node buffer without bound):

* a sender contributes at most once per step (duplicates are dropped);
* steps below the *floor* are stale and dropped; the floor moves to ``t + 1`` when step ``t`` is
  collected, or to ``s`` with ``advance(s)``;
* future steps are buffered only within ``[floor, floor + window)``: at most ``window`` messages
  per sender;
* with ``senders`` set, only those ranks are accepted.

Ownership: every message a mailbox drops is ``release()``-d by it; the messages a ``collect``
returns belong to the caller (release them when done).  Single-threaded: call it from the
node's event loop.
"""
from __future__ import annotations

import asyncio
from typing import Collection

from . import errors
from .frame import Message

__all__ = ["Mailbox"]


class _Waiter:
    __slots__ = ("step", "q", "senders", "future", "timer")

    def __init__(self, step, q, senders, future):
        self.step, self.q, self.senders, self.future, self.timer = step, q, senders, future, None


class Mailbox:
    def __init__(self, kind: str = "", *, window: int = 8, senders: Collection[int] | None = None,
                 floor: int = 0):
        if type(window) is not int or window < 1:
            raise errors.ConfigError(f"mailbox window must be an int >= 1, got {window!r}")
        self.kind = kind
        self.window = window
        self.senders = None if senders is None else frozenset(senders)
        self.floor = floor
        self._steps: dict[int, dict[int, Message]] = {}
        self._waiters: dict[int, list[_Waiter]] = {}
        self._cancelled = False
        self.dropped = 0

    # ------------------------------------------------------------------ filing
    def deliver(self, msg: Message) -> bool:
        """File ``msg``; False (and ``msg.release()``) if it is refused."""
        step, sender = msg.step, msg.sender
        if (self._cancelled or step < self.floor or step >= self.floor + self.window
                or (self.senders is not None and sender not in self.senders)):
            return self._drop(msg)
        box = self._steps.setdefault(step, {})
        if sender in box:
            return self._drop(msg)
        box[sender] = msg
        for w in self._waiters.get(step, ()):
            if not w.future.done() and (w.senders is None or sender in w.senders):
                self._try_complete(w)
        return True

    def _drop(self, msg: Message) -> bool:
        self.dropped += 1
        msg.release()
        return False

    # ------------------------------------------------------------------ quorums
    async def collect(self, step: int, q: int, *, senders: Collection[int] | None = None,
                      timeout: float | None = None) -> dict[int, Message]:
        """The first ``q`` distinct allowed senders' messages for ``step`` (sender -> Message).

        Completes immediately if they are already buffered.  Afterwards the floor is ``step + 1``
        (later arrivals for ``<= step`` are dropped) and extra buffered messages of ``step`` are
        released.  ``timeout`` -> :class:`errors.QuorumTimeout` (its ``received`` lists what
        arrived; the messages stay buffered so a later collect can still use them).
        """
        if self._cancelled:
            raise asyncio.CancelledError("mailbox cancelled")
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if step < self.floor:
            raise errors.StaleStep(f"{self.kind!r} step {step} is below the floor {self.floor}")
        if type(q) is not int or q < 0:
            raise ValueError(f"q must be a non-negative int, got {q!r}")
        allowed = None if senders is None else frozenset(senders)
        if self.senders is not None:
            allowed = self.senders if allowed is None else allowed & self.senders
        if allowed is not None and q > len(allowed):
            raise ValueError(f"quorum q={q} exceeds the {len(allowed)} allowed senders")
        loop = asyncio.get_running_loop()
        w = _Waiter(step, q, allowed, loop.create_future())
        self._waiters.setdefault(step, []).append(w)
        self._try_complete(w)
        if timeout is not None and not w.future.done():
            w.timer = loop.call_later(timeout, self._expire, w)
        try:
            return await w.future
        finally:
            if w.timer is not None:
                w.timer.cancel()
            lst = self._waiters.get(step)
            if lst is not None and w in lst:
                lst.remove(w)
                if not lst:
                    del self._waiters[step]

    def _eligible(self, w: _Waiter) -> dict[int, Message]:
        box = self._steps.get(w.step, {})
        if w.senders is None:
            return box
        return {s: m for s, m in box.items() if s in w.senders}

    def _try_complete(self, w: _Waiter) -> None:
        got = self._eligible(w)
        if len(got) < w.q:
            return
        box = self._steps.get(w.step, {})
        chosen = {}
        for s, m in box.items():  # dicts keep arrival order: the first q win
            if s in got:
                chosen[s] = m
                if len(chosen) == w.q:
                    break
        for s in chosen:
            del box[s]
        w.future.set_result(chosen)
        self._set_floor(w.step + 1)

    def _expire(self, w: _Waiter) -> None:
        if not w.future.done():
            w.future.set_exception(errors.QuorumTimeout(self.kind, w.step, w.q, dict(self._eligible(w))))

    def advance(self, step: int) -> None:
        """Move the floor up to ``step`` (never down); drop and release everything below."""
        if step > self.floor:
            self._set_floor(step)

    def _set_floor(self, floor: int) -> None:
        self.floor = max(self.floor, floor)
        for s in [s for s in self._steps if s < self.floor]:
            for m in self._steps.pop(s).values():
                m.release()
                self.dropped += 1
        for s in [s for s in self._waiters if s < self.floor]:
            for w in self._waiters[s]:
                if not w.future.done():
                    w.future.set_exception(errors.StaleStep(
                        f"{self.kind!r} step {s}: the floor moved to {self.floor}"))

    # ------------------------------------------------------------------ helpers
    def pending(self, step: int) -> dict[int, Message]:
        """What is buffered for ``step`` (still owned by the mailbox)."""
        return dict(self._steps.get(step, {}))

    def latest(self) -> int | None:
        """The highest step with a buffered message, or None."""
        steps = [s for s, b in self._steps.items() if b]
        return max(steps) if steps else None

    def __len__(self) -> int:
        return sum(len(b) for b in self._steps.values())

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def close(self) -> None:
        """Cancel pending collects (they raise CancelledError), release everything, and refuse
        later deliveries."""
        self._cancelled = True
        for lst in self._waiters.values():
            for w in lst:
                w.future.cancel()
        for b in self._steps.values():
            for m in b.values():
                m.release()
        self._steps.clear()

    cancel = close  # the name the node calls at shutdown
