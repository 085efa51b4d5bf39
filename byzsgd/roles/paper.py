"""Mode ``paper``: the full ByzSGD of El-Mhamdi et al. (PODC 2020; Distributed Computing 35, 2022).

PS: pushes its model of step t to every worker, aggregates q_w gradients with --gar (MDA by
default), steps; scatter phase for T = --gather_period steps (``auto``: the authors'
int(1 / (3 l lr))), then a gather phase: DMC, the coordinate-wise median of q_ps models.  It measures the diameter of the correct models
around each gather (:mod:`byzsgd.roles.diameter`).

Worker: at step t takes the first q_ps PS models of step >= t, aggregates them with the
coordinate-wise median, computes **one** gradient and sends it to every PS.  Every model that
arrives and every gradient sent is reported to the worker's ``departure``
(:mod:`byzsgd.roles.departure`), which says whether it was work and when to leave; each wait
races the departure, and the loop checks it between two steps.
"""
from __future__ import annotations

import logging
import time

import torch

from byzsgd import gars
from byzsgd.config import RunConfig
from byzsgd.metrics import diameter
from byzsgd.net import Message, NewestModels, race
from byzsgd.roles.aggregation import aggregate_finite
from byzsgd.roles.messages import KIND_GRAD, KIND_MODEL, KIND_PS_AFTER, KIND_PS_MODEL
from byzsgd.roles.diameter import DiameterProbe
from byzsgd.roles.ps_base import PSBase
from byzsgd.roles.worker_base import WorkerBase

log = logging.getLogger("byzsgd.worker")


class PaperPS(PSBase):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.probe = DiameterProbe(cfg.rank, self.peers, self.replica.grad_size, self._send_model,
                                   self.metrics, measure_after=cfg.log_diameter and cfg.num_ps > 1)
        if self.probe.measure_after:
            self.accept(KIND_PS_AFTER, self.probe.deliver, shapes=[(self.replica.state_size,)])

    def _gathers_after(self, t: int) -> bool:
        return (t + 1) % self.cfg.gather_every == 0

    async def _gather_phase(self, t: int, record: dict) -> int:
        own = self.replica.state_vector()
        self.probe.start(t, own, self.models.newest)
        self._send_model(self.peers, KIND_PS_MODEL, t, own)
        t_next = await self._gather(t, own)
        # self.model_rows still holds the gathered models: what DMC contracts
        record["diameter_before"] = diameter(self.model_rows)
        record["distances_before"] = self.probe.before
        if self.probe.measure_after and t_next == t + 1:
            self.probe.publish_after(t, self.replica.state_vector())
        return t_next

    def _gathered(self, t: int, steps: dict[int, int]) -> None:
        self.probe.gathered(t, steps, self.model_rows)

    def _ended(self) -> None:
        self.probe.finish(self.models.newest)

    async def _shutdown(self) -> None:
        self.probe.close()
        await super()._shutdown()


class _AllDone(Exception):
    """Time to leave (the departure's rules) while the worker was waiting."""


class PaperWorker(WorkerBase):
    def __init__(self, cfg: RunConfig):
        cfg.check_resilience()
        if cfg.num_ps > 1:
            gars.check("median", cfg.q_ps, cfg.fps)
        super().__init__(cfg)
        # a PS model beyond the worker's step + window counts only when more than fps PSes
        # are that far ahead: a liar's far-future model takes no seat in the median
        self.models = NewestModels(KIND_MODEL, cfg.ps_ranks, window=cfg.step_window,
                                   f=cfg.fps)
        self.accept(KIND_MODEL, self._on_model, shapes=[(self.replica.state_size,)])
        self.model_rows = torch.empty(cfg.q_ps, self.replica.state_size,  # the models the median takes
                             device=self.replica.device)
        self.step = 0  # the step the worker waits for
        self.last_sent: tuple[list[torch.Tensor], dict] | None = None
        self.replayed: dict[int, tuple[int, float, bool]] = {}  # PS -> (old step answered, when, again)

    def _on_model(self, msg: Message) -> None:
        self.departure.arrived(msg.sender, msg.step)
        if msg.step < self.step and self.last_sent is not None:
            # A PS behind the worker: it gets the gradient the worker computed last (one
            # gradient per step, for every PS), tagged with the step it asked for -- once per
            # PS and step (again only for its re-send after --resend_after), increasing steps.
            msg.release()
            last, when, again = self.replayed.get(msg.sender, (-1, 0.0, True))
            now = time.monotonic()
            if msg.step > last:
                self.replayed[msg.sender] = (msg.step, now, False)
            elif msg.step == last and not again and now - when >= self.cfg.resend_after / 2:
                self.replayed[msg.sender] = (last, when, True)
            else:
                return
            self.node.send(msg.sender, KIND_GRAD, msg.step, *self.last_sent)
            self.departure.served(msg.sender, msg.step)
            return
        self.models.deliver(msg)

    def _send_gradient(self, steps, batch_step, grad, buffers, loss, **meta):
        sent = super()._send_gradient(steps, batch_step, grad, buffers, loss, **meta)
        if sent is not None:
            self.last_sent = sent
            for ps, step in steps.items():
                self.departure.served(ps, step)
        return sent

    async def _or_done(self, wait):
        """Await ``wait`` unless it is time to leave first (then raise :class:`_AllDone`)."""
        finished, result = await race(wait, self.departure.wait())
        if not finished:
            raise _AllDone
        return result

    async def _median_of_models(self, t: int) -> tuple[torch.Tensor, dict[int, int]]:
        """The coordinate-wise median of the first q_ps PS models of step >= t, and the
        step of each model used."""
        cfg, M = self.cfg, self.model_rows
        models = await self._or_done(self.models.collect(cfg.q_ps, t, forget_older=False))
        steps = {sender: msg.step for sender, msg in models.items()}
        try:
            for row, sender in enumerate(sorted(models)):
                M[row].copy_(models[sender].tensors[0])
        finally:
            for msg in models.values():
                msg.release()
        state = aggregate_finite("median", M, cfg.fps, drop_nonfinite=cfg.drop_nonfinite)[0] \
            if cfg.q_ps > 1 else M[0]
        return state, steps

    async def _steps(self) -> None:
        """One ``_step`` after the other, until it is time to leave."""
        try:
            while not self.departure.leaving():
                self.step = await self._step(self.step)
        except _AllDone:
            pass
        log.info("worker %d leaves: %s", self.cfg.rank, self.departure.why)

    async def _step(self, t: int) -> int:
        """Median of the first q_ps PS models of step >= t, one gradient to all; returns
        the next step."""
        state, steps = await self._median_of_models(t)
        step = min(steps.values())
        # PSes outside the quorum get the same gradient for their newest request
        for sender in [s for s in list(self.models.newest) if s not in steps]:
            msg = self.models.newest.pop(sender)
            steps[sender] = msg.step
            msg.release()
        self._answer_steps(steps, step, state)
        return step + 1

    async def _shutdown(self) -> None:
        self.models.close()
        await super()._shutdown()
