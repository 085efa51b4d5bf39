"""When a worker may leave: a bound that no Byzantine PS can extend (docs/design.md §3, Liveness).

A crashed or Byzantine PS never says ``done``, so waiting for all of them could last forever;
leaving the moment q_ps = n_ps - fps did could abandon a correct PS still finishing its last
steps; and lingering "while anything arrives" let one Byzantine PS keep every worker running
by sending a request now and then (issue 24).  The rules:

* **The end begins** when q_ps PSes said ``done``, or when the worker has answered the last
  step (num_iter - 1) to q_ps PSes (a ``done`` lost in a dead outbox cannot keep it either).
  Before that the worker never leaves on silence; when all n_ps said ``done`` it leaves at once.
* **Work** is only a request (garfield: a ``model`` to answer; paper: a PS model) from a PS
  that has not said ``done``, for a step below num_iter that this PS did not ask before (its
  newest step so far), and the answer to such a request.  Copies, replays, steps at or beyond
  the last one, anything from a PS that said done: no work.
* After the end began, the worker leaves after LINGER_S without work (a correct PS behind
  its peers is still served while it asks step after step) and **at the latest LEAVE_BY_S
  after the end began, whatever arrives**: the only way to extend the stay is fresh steps
  below num_iter from a PS not done, and they stop counting then.

So a correct worker's loop ends at most LEAVE_BY_S after the q_ps-th ``done`` (LINGER_S when no
PS still asks for steps), plus the gradient it is computing; its node then closes within
``roles.base.DRAIN_S``.  :meth:`Departure.leaving` says why (:attr:`Departure.why`).
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

from byzsgd.net import Message

#: After the end began, leave once no work came for this long.
LINGER_S = 5.0
#: After the end began, leave at the latest this much later, whatever arrives.
LEAVE_BY_S = 30.0


class Departure:
    """A worker's leaving rules (module docstring); ``clock`` is a monotonic clock (a fake
    one in tests)."""

    def __init__(self, num_ps: int, q_ps: int, *, num_iter: int | None = None,
                 linger: float = LINGER_S, leave_by: float = LEAVE_BY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.num_ps = num_ps
        self.q_ps = q_ps
        self.num_iter = num_iter  # None: no last step known (then only dones begin the end)
        self.linger = linger
        self.leave_by = leave_by
        self.clock = clock
        self.done_from: set[int] = set()
        self.served_last: set[int] = set()  # PSes answered the last step
        self.began: float | None = None  # when the end began (clock)
        self.last_work = -math.inf
        self.newest: dict[int, int] = {}  # per PS, the newest step that counted as work
        self.answered: dict[int, int] = {}  # per PS, the newest step whose answer counted
        self.why: str | None = None  # set when it is time to leave
        self.wakeup = asyncio.Event()  # set by each arrival: the worker's loop looks again

    def _is_ps(self, sender) -> bool:
        return type(sender) is int and 0 <= sender < self.num_ps

    def _begin(self) -> None:
        if self.began is None:
            self.began = self.clock()

    # -- what arrives -----------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        """The node's handler of ``done`` (PSes only, once each)."""
        msg.release()
        if self._is_ps(msg.sender) and msg.sender not in self.done_from:
            self.done_from.add(msg.sender)
            if len(self.done_from) >= self.q_ps:
                self._begin()
            self.wakeup.set()

    def arrived(self, sender: int, step: int) -> bool:
        """A request or model of PS ``sender`` for ``step`` came: the loop wakes.  Returns
        whether it counts as work (module docstring)."""
        self.wakeup.set()
        if (not self._is_ps(sender) or sender in self.done_from or type(step) is not int
                or step <= self.newest.get(sender, -1)
                or (self.num_iter is not None and step >= self.num_iter)):
            return False
        self.newest[sender] = step
        self.last_work = self.clock()
        return True

    def served(self, sender: int, step: int) -> None:
        """The worker sent PS ``sender`` its gradient for ``step``.  The answer to a request
        that was work starts a new quiet period (the PS steps before it asks again), once
        per request; the last step answered to q_ps PSes begins the end."""
        if not self._is_ps(sender) or type(step) is not int:
            return
        if (sender not in self.done_from and step == self.newest.get(sender)
                and step > self.answered.get(sender, -1)):
            self.answered[sender] = step
            self.last_work = self.clock()
        if self.num_iter is not None and step >= self.num_iter - 1:
            self.served_last.add(sender)
            if len(self.served_last) >= self.q_ps:
                self._begin()

    # -- when to leave ------------------------------------------------------------------
    @property
    def all_done(self) -> bool:
        return len(self.done_from) >= self.num_ps

    def due(self) -> float | None:
        """When (clock) the worker leaves unless work comes first; None before the end began."""
        if self.began is None:
            return None
        quiet = max(self.began, self.last_work) + self.linger
        return min(quiet, self.began + self.leave_by)

    def expired(self) -> bool:
        """The end began and its time is up (what a busy loop checks between gradients)."""
        due = self.due()
        if due is None or self.clock() < due:
            return False
        if self.why is None:
            began = (f"{len(self.done_from)} of {self.num_ps} PSes said done"
                     if len(self.done_from) >= self.q_ps
                     else f"the last step answered to {len(self.served_last)} PSes")
            if self.clock() >= self.began + self.leave_by:
                self.why = f"{began}, {self.leave_by:g} s ago (the most a worker stays after that)"
            else:
                self.why = f"{began}, then no work for {self.linger:g} s"
        return True

    def leaving(self) -> bool:
        """Whether it is time to leave: every PS said done, or :meth:`expired`."""
        if self.all_done:
            if self.why is None:
                self.why = f"all {self.num_ps} PSes said done"
            return True
        return self.expired()

    async def idle(self) -> bool:
        """Wait for the next arrival; False when it is time to leave instead."""
        if self.leaving():
            return False
        self.wakeup.clear()
        due = self.due()
        if due is None:
            await self.wakeup.wait()
        else:
            try:
                await asyncio.wait_for(self.wakeup.wait(), max(0.0, due - self.clock()))
            except asyncio.TimeoutError:
                pass
        return not self.leaving()

    async def wait(self) -> None:
        """Until it is time to leave."""
        while await self.idle():
            pass
