"""Mode ``garfield`` (the default; docs/design.md §3): each PS drives its own learning.

PS: pushes its model of step t to every worker as the gradient request, takes the first
q_w gradients, steps, and gathers q_ps models (own included) after **every** step.

Worker: serves gradient requests.  The request of PS p for step t carries p's model; the
worker computes the gradient of *its batch for step t* on that model and replies to p.
Every PS asking for step t gets the gradient of the same batch.

Request discipline (a Byzantine PS may flood requests): only the newest request of each PS
is kept (a request superseded while the worker was busy is never computed: the PS has moved
on and would drop the answer anyway); a PS's request is answered once per step and only for
a step above the last one answered to it (replays and copies are dropped) -- save the PS's
own re-send after --resend_after (its gradient was lost), answered once more; and the
PSes with a pending request are served round-robin in rank order, so a PS that re-sends
requests gets at most its turn, never another PS's.  A PS that restarted behind the steps it
was answered rejoins through its peers' models (the jump), not through the workers.  A request
for a step at or beyond --num_iter is refused: no correct PS asks for one.

Leaving (:mod:`byzsgd.roles.departure`): each request and each answer is reported to the
worker's ``departure``, which alone says whether it was work; the loop checks between two
gradients whether the time is up, so a PS that keeps a request pending cannot hold it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from byzsgd.config import RunConfig
from byzsgd.net import Message
from byzsgd.roles import scheduled_attacker
from byzsgd.roles.messages import KIND_MODEL
from byzsgd.roles.ps_base import PSBase
from byzsgd.roles.worker_base import WorkerBase

log = logging.getLogger("byzsgd.worker")


class GarfieldPS(PSBase):
    def _gathers_after(self, t: int) -> bool:
        return True


class GarfieldWorker(WorkerBase):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.pending: dict[int, Message] = {}  # each PS's newest request
        # each PS's last step answered: (step, when, re-answered already)
        self.answered: dict[int, tuple[int, float, bool]] = {}
        self.turn = -1  # the PS served last: the next turn goes to the next rank after it
        self.refused = 0  # requests dropped: copies, replays, superseded
        self.accept(KIND_MODEL, self._on_request, shapes=[(self.replica.state_size,)])
        # test harness --scheduled_byzantine: this Byzantine worker forges from the PSes' leaks
        self.scheduled = scheduled_attacker.attach(self)

    def _on_request(self, msg: Message) -> None:
        sender = msg.sender
        if msg.step >= self.cfg.num_iter:  # beyond the last step: no correct PS asks this
            self.refused += 1
            msg.release()
            return
        old = self.pending.get(sender)
        last, when, again = self.answered.get(sender, (-1, 0.0, True))
        floor = last
        if old is not None:
            floor = max(floor, old.step)
        elif msg.step == last and not again and time.monotonic() - when >= self.cfg.resend_after / 2:
            # the PS's re-send of a request whose gradient it did not get: once more
            self.answered[sender] = (last, when, True)
            floor = last - 1
        if msg.step <= floor:  # a copy, a replay, or older than what the PS asked already
            self.refused += 1
            msg.release()
            return
        if old is not None:
            old.release()
            self.refused += 1
        self.pending[sender] = msg
        self.departure.arrived(sender, msg.step)

    def _next(self) -> int:
        """The PS whose pending request is served now: the first after the last served, in
        rank order (round-robin)."""
        ranks = sorted(self.pending)
        after = [r for r in ranks if r > self.turn]
        return after[0] if after else ranks[0]

    async def _steps(self) -> None:
        """Answer the pending requests round-robin over the PSes, until it is time to leave."""
        departure = self.departure
        while True:
            while self.pending:
                if departure.expired():  # requests keep coming, but the time is up
                    break
                sender = self.turn = self._next()
                msg = self.pending.pop(sender)
                if self.answered.get(sender, (-1,))[0] != msg.step:
                    self.answered[sender] = (msg.step, time.monotonic(), False)
                try:
                    if self.scheduled is not None:  # waits (bounded) for the PS's leaks
                        await self.scheduled.answer(sender, msg.step, msg.tensors[0])
                    else:
                        self._answer_steps({sender: msg.step}, msg.step, msg.tensors[0])
                finally:
                    msg.release()
                departure.served(sender, msg.step)
                await asyncio.sleep(0)  # let freshly arrived requests supersede older ones
            if not await departure.idle():
                log.info("worker %d leaves: %s", self.cfg.rank, departure.why)
                return

    async def _shutdown(self) -> None:
        for msg in self.pending.values():
            msg.release()
        self.pending.clear()
        await super()._shutdown()
