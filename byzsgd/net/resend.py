"""Wait for a quorum, asking the silent ranks again each time the wait times out.

A request can be lost for good: the peer restarted, or the connection dropped with it in an
outbox.  So a quorum wait is a loop of bounded waits (:meth:`Mailbox.collect` or
:meth:`NewestModels.collect` with a ``timeout``): each :class:`errors.QuorumTimeout` says who
answered, the others get the request again, and the wait goes on.  It never gives up — a
stall is reported once, the node keeps serving — and it can be abandoned when something
else makes the quorum pointless (``interrupt``: e.g. enough peers got ahead).
"""
from __future__ import annotations

import time
from typing import Any, Awaitable, Callable, Collection

from . import errors
from .race import race

__all__ = ["until_quorum"]


async def until_quorum(wait: Callable[[], Awaitable[Any]], ranks: Collection[int], *,
                       resend: Callable[[list[int]], None] | None = None,
                       interrupt: Callable[[], Awaitable] | None = None,
                       stall_after: float | None = None,
                       on_stall: Callable[[float, list[int]], None] | None = None) -> Any:
    """The result of ``wait()``, called again after each :class:`errors.QuorumTimeout`.

    After a timeout, ``resend(silent)`` gets the ranks of ``ranks`` that had not answered
    (in ``ranks``' order; not called when none is silent).  Once more than ``stall_after``
    seconds have passed, ``on_stall(waited_s, sorted answered ranks)`` is called, once.
    ``interrupt()``, when given, makes a fresh awaitable per attempt; if it completes
    before the quorum, the wait is cancelled and None returned."""
    started = time.monotonic()
    stalled = False
    while True:
        try:
            if interrupt is None:
                return await wait()
            finished, result = await race(wait(), interrupt())
            if not finished:
                return None
            return result
        except errors.QuorumTimeout as exc:
            answered = set(exc.received or {})
            silent = [r for r in ranks if r not in answered]
            if resend is not None and silent:
                resend(silent)
            waited = time.monotonic() - started
            if stall_after is not None and waited > stall_after and not stalled:
                stalled = True
                if on_stall is not None:
                    on_stall(waited, sorted(answered))
