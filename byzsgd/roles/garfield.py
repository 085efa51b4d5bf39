"""Mode ``garfield`` (the default; DESIGN.md §3): each PS drives its own learning.

PS: pushes its model of step t to every worker as the gradient request, takes the first
q_w gradients, steps, and gathers q_ps models (own included) after **every** step.

Worker: serves gradient requests.  The request of PS p for step t carries p's model; the
worker computes the gradient of *its batch for step t* on that model and replies to p.
Every PS asking for step t gets the gradient of the same batch.  Only the newest request of
each PS is kept: a request superseded while the worker was busy is never computed (the PS
has moved on and would drop the answer anyway).
"""
from __future__ import annotations

import asyncio

from byzsgd.config import RunConfig
from byzsgd.net import Message
from byzsgd.roles.common import KIND_MODEL
from byzsgd.roles.ps_base import PSBase
from byzsgd.roles.worker_base import WorkerBase


class GarfieldPS(PSBase):
    def _gathers_after(self, t: int) -> bool:
        return True


class GarfieldWorker(WorkerBase):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.pending: dict[int, Message] = {}  # each PS's newest request
        self.node.on(KIND_MODEL, self._on_request, shapes=[(self.replica.state_size,)])

    def _on_request(self, msg: Message) -> None:
        old = self.pending.get(msg.sender)
        if old is not None:
            if old.step > msg.step:  # a replayed/old request: keep the newer one
                msg.release()
                return
            old.release()
        self.pending[msg.sender] = msg
        self.departure.wake()

    async def _steps(self) -> None:
        """Answer the pending request with the lowest step first, until it is time to leave."""
        while True:
            while self.pending:
                sender = min(self.pending, key=lambda r: (self.pending[r].step, r))
                msg = self.pending.pop(sender)
                try:
                    self._answer_steps({sender: msg.step}, msg.step, msg.tensors[0])
                finally:
                    msg.release()
                await asyncio.sleep(0)  # let freshly arrived requests supersede older ones
            if not await self.departure.idle():
                return

    async def _shutdown(self) -> None:
        for msg in self.pending.values():
            msg.release()
        self.pending.clear()
        await super()._shutdown()
