"""A worker: ``python -m byzsgd.roles.worker``.

Mode ``garfield``: serves gradient requests.  The request of PS p for step t carries p's
model; the worker computes the gradient of *its batch for step t* on that model and replies
to p.  Every PS asking for step t gets the gradient of the same batch.  Only the newest
request of each PS is kept: a request superseded while the worker was busy is never
computed (the PS has moved on and would drop the answer anyway).

Mode ``paper``: at step t the worker takes the first q_ps = n_ps - fps models of step t,
aggregates them with the coordinate-wise median, computes **one** gradient and sends it to
every PS.

Mode ``paper --sync``: the worker pulls the model of **one** PS, checks it with the outliers
and Lipschitz filters (:mod:`byzsgd.roles.filters`) and, if it fails or does not come within
--pull_timeout, pulls the next PS.  PSes that failed come last in the next step's order, and
one that failed SKIP_AFTER times in a row is only asked again through the median.  The
first step (no previous model to judge by) and any step in which every PS failed take the
median of q_ps models instead, as the asynchronous mode does.

A Byzantine worker (``--attack NAME``) computes its honest gradient, then sends what the
attack forges instead (see :mod:`byzsgd.roles.byzantine`).
"""
from __future__ import annotations

import asyncio
import logging
import time

import torch

from byzsgd import gars
from byzsgd.config import RunConfig
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.net import FrameLimits, Message
from byzsgd.roles import byzantine
from byzsgd.net import errors as net_errors
from byzsgd.roles.common import (KIND_DONE, KIND_GRAD, KIND_MODEL, KIND_PULL, exit_now, install_stop_signals,
                                 make_node, setup_logging, until_stopped)
from byzsgd.roles.filters import ModelFilters
from byzsgd.roles.aggregation import aggregate_finite
from byzsgd.roles.newest import NewestModels
from byzsgd.roles.replica import Replica

log = logging.getLogger("byzsgd.worker")

#: After every correct PS said "done", wait this long for stragglers before leaving.
LINGER_S = 5.0
#: --sync: a PS whose model failed (or did not come) this many times in a row is no longer
#: pulled on its own; the median of q_ps models (which asks every PS) rehabilitates it.
SKIP_AFTER = 3


class _AllDone(Exception):
    """Every PS said done while the worker was waiting."""


class Worker:
    def __init__(self, cfg: RunConfig):
        if cfg.is_ps:
            raise ConfigError(f"rank {cfg.rank} is a parameter server (ranks below "
                              f"--num_ps={cfg.num_ps}); workers have ranks {cfg.num_ps}.."
                              f"{cfg.world_size - 1}")
        if cfg.mode == "paper":
            cfg.check_resilience()
            if cfg.num_ps > 1:
                gars.check("median", cfg.q_ps, cfg.fps)
        self.cfg = cfg
        self.replica = Replica(cfg, with_train_shard=True)
        self.limits = FrameLimits.for_model(self.replica.state_size)
        self.node = make_node(cfg, self.limits)
        shapes = [(self.replica.state_size,)]
        if cfg.mode == "paper":
            self.models = NewestModels(KIND_MODEL, cfg.ps_ranks)
            self.node.on(KIND_MODEL, self._on_paper_model, shapes=shapes)
        else:
            self.node.on(KIND_MODEL, self._on_request, shapes=shapes)
        self.node.on(KIND_DONE, self._on_done)
        self.behaviour = byzantine.worker_behaviour(cfg, self.replica) if cfg.attack else None
        self.pending: dict[int, Message] = {}
        self.wakeup: asyncio.Event | None = None
        self.done_from: set[int] = set()
        self.stop: asyncio.Event | None = None
        self.served = 0
        self.paper_step = 0  # paper mode: the step the worker waits for
        self.last_sent: tuple[list[torch.Tensor], dict] | None = None
        self.filters = ModelFilters(quantile=cfg.lipschitz_q, warmup=cfg.lipschitz_warmup,
                                    window=cfg.lipschitz_window,
                                    factor=cfg.outliers_k, opt_args=cfg.opt_args) if cfg.sync else None
        self.pull_timeouts = 0
        self.bootstraps = 0

    # -- handlers (called by the node in arrival order) -------------------------------
    def _on_request(self, msg: Message) -> None:
        old = self.pending.get(msg.sender)
        if old is not None:
            if old.step > msg.step:  # a replayed/old request: keep the newer one
                msg.release()
                return
            old.release()
        self.pending[msg.sender] = msg
        if self.wakeup is not None:
            self.wakeup.set()

    def _on_done(self, msg: Message) -> None:
        msg.release()
        self.done_from.add(msg.sender)
        if self.wakeup is not None:
            self.wakeup.set()

    # -- gradient -------------------------------------------------------------------
    def _answer(self, ps_ranks, step: int, state: torch.Tensor) -> None:
        self._answer_steps({rank: step for rank in ps_ranks}, step, state)

    def _answer_steps(self, steps: dict[int, int], batch_step: int, state: torch.Tensor) -> None:
        """Compute one gradient (batch of ``batch_step``, model ``state``) and send it to each
        PS in ``steps``, tagged with the step that PS asked for."""
        if self.behaviour is not None and self.behaviour.silent:
            return
        grad, buffers, loss = self.replica.gradient_at(state, batch_step)
        self._send_gradient(steps, batch_step, grad, buffers, loss)

    def _send_gradient(self, steps: dict[int, int], batch_step: int, grad: torch.Tensor,
                       buffers: torch.Tensor | None, loss: float, rejected: int = 0) -> None:
        """Send a computed gradient (forged first by a Byzantine worker) to each PS in
        ``steps``, tagged with that PS's step."""
        if self.behaviour is not None:
            if self.behaviour.silent:
                return
            grad = self.behaviour.forge(grad, batch_step)
            if grad is None:  # the attack stays silent this step
                return
        tensors = [grad.clone()]
        if buffers is not None:
            tensors.append(buffers.clone())
        meta = {"loss": float(loss)}
        if self.filters is not None:
            meta["rejected"] = rejected  # models this step's filters refused (PS metrics)
        self.last_sent = (tensors, meta)
        for rank, step in steps.items():
            self.node.send(rank, KIND_GRAD, step, tensors, meta)
        self.served += 1

    def _all_done(self) -> bool:
        return len(self.done_from) >= self.cfg.num_ps

    async def _serve_requests(self) -> None:
        """Garfield mode: answer the pending request with the lowest step first."""
        cfg = self.cfg
        quorum_done_at = None
        while True:
            while self.pending:
                sender = min(self.pending, key=lambda r: (self.pending[r].step, r))
                msg = self.pending.pop(sender)
                try:
                    self._answer([sender], msg.step, msg.tensors[0])
                finally:
                    msg.release()
                await asyncio.sleep(0)  # let freshly arrived requests supersede older ones
            if self._all_done():
                return
            if len(self.done_from) >= cfg.q_ps and quorum_done_at is None:
                quorum_done_at = time.monotonic()
            self.wakeup.clear()
            if quorum_done_at is not None:
                # Every correct PS may be done; leave once nobody asked for LINGER_S.
                try:
                    await asyncio.wait_for(self.wakeup.wait(), LINGER_S)
                except asyncio.TimeoutError:
                    return
            else:
                await self.wakeup.wait()

    def _on_paper_model(self, msg: Message) -> None:
        if msg.step < self.paper_step and self.last_sent is not None:
            # A PS behind the worker: it gets the gradient the worker computed last (one
            # gradient per step, for every PS), tagged with the step it asked for.
            self.node.send(msg.sender, KIND_GRAD, msg.step, *self.last_sent)
            msg.release()
            return
        self.models.deliver(msg)
        if self.wakeup is not None:
            self.wakeup.set()

    async def _or_done(self, coro):
        """Await ``coro`` unless every PS says done first (then raise :class:`_AllDone`)."""
        task = asyncio.ensure_future(coro)
        finished = asyncio.ensure_future(self._wait_all_done())
        try:
            await asyncio.wait({task, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished.cancel()
        if not task.done():
            task.cancel()
            raise _AllDone
        return task.result()

    async def _median_of_models(self, t: int, M: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
        """The coordinate-wise median of the first q_ps PS models of step >= t, and the
        step of each model used."""
        cfg = self.cfg
        models = await self._or_done(self.models.gather(cfg.q_ps, t, forget_older=False))
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

    async def _paper_steps(self) -> None:
        """Paper mode: median of the first q_ps PS models of step >= t, one gradient to all."""
        M = torch.empty(self.cfg.q_ps, self.replica.state_size)
        t = 0
        while True:
            state, steps = await self._median_of_models(t, M)
            step = min(steps.values())
            # PSes outside the quorum get the same gradient for their newest request
            for sender in [s for s in list(self.models.newest) if s not in steps]:
                msg = self.models.newest.pop(sender)
                steps[sender] = msg.step
                msg.release()
            self._answer_steps(steps, step, state)
            t = self.paper_step = step + 1

    async def _pull(self, ps: int, t: int) -> Message | None:
        """Ask PS ``ps`` for its model of step >= t; None if it does not come in time."""
        self.node.send(ps, KIND_PULL, t, [])
        try:
            got = await self._or_done(self.models.gather(1, t, timeout=self.cfg.pull_timeout,
                                                         forget_older=False, among=(ps,)))
        except net_errors.QuorumTimeout:
            self.pull_timeouts += 1
            return None
        return got[ps]

    async def _sync_steps(self) -> None:
        """Synchronous paper mode: one PS's model per step, judged by the filters."""
        cfg, filters = self.cfg, self.filters
        grad_size = self.replica.grad_size
        M = torch.empty(cfg.q_ps, self.replica.state_size)
        suspicion = {p: 0 for p in cfg.ps_ranks}  # consecutive failures: tried last
        t = 0
        rejected = 0
        while True:
            if filters.prev is None or rejected >= cfg.num_ps:
                # the median of q_ps models: the first step (nothing to judge by) and the
                # step every PS failed in (one of them at least is correct, so the filters
                # were unlucky or the worker's memory is off): what the async mode does
                self.bootstraps += 1
                self.node.broadcast(cfg.ps_ranks, KIND_PULL, t, [])
                state, steps = await self._median_of_models(t, M)
                step = min(steps.values())
                for ps in steps:  # they answered: pulled again from the next step on
                    suspicion[ps] = 0
                grad, buffers, loss = self.replica.gradient_at(state, step)
                filters.judge(state[:grad_size], grad)  # its coefficient joins the history
                filters.accept(state[:grad_size], grad, step)
                self._send_gradient({p: step for p in cfg.ps_ranks}, step, grad, buffers, loss, min(rejected, cfg.num_ps))
                t = self.paper_step = step + 1
                rejected = 0
                continue
            order = sorted(cfg.ps_ranks, key=lambda p: (suspicion[p], (p - cfg.worker_index - t) % cfg.num_ps))
            rejected = 0
            for attempt, ps in enumerate(order):
                if suspicion[ps] >= SKIP_AFTER:  # failed again and again: only the median asks it
                    rejected += 1
                    continue
                msg = await self._pull(ps, t)
                if msg is None:
                    suspicion[ps] += 1
                    rejected += 1
                    continue
                step = msg.step
                try:
                    state = msg.tensors[0].clone()
                finally:
                    msg.release()
                params = state[:grad_size]
                verdict = filters.screen(params, step)
                if verdict.ok:  # a retry takes another batch: an independent trial
                    grad, buffers, loss = self.replica.gradient_at(state, step, attempt)
                    verdict = filters.judge(params, grad)
                if not verdict.ok:
                    log.debug("worker %d step %d: PS %d's model fails the %s filter (%.4g > %.4g)",
                              cfg.rank, t, ps, verdict.reason, verdict.value, verdict.bound)
                    suspicion[ps] += 1
                    rejected += 1
                    continue
                suspicion[ps] = 0
                filters.accept(params, grad, step)
                self._send_gradient({p: step for p in cfg.ps_ranks}, step, grad, buffers, loss, rejected)
                t = self.paper_step = step + 1
                rejected = 0
                break
            else:
                log.info("worker %d step %d: no PS model passed the filters; median of q_ps", cfg.rank, t)

    async def _wait_all_done(self) -> None:
        """Until every PS said done — or q_ps of them did and nobody wrote for LINGER_S (a
        crashed or Byzantine PS never says it)."""
        while not self._all_done():
            self.wakeup.clear()
            if len(self.done_from) >= self.cfg.q_ps:
                try:
                    await asyncio.wait_for(self.wakeup.wait(), LINGER_S)
                except asyncio.TimeoutError:
                    return
            else:
                await self.wakeup.wait()

    async def run(self) -> int:
        self.stop = asyncio.Event()
        self.wakeup = asyncio.Event()
        install_stop_signals(self.stop)
        try:
            started, _ = await until_stopped(self.node.start(timeout=self.cfg.startup_timeout),
                                             self.stop)
            if not started:  # stopped by a signal while still meeting the others
                return 0
            log.info("worker %d listening on port %d (%s mode%s)", self.cfg.rank, self.node.port,
                     self.cfg.mode, f", Byzantine: {self.cfg.attack}" if self.cfg.attack else "")
            if self.cfg.mode == "paper":
                loop = self._sync_steps() if self.cfg.sync else self._paper_steps()
            else:
                loop = self._serve_requests()
            try:
                await until_stopped(loop, self.stop)
            except _AllDone:
                pass
        except ByzSGDError as exc:
            log.error("worker %d stopped: %s", self.cfg.rank, exc)
            return 1
        finally:
            for msg in self.pending.values():
                msg.release()
            self.pending.clear()
            if self.cfg.mode == "paper":
                self.models.close()
            await self.node.close()
        if self.filters is not None:
            log.info("worker %d: filters rejected %s; %d pull timeouts; %d bootstraps", self.cfg.rank,
                     self.filters.rejected, self.pull_timeouts, self.bootstraps)
        log.info("worker %d done: %d gradients sent", self.cfg.rank, self.served)
        return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.worker`` (see :func:`byzsgd.roles.entry.run_role`)."""
    from byzsgd.roles.entry import main as entry_main

    return entry_main("worker", argv)


if __name__ == "__main__":
    exit_now(main())
