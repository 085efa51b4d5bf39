"""Mode ``paper --sync``: the synchronous variant of ByzSGD (paper, §5).

PS: as in paper mode, but workers *pull* its model (``pull``) instead of being pushed it: a
pull for step >= t is answered once the PS serves such a step, at most PULLS_PER_STEP times
per worker and step served.

Worker: pulls the model of **one** PS, checks it with the outliers and Lipschitz filters
(:mod:`byzsgd.roles.filters`) and, if it fails or does not come within --pull_timeout, pulls
the next PS.  PSes that failed come last in the next step's order, and one that failed
SKIP_AFTER times in a row is only asked again through the median.  At a gather step
(t mod T == 0, right after the PSes' DMC) the worker pulls **every** PS and takes the
coordinate-wise median of the first q_ps models, as the authors' synchronous worker does;
so do the first step (no previous model to judge by) and any step in which every PS failed.

The worker's clock: a pulled model is taken only if it is of the step the worker expects
(t); a PS answering with a later step (a Byzantine PS labelling an honest-looking model t+3
to drive the worker's clock, or a correct PS that went on without it) is passed over, and
when no PS gave a model of step t the worker takes the median of q_ps models, whose step is
the *lowest* of the q_ps: a jump needs q_ps PSes (fps + 1 correct at least) to be ahead.
"""
from __future__ import annotations

import logging

import torch

from byzsgd.config import RunConfig
from byzsgd.net import Message
from byzsgd.net import errors as net_errors
from byzsgd.roles.messages import KIND_MODEL, KIND_PULL
from byzsgd.roles.filters import filters_for
from byzsgd.roles.paper import PaperPS, PaperWorker

log = logging.getLogger("byzsgd.worker")

#: pulls of one worker answered per step served (its own pull and the median's).
PULLS_PER_STEP = 2
#: A PS whose model failed (or did not come) this many times in a row is no longer pulled
#: on its own; the median of q_ps models (which asks every PS) rehabilitates it.
SKIP_AFTER = 3


class PaperSyncPS(PaperPS):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.serving: tuple[int, torch.Tensor] | None = None  # the step served and its model
        self.pending_pulls: dict[int, int] = {}  # worker -> step it waits for
        self.pulls_answered: dict[int, int] = {}  # per worker, for the step served
        self.accept(KIND_PULL, self._on_pull, shapes=[])

    def _request_gradients(self, t: int, snapshot):
        self._serve(t, snapshot)
        return None  # a worker that lost its model pulls again

    def _on_pull(self, msg: Message) -> None:
        """A worker asks for the model of step >= msg.step: answered now if this PS serves
        such a step, else when it gets there (one waiting pull per worker)."""
        msg.release()
        w = msg.sender
        if w not in self.cfg.worker_ranks:
            return
        if self.serving is not None and self.serving[0] >= msg.step:
            # a correct worker pulls a PS at most twice per step (its own pull, then the
            # median's); more is a Byzantine worker making us send models for nothing
            if self.pulls_answered.get(w, 0) < PULLS_PER_STEP:
                self.pulls_answered[w] = self.pulls_answered.get(w, 0) + 1
                self._send_model([w], KIND_MODEL, *self.serving)
        else:
            self.pending_pulls[w] = max(msg.step, self.pending_pulls.get(w, 0))

    def _serve(self, t: int, snapshot: torch.Tensor) -> None:
        """From now on the model of step ``t`` answers pulls; the waiting ones get it now."""
        self.serving = (t, snapshot)
        self.pulls_answered = {}
        ready = [w for w, s in self.pending_pulls.items() if s <= t]
        for w in ready:
            del self.pending_pulls[w]
            self.pulls_answered[w] = 1
        if ready:
            self._send_model(ready, KIND_MODEL, t, snapshot)


class PaperSyncWorker(PaperWorker):
    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.filters = filters_for(cfg)
        self.suspicion = {p: 0 for p in cfg.ps_ranks}  # consecutive failures: tried last
        self.rejected = 0  # PSes whose model this step refused (or did not get)
        self.pull_timeouts = 0
        self.bootstraps = 0
        self.ahead = 0  # pulled models of a later step than expected (passed over)
        self.catch_up = False  # no PS gave step t's model: the median decides the step

    async def _pull(self, ps: int, t: int) -> Message | None:
        """Ask PS ``ps`` for its model of step >= t; None if it does not come in time."""
        self.node.send(ps, KIND_PULL, t, [])
        try:
            got = await self._or_done(self.models.collect(1, t, timeout=self.cfg.pull_timeout,
                                                          forget_older=False, among=(ps,)))
        except net_errors.QuorumTimeout:
            self.pull_timeouts += 1
            return None
        return got[ps]

    async def _step(self, t: int) -> int:
        """One PS's model, judged by the filters; the median of q_ps models of all the PSes at
        a gather step, when there is nothing to judge by, when every PS failed, or when no PS
        gave step t's model (catch up).  Returns the next step (t when every PS failed: the
        next attempt takes the median)."""
        if (self.filters.prev is None or self.rejected >= self.cfg.num_ps or self.catch_up
                or t % self.cfg.gather_every == 0):
            self.catch_up = False
            return await self._bootstrap(t)
        return await self._filtered(t)

    async def _bootstrap(self, t: int) -> int:
        """The median of the first q_ps models of all the PSes: a gather step, the first step
        (nothing to judge by) and the step every PS failed in (one of them at least is
        correct, so the filters were unlucky or the worker's memory is off)."""
        cfg, filters = self.cfg, self.filters
        grad_size = self.replica.grad_size
        self.bootstraps += 1
        self.node.broadcast(cfg.ps_ranks, KIND_PULL, t, [])
        state, steps = await self._median_of_models(t)
        step = min(steps.values())
        for ps in steps:  # they answered: pulled again from the next step on
            self.suspicion[ps] = 0
        grad, buffers, loss = self.replica.gradient_at(state, step)
        filters.observe(state[:grad_size], grad)  # its coefficient joins the history
        filters.accept(state[:grad_size], grad, step)
        self._send_gradient({p: step for p in cfg.ps_ranks}, step, grad, buffers, loss,
                            rejected=min(self.rejected, cfg.num_ps))
        self.rejected = 0
        return step + 1

    async def _filtered(self, t: int) -> int:
        """Pull the PSes one after the other (the least suspect first) until a model passes."""
        cfg, filters, suspicion = self.cfg, self.filters, self.suspicion
        grad_size = self.replica.grad_size
        order = sorted(cfg.ps_ranks, key=lambda p: (suspicion[p], (p - cfg.worker_index - t) % cfg.num_ps))
        self.rejected = 0
        for attempt, ps in enumerate(order):
            if suspicion[ps] >= SKIP_AFTER:  # failed again and again: only the median asks it
                self.rejected += 1
                continue
            msg = await self._pull(ps, t)
            if msg is None:
                suspicion[ps] += 1
                self.rejected += 1
                continue
            step = msg.step
            if step > t:  # one PS cannot move the worker's clock: only the median can
                msg.release()
                self.ahead += 1
                self.catch_up = True
                continue
            try:
                state = msg.tensors[0].to(self.replica.device, copy=True)
            finally:
                msg.release()
            params = state[:grad_size]
            verdict = filters.screen(params, step)
            if verdict.ok:  # a retry takes another batch: an independent trial
                grad, buffers, loss = self.replica.gradient_at(state, step, attempt)
                verdict = filters.judge(params, grad, step)
            if not verdict.ok:
                log.debug("worker %d step %d: PS %d's model fails the %s filter (%.4g > %.4g)",
                          cfg.rank, t, ps, verdict.reason, verdict.value, verdict.bound)
                suspicion[ps] += 1
                self.rejected += 1
                continue
            suspicion[ps] = 0
            filters.accept(params, grad, step)
            self._send_gradient({p: step for p in cfg.ps_ranks}, step, grad, buffers, loss,
                                rejected=self.rejected)
            self.rejected = 0
            return step + 1
        log.info("worker %d step %d: no PS model of step %d passed the filters; median of q_ps",
                 cfg.rank, t, t)
        return t

    def _finished(self) -> None:
        log.info("worker %d: filters rejected %s; %d pull timeouts; %d bootstraps; %d models ahead "
                 "passed over", self.cfg.rank, self.filters.rejected, self.pull_timeouts,
                 self.bootstraps, self.ahead)
        super()._finished()
