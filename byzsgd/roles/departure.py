"""When a worker may leave: every PS said ``done``, or q_ps did and nothing came for a while.

A crashed or Byzantine PS never says ``done``, so waiting for all of them could last
forever; leaving as soon as q_ps = n_ps - fps did could abandon a correct PS still finishing
its last steps.  So once q_ps PSes are done the worker lingers: it stays while anything
arrives (a request, a model: :meth:`Departure.wake`) and leaves after LINGER_S of silence.
"""
from __future__ import annotations

import asyncio

from byzsgd.net import Message

#: After q_ps PSes said "done", leave once nothing came for this long.
LINGER_S = 5.0


class Departure:
    def __init__(self, num_ps: int, q_ps: int, *, linger: float = LINGER_S):
        self.num_ps = num_ps
        self.q_ps = q_ps
        self.linger = linger
        self.done_from: set[int] = set()
        self.wakeup = asyncio.Event()  # set by each arrival the worker cares about

    def deliver(self, msg: Message) -> None:
        """The node's handler of ``done``."""
        msg.release()
        if type(msg.sender) is int and 0 <= msg.sender < self.num_ps:  # PSes only, once each
            self.done_from.add(msg.sender)
            self.wakeup.set()

    def wake(self) -> None:
        """Something arrived: the worker has work, and lingers on."""
        self.wakeup.set()

    @property
    def all_done(self) -> bool:
        return len(self.done_from) >= self.num_ps

    async def idle(self) -> bool:
        """Wait for the next arrival; False when it is time to leave instead."""
        if self.all_done:
            return False
        self.wakeup.clear()
        if len(self.done_from) >= self.q_ps:
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.linger)
            except asyncio.TimeoutError:
                return False
        else:
            await self.wakeup.wait()
        return True

    async def wait(self) -> None:
        """Until it is time to leave."""
        while await self.idle():
            pass
