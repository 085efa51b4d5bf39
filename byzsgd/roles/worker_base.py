"""What a worker does in every mode: compute a gradient on a model, send it, know when to leave.

A mode subclass says where the model comes from (``_steps()``).  A Byzantine worker
(``--attack NAME``) computes its honest gradient, then sends what the attack forges instead
(see :mod:`byzsgd.roles.byzantine`).
"""
from __future__ import annotations

import logging

import torch

from byzsgd.config import RunConfig
from byzsgd.device import describe as describe_device
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.roles import byzantine
from byzsgd.roles.base import Role
from byzsgd.roles.messages import KIND_DONE, KIND_GRAD
from byzsgd.roles.departure import Departure
from byzsgd.roles.replica import Replica

log = logging.getLogger("byzsgd.worker")


class WorkerBase(Role):
    def __init__(self, cfg: RunConfig):
        if cfg.is_ps:
            raise ConfigError(f"rank {cfg.rank} is a parameter server (ranks below "
                              f"--num_ps={cfg.num_ps}); workers have ranks {cfg.num_ps}.."
                              f"{cfg.world_size - 1}")
        super().__init__(cfg, Replica(cfg, with_train_shard=True))
        self.departure = Departure(cfg.num_ps, cfg.q_ps, num_iter=cfg.num_iter)
        self.accept(KIND_DONE, self.departure.deliver, shapes=[])
        self.behaviour = byzantine.worker_behaviour(cfg, self.replica) if cfg.attack else None
        self.served = 0  # gradients sent

    # -- gradient -------------------------------------------------------------------
    def _answer_steps(self, steps: dict[int, int], batch_step: int, state: torch.Tensor) -> None:
        """Compute one gradient (batch of ``batch_step``, model ``state``) and send it to each
        PS in ``steps``, tagged with the step that PS asked for."""
        if self.behaviour is not None and self.behaviour.silent:
            return
        grad, buffers, loss = self.replica.gradient_at(state, batch_step)
        self._send_gradient(steps, batch_step, grad, buffers, loss)

    def _send_gradient(self, steps: dict[int, int], batch_step: int, grad: torch.Tensor,
                       buffers: torch.Tensor | None, loss: float, **meta):
        """Send a computed gradient (forged first by a Byzantine worker) to each PS in
        ``steps``, tagged with that PS's step; ``meta`` joins the loss in the message (a
        Byzantine worker's ``meta`` attack argument overrides both).
        Returns what was sent, ``(tensors, meta)``, or None."""
        if self.behaviour is not None:
            if self.behaviour.silent:
                return None
            grad = self.behaviour.forge(grad, batch_step)
            if grad is None:  # the attack stays silent this step
                return None
        tensors = [grad.clone()]
        if buffers is not None:
            tensors.append(buffers.clone())
        meta = {"loss": float(loss), **meta}
        if self.behaviour is not None and self.behaviour.meta:  # a liar's fields replace ours
            meta.update(self.behaviour.meta)
        for rank, step in steps.items():
            self.node.send(rank, KIND_GRAD, step, tensors, meta)
        self.served += 1
        return tensors, meta

    # -- life cycle (see Role.run) --------------------------------------------------------
    def _started(self) -> None:
        cfg = self.cfg
        log.info("worker %d listening on port %d (%s mode%s, device %s)", cfg.rank, self.node.port,
                 cfg.mode, f", Byzantine: {cfg.attack}" if cfg.attack else "",
                 describe_device(self.replica.device))

    def _failed(self, exc: ByzSGDError) -> None:
        log.error("worker %d stopped: %s", self.cfg.rank, exc)

    def _finished(self) -> None:
        stats = self.node.stats
        log.info("worker %d done: %d gradients sent; rejected %s, refused %s, failures %s",
                 self.cfg.rank, self.served, dict(stats.rejected) or "none",
                 dict(stats.refused_from) or "none", dict(stats.failures) or "none")
