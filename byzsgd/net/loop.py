"""Where the event loop is chosen: uvloop when importable, plain asyncio otherwise.

uvloop's ``BufferedProtocol`` path is what makes the transport reach raw-socket throughput and a
22 µs round trip (default asyncio: 51-60 µs, docs/design.md §9); everything also works on asyncio.
"""
from __future__ import annotations

import asyncio

try:  # pragma: no cover - depends on the platform
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

__all__ = ["install_event_loop", "run", "HAVE_UVLOOP", "new_event_loop"]

HAVE_UVLOOP = uvloop is not None


def install_event_loop() -> bool:
    """Make new event loops uvloop loops if uvloop is importable.  Returns whether it is."""
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return True
    return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(coro, *, debug: bool | None = None):
    """``asyncio.run`` on a uvloop loop when available (does not change the global policy)."""
    if uvloop is not None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop, debug=debug) as runner:
            return runner.run(coro)
    return asyncio.run(coro, debug=debug)
