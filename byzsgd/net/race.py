"""Run a piece of work unless something else happens first: the one race every loop needs.

A node's waits are abandoned for one of a few reasons — a stop signal, every peer said it is
done, enough peers got ahead — and each must leave nothing behind: the loser is cancelled and
awaited (so its ``finally`` blocks run and its buffers go back) before the caller goes on.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable

__all__ = ["race"]


async def race(work: Awaitable, rival: Awaitable) -> tuple[bool, Any]:
    """``(True, result)`` if ``work`` finishes first (its exception propagates), else
    ``(False, None)`` once ``rival`` completes, ``work`` cancelled and awaited.

    When both are done together, ``work`` wins.  The rival is cancelled if it lost; if the
    caller itself is cancelled, both are."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(rival)
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        stopper.cancel()
        raise
    if not stopper.done():
        stopper.cancel()
    elif not stopper.cancelled():
        stopper.exception()  # a rival that failed still ends the race; nothing to report
    if task.done():
        return True, task.result()
    task.cancel()
    await asyncio.wait({task})  # its cleanup runs now; a CancelledError of ours still propagates
    if not task.cancelled():
        task.exception()  # retrieved: whatever it raised while cancelled does not matter now
    return False, None
