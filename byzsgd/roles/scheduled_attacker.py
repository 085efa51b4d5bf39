"""TEST HARNESS: a Byzantine worker of the adversarially scheduled deployment.

The PSes play the network adversary (:mod:`byzsgd.roles.adversary_schedule`): they deliver
the listed Byzantine workers' gradients first, hold the correct ones and leak each held one
to the Byzantine workers (kind ``leak``) in the order they received them, then release them
in that same order.  So PS p's quorum of step t is the Byzantine ranks plus the first
``k = q_w - len(Byzantine ranks)`` gradients p leaked for t -- known to the attacker before
it answers, at no compute cost.  For p's request of step t this worker:

1. computes its own honest gradient on p's model (as every worker does);
2. waits (at most ``--resend_after``) until it holds k leaks of (p, t), filed in arrival
   order (one TCP connection per PS keeps that order);
3. forges from what it then knows and sends to p only:

   * by default the attack's rows from ``[own, *the k leaked]`` (what ``collude: true`` gives
     a worker outside the schedule, :meth:`byzsgd.roles.byzantine.WorkerAttack.known_rows`);
     it sends row ``i`` of the f forged rows, ``i`` its index among the Byzantine ranks
     (seeded attacks share one seed: every Byzantine worker forges from the same leaks, only
     its own gradient row differs);
   * with ``momentum_aware: true`` and ``--worker_momentum > 0``: one
     :class:`~byzsgd.attacks.momentum_aware.MomentumAwareAttacker` per PS, fed with exactly the
     quorum's honest gradients (the k leaks) and its own gradients, tracks p's momentum rows;
     the attack runs on the honest rows the rule sees (``--wm_rows quorum``: the quorum's;
     ``recent``: every honest row updated within ``--wm_staleness`` steps, as
     :meth:`byzsgd.roles.gradient_aggregation.GradientAggregation.rows_entering`) and the
     gradient sent makes its own row at p equal to the forged row ``i``.  Every Byzantine
     worker sees the same leaks, so they forge the same rows.

``label_flip`` and ``honest`` send their gradient at once (being in every quorum is all they
get from the schedule); ``silent`` sends nothing.  What it cannot know: a step whose quorum
the PS closed at its deadline without this worker (its momentum row at p then did not move,
the tracker thinks it did); counted in :attr:`ScheduledAttacker.short`, logged.

Bounded: leaks are kept per PS for at most ``step_window`` steps (the lowest go first) and
never for a step the worker already answered; one per correct rank and step.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from byzsgd import attacks
from byzsgd.attacks.momentum_aware import MomentumAwareAttacker
from byzsgd.errors import ConfigError
from byzsgd.net import Message
from byzsgd.roles.messages import KIND_GRAD, KIND_LEAK

__all__ = ["ScheduledAttacker", "attach"]

log = logging.getLogger("byzsgd.byzantine")

LOG_FIRST = 5
LOG_EVERY = 100


class _Leaks:
    """The leaks of one (PS, step): correct rank -> its gradient, in arrival order."""

    __slots__ = ("rows", "ready")

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.ready = asyncio.Event()  # set once k rows are in


class ScheduledAttacker:
    """The Byzantine side of the adversarial schedule for one worker (module docstring).

    ``worker``: the worker role (its cfg, replica, node, ``behaviour`` -- a
    :class:`~byzsgd.roles.byzantine.WorkerAttack` -- and ``served`` counter).  Registers the
    ``leak`` kind on the worker's node: build it before the node starts."""

    def __init__(self, worker: Any):
        cfg = worker.cfg
        self.worker, self.cfg = worker, cfg
        self.node, self.replica = worker.node, worker.replica
        self.behaviour = worker.behaviour
        self.byzantine = cfg.scheduled_ranks
        self.index = self.byzantine.index(cfg.rank)
        self.k = cfg.q_w - len(self.byzantine)  # correct gradients that complete a quorum
        self.honest = frozenset(r for r in cfg.worker_ranks if r not in self.byzantine)
        self.window = cfg.step_window
        self._leaks: dict[int, dict[int, _Leaks]] = {}  # PS -> step -> its leaks
        self._floor: dict[int, int] = {}  # PS -> the lowest step still to answer
        self._sent: dict[int, tuple[int, list[torch.Tensor], dict]] = {}  # PS -> its last answer
        self.momentum_aware = self.behaviour.momentum_aware
        self.trackers: dict[int, MomentumAwareAttacker] = {}  # PS -> its momentum rows
        self.updated_at: dict[int, dict[int, int]] = {}  # PS -> correct rank -> step of its last row
        self.short = 0  # answers sent with fewer than k leaks (the deadline passed)
        self.refused = 0  # leaks refused: bad meta, copies, a step already answered
        worker.accept(KIND_LEAK, self.on_leak, shapes=[(self.replica.grad_size,)])

    # -- the leaks -------------------------------------------------------------------------
    def _entry(self, ps: int, step: int) -> _Leaks | None:
        if step < self._floor.get(ps, 0):
            return None
        steps = self._leaks.setdefault(ps, {})
        entry = steps.get(step)
        if entry is None:
            entry = steps[step] = _Leaks()
            while len(steps) > self.window:  # a PS far ahead (it jumped): the oldest go
                del steps[min(steps)]
        return entry

    def on_leak(self, msg: Message) -> None:
        """File a PS's leak under (PS, step), in arrival order."""
        try:
            rank = msg.meta.get("worker")
            entry = self._entry(msg.sender, msg.step) if type(rank) is int and rank in self.honest else None
            if entry is None or rank in entry.rows:
                self.refused += 1
                return
            entry.rows[rank] = msg.tensors[0].to(self.replica.device, copy=True)
            if len(entry.rows) >= self.k:
                entry.ready.set()
        finally:
            msg.release()

    async def _wait_leaks(self, ps: int, step: int) -> list[tuple[int, torch.Tensor]]:
        """The first k leaks of (ps, step), waited for at most --resend_after."""
        entry = self._entry(ps, step)
        if entry is None:
            return []
        if len(entry.rows) < self.k:
            try:
                await asyncio.wait_for(entry.ready.wait(), self.cfg.resend_after)
            except asyncio.TimeoutError:
                self.short += 1
                if self.short <= LOG_FIRST or self.short % LOG_EVERY == 0:
                    log.warning("worker %d: PS %d step %d: %d of the %d leaks after %.1f s; forging "
                                "from those (%d such answers)", self.cfg.rank, ps, step,
                                len(entry.rows), self.k, self.cfg.resend_after, self.short)
        return list(entry.rows.items())[:self.k]

    def _answered(self, ps: int, step: int) -> None:
        self._floor[ps] = max(self._floor.get(ps, 0), step + 1)
        steps = self._leaks.get(ps, {})
        for s in [s for s in steps if s <= step]:
            del steps[s]

    # -- answering ---------------------------------------------------------------------------
    async def answer(self, ps: int, step: int, state: torch.Tensor) -> None:
        """Answer PS ``ps``'s request of ``step`` (its model ``state``): see the module docstring."""
        beh = self.behaviour
        if beh.silent:
            return
        last = self._sent.get(ps)
        if last is not None and last[0] == step:  # the PS re-sent its request: the same answer
            self._send(ps, step, *last[1:])
            return
        grad, buffers, loss = self.replica.gradient_at(state, step)
        own = grad.clone()  # the replica's buffer: the next gradient overwrites it
        tensors = [own] if buffers is None else [own, buffers.clone()]
        meta = {"loss": float(loss), **beh.meta}
        if not (beh.label_flip or beh.honest):
            leaks = await self._wait_leaks(ps, step)
            tensors[0] = (self._momentum_gradient(ps, step, own, leaks) if self.momentum_aware
                          else self._forged(step, own, leaks))
        self._answered(ps, step)
        self._sent[ps] = (step, tensors, meta)
        self._send(ps, step, tensors, meta)

    def _send(self, ps: int, step: int, tensors: list[torch.Tensor], meta: dict) -> None:
        self.node.send(ps, KIND_GRAD, step, tensors, meta)
        self.worker.served += 1

    def _row(self, rows: torch.Tensor) -> torch.Tensor:
        """This worker's row of the f forged ones."""
        return rows[min(self.index, rows.shape[0] - 1)].contiguous()

    def _forged(self, step: int, own: torch.Tensor, leaks) -> torch.Tensor:
        known = torch.stack([own, *(g for _, g in leaks)])
        return self._row(self.behaviour.forge_rows(known, step))

    def _momentum_gradient(self, ps: int, step: int, own: torch.Tensor, leaks) -> torch.Tensor:
        """The gradient that puts the forged row into this worker's momentum row at ``ps``."""
        cfg, beh = self.cfg, self.behaviour
        tracker = self.trackers.get(ps)
        if tracker is None:
            tracker = self.trackers[ps] = MomentumAwareAttacker(cfg.worker_momentum)
        updated = self.updated_at.setdefault(ps, {})
        tracker.observe(dict(leaks))  # the PS's honest momentums after this step's update
        for rank, _ in leaks:
            updated[rank] = step
        if cfg.wm_rows == "recent":
            ranks = sorted(r for r, s in updated.items() if step - s <= cfg.wm_staleness)
        else:
            ranks = sorted(r for r, _ in leaks)
        if not ranks:  # nothing known of the honest rows (k = 0, or no leak in time): own only
            target = self._row(beh.forge_rows(own.unsqueeze(0), step))
        else:
            rows = tracker.honest_rows(ranks).to(own.dtype)
            target = self._row(attacks.forge(beh.name, rows, beh.f, **beh.step_params(step)))
        return tracker.gradient_for(cfg.rank, target).contiguous()

    # -- bounds (tests) -----------------------------------------------------------------------
    @property
    def leaks_kept(self) -> int:
        return sum(len(e.rows) for steps in self._leaks.values() for e in steps.values())


def attach(worker: Any) -> ScheduledAttacker | None:
    """The worker's :class:`ScheduledAttacker` when its rank is in ``--scheduled_byzantine``,
    else None."""
    cfg = worker.cfg
    if cfg.rank not in cfg.scheduled_ranks:
        return None
    if worker.behaviour is None:
        raise ConfigError(f"worker {cfg.rank}: --scheduled_byzantine needs a value attack; "
                          f"{cfg.attack!r} is a protocol attack (it plays with the wire itself)")
    return ScheduledAttacker(worker)
