"""What a parameter server does in every mode: the step loop and its phases.

Step t (docs/design.md §3):

1. ask for gradients on the model of step t — how is the mode's (:meth:`PSBase._request_gradients`);
2. take gradients for step t as they arrive: the first q_w = n_w - fw distinct workers;
3. g = GAR(grads, f=fw); optimizer step;
4. when the mode gathers at t (:meth:`PSBase._gathers_after`): send the updated model to
   every other PS, take peers' models of step >= t as they arrive until q_ps = n_ps - fps
   (own included); model = model rule of them;
5. every --acc_freq steps evaluate the (consistent) model and log a metrics line.

No sleeps, no polling: each wait is a quorum future (:class:`byzsgd.net.Mailbox`,
:class:`byzsgd.net.NewestModels`) under :func:`byzsgd.net.until_quorum`: a request nobody
answered within --resend_after is sent again to those who did not answer (a restarted peer
lost it), so a late or silent node is never waited for beyond a quorum.  A PS that fell
behind jumps to its peers' step: the gradient wait gives way as soon as q_ps - 1 peers are
ahead.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time

import torch

from byzsgd.config import RunConfig
from byzsgd.device import describe as describe_device
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.gars.pipeline import Pipeline
from byzsgd.learning.checkpoint import CheckpointPolicy, common_checkpoint_step
from byzsgd.metrics import MetricsWriter
from byzsgd.net import Message, NewestModels, race, until_quorum
from byzsgd.roles import byzantine
from byzsgd.roles.adversary_schedule import gradient_intake  # the mailbox, or the test harness's schedule
from byzsgd.roles.aggregation import aggregate_finite
from byzsgd.roles.base import DRAIN_S, Role
from byzsgd.roles.member_input import grad_meta, median_finite
from byzsgd.roles.messages import KIND_DONE, KIND_GRAD, KIND_MODEL, KIND_PS_ASK, KIND_PS_MODEL, SENDERS
from byzsgd.roles.ps_step import PSStep
from byzsgd.roles.replica import Replica

log = logging.getLogger("byzsgd.ps")

#: answers to one peer's ``ps_ask`` per step asked (its re-asks after a loss; more is a flood)
ASKS_PER_STEP = 2
#: own ps_models kept to answer re-asks (the newest ones)
KEPT_MODELS = 2


def _fmt(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def serving_order(ranks, step: int) -> list[int]:
    """``ranks`` rotated by ``step``: the order a PS sends step ``step``'s model in.

    The first recipients are woken first; rotating gives every rank the head of the line once
    every ``len(ranks)`` steps, so no rank (the launcher puts the Byzantine workers on the last
    ones) is always served first or last.  Measured, the effect is small (docs/design.md §3)."""
    ranks = list(ranks)
    k = step % len(ranks) if ranks else 0
    return ranks[k:] + ranks[:k]


class PSBase(Role):
    """One PS: a model replica, a node, and the step loop; a mode subclass says how it asks
    for gradients and when it gathers."""

    def __init__(self, cfg: RunConfig):
        if not cfg.is_ps:
            raise ConfigError(f"rank {cfg.rank} is a worker (ranks below --num_ps={cfg.num_ps} are PS)")
        cfg.check_resilience()
        super().__init__(cfg, Replica(cfg, with_test_set=True))
        replica = self.replica
        grad_shapes = [(replica.grad_size,)]
        if replica.buffer_size:
            grad_shapes.append((replica.buffer_size,))
        window = cfg.step_window
        self.grad_box = gradient_intake(self.node, cfg, KIND_GRAD, window=window, shapes=grad_shapes,
                                        role=SENDERS[KIND_GRAD], excluded=lambda: self.gradients.banned)
        self.peers = [r for r in cfg.ps_ranks if r != cfg.rank]
        # a peer's model beyond our step + window counts only when more than fps peers are
        # that far ahead (docs/design.md §3): one liar neither keeps a seat nor makes us skip
        self.models = NewestModels(KIND_PS_MODEL, self.peers, window=window, f=cfg.fps)
        self.accept(KIND_PS_MODEL, self.models.deliver, shapes=[(replica.state_size,)])
        # re-asks: our last ps_models, and how often each peer asked for which step
        self.sent_models: dict[int, torch.Tensor] = {}
        self.asks: dict[int, tuple[int, int]] = {}  # peer -> (step asked, answers given)
        self.accept(KIND_PS_ASK, self._on_ask, shapes=[])
        self.peers_done: set[int] = set()
        self.all_peers_done = asyncio.Event()
        self.accept(KIND_DONE, self._on_peer_done, shapes=[])
        # rows the quorums are stacked into: gradients, BatchNorm buffers, models
        # (on the replica's device: the rules run there, docs/gpu.md)
        dev = replica.device
        self.grad_rows = torch.empty(cfg.q_w, replica.grad_size, device=dev)
        self.buffer_rows = torch.empty(cfg.q_w, replica.buffer_size, device=dev) \
            if replica.buffer_size else None
        self.model_rows = torch.empty(cfg.q_ps, replica.state_size, device=dev)
        self.nonfinite_dropped = 0  # NaN/Inf rows left out of aggregations
        self.model_quorum: list[int] = []  # the peers whose models the last gather used
        self.models_rejected = 0  # models the workers' filters refused (their gradients say)
        self.step = 0
        # the PS step on a gradient quorum (roles/ps_step.py): the spot checks that ban a
        # forging worker (--check_gradients), then the gradient aggregation's stages
        # (roles/gradient_aggregation.py): non-finite rows, the per-worker momentum
        # (--worker_momentum: the PS computes each worker's momentum from what it received,
        # so no worker can opt out), the rows that enter (--wm_rows), --pre_agg, --gar
        self.ps_step = PSStep(cfg, replica)
        self.gradients = self.ps_step.gradients
        self.worker_momentum = self.gradients.momentum
        self.model_pre_agg = Pipeline.parse(cfg.model_pre_agg)
        self.checkpoints = CheckpointPolicy(
            cfg.checkpoint_dir, cfg.checkpoint_every, cfg.rank,
            components={"worker_momentum": self.gradients} if self.worker_momentum else None) \
            if cfg.checkpoint_dir else None
        if self.checkpoints is not None and cfg.resume:
            # PSes sharing a directory resume at the newest step all of them have
            common = common_checkpoint_step(cfg.checkpoint_dir, cfg.ps_ranks)
            resumed = self.checkpoints.restore(replica, common)
            self.step = resumed or 0
            log.info("PS %d resumes at step %d from %s", cfg.rank, self.step, cfg.checkpoint_dir)
        self.behaviour = byzantine.ps_behaviour(cfg) if cfg.attack else None
        self.metrics = MetricsWriter(cfg.metrics)
        # progress of the run, for the metrics records
        self.step_times: list[float] = []
        self.accuracy: float | None = None
        self.next_eval = 0
        self.evaluated_at = -1
        self.loss_total, self.loss_steps = 0.0, 0  # --log: the loss accumulated over the steps

    # -- what a mode fills in -------------------------------------------------------------
    def _request_gradients(self, t: int, snapshot):
        """Ask the workers for step ``t``'s gradients on ``snapshot``; returns how to ask
        the silent ones again (``resend(ranks)``), or None.  Default: push the model to
        every worker not banned (--check_gradients), in :func:`serving_order`."""
        workers = [w for w in self.cfg.worker_ranks if w not in self.gradients.banned]
        self._send_model(serving_order(workers, t), KIND_MODEL, t, snapshot)
        return lambda silent: self._send_model(silent, KIND_MODEL, t, snapshot)

    def _gathers_after(self, t: int) -> bool:
        """Whether the PSes gather their models after step ``t``."""
        raise NotImplementedError

    async def _gather_phase(self, t: int, record: dict) -> int:
        """Gather after step ``t``; returns the step to continue from.  ``record`` is the
        step's metrics record."""
        own = self.replica.state_vector()
        self._send_model(self.peers, KIND_PS_MODEL, t, own)
        return await self._gather(t, own)

    def _gathered(self, t: int, steps: dict[int, int]) -> None:
        """The gather of step ``t`` took peers' models of ``steps`` (sender -> step);
        ``self.model_rows`` holds them (row 0 ours, then the peers in rank order) until the next
        gather."""

    def _ended(self) -> None:
        """The last step is done; the ``done`` record comes next."""

    # -- sending ----------------------------------------------------------------------
    def _send_model(self, ranks, kind: str, step: int, state: torch.Tensor) -> None:
        """Send ``state`` (a snapshot nobody mutates) to ``ranks``; a Byzantine PS forges."""
        if kind == KIND_PS_MODEL and (not self.sent_models or step >= max(self.sent_models)):
            self.sent_models[step] = state  # what a peer's re-ask gets
            for old in sorted(self.sent_models)[:-KEPT_MODELS]:
                del self.sent_models[old]
        if self.behaviour is None:
            self.node.broadcast(ranks, kind, step, [state])
        else:
            self.behaviour.send(self.node, ranks, kind, step, state)

    # -- serving peers ------------------------------------------------------------------
    def _on_ask(self, msg: Message) -> None:
        """A peer asks for our ps_model of step >= msg.step: it gets the one of that step if
        we still have it, else our newest of a later step; nothing if we are not there yet
        (our ps_model of that step goes to every peer when we get there).  At most
        ASKS_PER_STEP answers per peer and step asked, and only for its newest step."""
        msg.release()
        peer, step = msg.sender, msg.step
        if peer not in self.peers:
            return
        last_step, answers = self.asks.get(peer, (-1, 0))
        if step < last_step or (step == last_step and answers >= ASKS_PER_STEP):
            return
        have = [s for s in self.sent_models if s >= step]
        if not have:
            return
        self.asks[peer] = (step, answers + 1 if step == last_step else 1)
        s = min(have)
        self._send_model([peer], KIND_PS_MODEL, s, self.sent_models[s])

    def _on_peer_done(self, msg: Message) -> None:
        """A peer finished (PS ranks only, once each: a set)."""
        msg.release()
        if msg.sender in self.peers:
            self.peers_done.add(msg.sender)
            # the correct peers are done once all but fps are (a crashed or Byzantine peer
            # may never say so)
            if len(self.peers_done) >= len(self.peers) - self.cfg.fps:
                self.all_peers_done.set()

    def _reask(self, step: int, least: int, own: torch.Tensor):
        """What a gather does for the peers that did not answer: push our model again (a
        restarted peer lost it) and ask for theirs of step >= ``least`` (ours took theirs
        and lost it, or it went to an outbox that died)."""
        def resend(silent: list[int]) -> None:
            self._send_model(silent, KIND_PS_MODEL, step, own)
            self.node.broadcast(silent, KIND_PS_ASK, least, [])
        return resend

    def _stalled(self, step: int, q: int, what: str):
        def warn(waited: float, answered: list[int]) -> None:
            log.warning("step %d: quorum of %d %s not reached after %.0f s (answered: %s); "
                        "still waiting", step, q, what, waited, answered)
        return warn

    # -- phases -----------------------------------------------------------------------
    async def _gradient_phase(self, t: int, record: dict) -> list[float] | None:
        """Steps 1-3: request, the first q_w gradients, aggregate and step.  Returns the
        workers' losses, or None when enough peers got ahead first (join them)."""
        cfg, replica = self.cfg, self.replica
        # a worker caught forging is asked no more and its gradients are not taken
        workers = [w for w in cfg.worker_ranks if w not in self.gradients.banned]
        q_peers = cfg.q_ps - 1
        self.grad_box.advance(t)  # after a jump the window must start at t
        snapshot = replica.state_vector()
        resend = self._request_gradients(t, snapshot)
        grads = await until_quorum(
            lambda: self.grad_box.collect(t, cfg.q_w, senders=workers, timeout=cfg.resend_after),
            workers, resend=resend,
            interrupt=(lambda: self.models.wait_ready(q_peers, t + 1)) if q_peers else None,
            stall_after=cfg.step_timeout, on_stall=self._stalled(t, cfg.q_w, "gradients"))
        if grads is None:
            return None
        losses = []
        try:
            self._stack(grads, 0, self.grad_rows)
            if self.buffer_rows is not None:
                self._stack(grads, 1, self.buffer_rows)
            for sender, msg in grads.items():
                with self.member(msg):  # docs/design.md §3: what we do with each field
                    meta = grad_meta(msg.meta, cfg.num_ps)
                    for name in meta.refused:
                        self.node.stats.refuse(f"meta.{name}", KIND_GRAD, sender)
                    if meta.loss is not None:
                        losses.append(meta.loss)  # reduced by its median (_record)
                    if meta.rejected:  # at most n_ps per worker and step
                        record["models_rejected"] = record.get("models_rejected", 0) + meta.rejected
        finally:
            for msg in grads.values():
                msg.release()
        # who was aggregated and who was not (late or silent): an attack test must be able to
        # show that the Byzantine ranks reached the rule, not only that accuracy held
        senders = sorted(grads)
        record["quorum"] = senders
        record["late"] = [w for w in workers if w not in grads]
        outcome = self.ps_step(t, snapshot, senders, self.grad_rows, self.buffer_rows)
        for rank in outcome.banned:
            self.node.stats.refuse("forged", KIND_GRAD, rank)
            self.metrics.write(event="banned", step=t, worker=rank)
        if outcome.banned:
            record["banned"] = outcome.banned
        if outcome.lifted is not None:
            self.metrics.write(event="checks_off", step=t, lifted=outcome.lifted)
            record["checks_off"] = True
        self.nonfinite_dropped += len(outcome.nonfinite) + len(outcome.nonfinite_buffers)
        if outcome.nonfinite:
            record["nonfinite"] = outcome.nonfinite
        return losses

    async def _gather(self, t: int, own: torch.Tensor, *, at_least: int | None = None) -> int:
        """The first q_ps - 1 peers' models of step >= t (>= ``at_least`` if given) with
        ours; the model rule aggregates them.  Returns the step the PS continues from (t + 1,
        or later when its peers are ahead and it jumps to them)."""
        cfg, M = self.cfg, self.model_rows
        q = cfg.q_ps - 1
        least = t if at_least is None else at_least
        models = await until_quorum(
            lambda: self.models.collect(q, least, timeout=cfg.resend_after, keep_ahead=True), self.peers,
            resend=self._reask(t, least, own),
            stall_after=cfg.step_timeout, on_stall=self._stalled(t, q, "peer models"))
        try:
            M[0].copy_(own)
            self._stack(models, 0, M[1:])
            steps = {s: m.step for s, m in models.items()}
        finally:
            for msg in models.values():
                msg.release()
        reached = min(steps.values())
        self._gathered(t, steps)
        self.model_quorum = sorted(steps)
        self.replica.load_state_vector(self._aggregate_models(M))
        if reached > t:
            log.info("PS %d was behind at step %d: jumped to its peers' step %d", cfg.rank, t, reached)
            self.metrics.write(event="jump", step=t, to_step=reached + 1)
            # our model of the step we jumped to: a peer still gathering at that step (the
            # last one, say) needs it, and nothing else would ever send one of that step
            self._send_model(self.peers, KIND_PS_MODEL, reached, self.replica.state_vector())
            if self.checkpoints is not None:
                self.checkpoints.maybe_save(reached + 1, self.replica)
        return max(t, reached) + 1

    def _aggregate(self, rule: str, rows: torch.Tensor, f: int, params: dict, *,
                   pipeline: Pipeline | None = None) -> tuple[torch.Tensor, list[int]]:
        """(aggregate, indices of the rows left out for NaN/Inf) of models or BatchNorm buffers:
        NaN/Inf rows dropped, then ``pipeline``'s stages in order, the rule (the gradients go
        through :attr:`gradients`)."""
        out, dropped = aggregate_finite(rule, rows, f, drop_nonfinite=self.cfg.drop_nonfinite,
                                        pipeline=pipeline, step=self.step, seed=self.cfg.seed,
                                        **params)
        self.nonfinite_dropped += len(dropped)
        return out, dropped

    def _aggregate_models(self, M: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        params = cfg.gar_args if cfg.model_rule == cfg.gar else {}
        return self._aggregate(cfg.model_rule, M, cfg.fps, params, pipeline=self.model_pre_agg)[0]

    @staticmethod
    def _stack(messages: dict[int, Message], index: int, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor ``index`` of each message into a row of ``out`` (sender order)."""
        for row, sender in enumerate(sorted(messages)):
            out[row].copy_(messages[sender].tensors[index])
        return out

    # -- the step loop ------------------------------------------------------------------
    async def _steps(self) -> None:
        cfg, replica = self.cfg, self.replica
        q_peers = cfg.q_ps - 1
        t = self.step
        self.next_eval = (t // cfg.acc_freq + 1) * cfg.acc_freq
        while t < cfg.num_iter:
            self.step = t
            started = time.perf_counter()
            if self.behaviour is not None and self.behaviour.before_step(t):
                return  # crash / silent behaviours end here
            if q_peers > 0 and self.models.ready(q_peers, t + 1):
                # enough peers are ahead: skip the gradient phase, join them
                t = await self._gather(t, replica.state_vector(), at_least=t + 1)
                continue
            record: dict = {}
            losses = await self._gradient_phase(t, record)
            if losses is None:  # enough peers got ahead meanwhile: join them
                t = await self._gather(t, replica.state_vector(), at_least=t + 1)
                continue
            t_next = t + 1
            if q_peers > 0 and self._gathers_after(t):
                t_next = await self._gather_phase(t, record)
                record["model_quorum"] = self.model_quorum
            self._record(t, t_next, time.perf_counter() - started, losses, record)
            t = t_next
        self.step = cfg.num_iter
        self._report_done()

    def _record(self, t: int, t_next: int, step_time: float, losses: list[float], record: dict) -> None:
        """Step 5: the step's metrics record, with an evaluation every --acc_freq steps."""
        cfg, replica = self.cfg, self.replica
        self.step_times.append(step_time)
        last = t_next >= cfg.num_iter
        record.update(step=t, step_time=step_time, loss=median_finite(losses),
                      bytes_sent=self.node.stats.bytes_sent,
                      bytes_received=self.node.stats.bytes_received)
        # Garfield's --bench / --log lines (each independently, every step, at the PS):
        # the step's wall time; the loss of the step (the median of the finite losses the
        # aggregated gradients report: fw liars cannot move it out of the correct ones' range,
        # a mean they could overflow) and the loss accumulated so far (mean over the steps)
        if cfg.bench:
            log.info("step %d takes %.6f s", t, step_time)
        if cfg.log:
            if record["loss"] is not None:
                self.loss_total += record["loss"]
                self.loss_steps += 1
            log.info("step %d loss %s accumulated %s", t, _fmt(record["loss"]),
                     _fmt(self.loss_total / self.loss_steps if self.loss_steps else None))
        if last or t_next >= self.next_eval:
            self.next_eval = (t_next // cfg.acc_freq + 1) * cfg.acc_freq
            self.accuracy, test_loss = replica.evaluate(full=last)
            self.evaluated_at = t_next
            record.update(accuracy=self.accuracy, test_loss=test_loss)
            log.info("step %d/%d loss %s accuracy %.2f%% (%.3f s/step)", t + 1, cfg.num_iter,
                     _fmt(record["loss"]), self.accuracy,
                     statistics.median(self.step_times[-cfg.acc_freq:]))
        self.models_rejected += record.get("models_rejected", 0)
        self.metrics.write(**record)
        if self.checkpoints is not None:
            self.checkpoints.maybe_save(t_next, replica)

    def _report_done(self) -> None:
        cfg = self.cfg
        if self.evaluated_at < cfg.num_iter:  # the run ended on a jump: evaluate what we hold
            self.accuracy, test_loss = self.replica.evaluate(full=True)
            self.metrics.write(step=cfg.num_iter - 1, accuracy=self.accuracy, test_loss=test_loss)
        self._ended()
        warm = self.step_times[min(5, len(self.step_times) - 1):] if self.step_times else [0.0]
        self.metrics.write(event="done", step=cfg.num_iter, final_accuracy=self.accuracy,
                           nonfinite_dropped=self.nonfinite_dropped,
                           models_rejected=self.models_rejected,
                           median_step_time=statistics.median(warm),
                           bytes_sent=self.node.stats.bytes_sent,
                           bytes_received=self.node.stats.bytes_received,
                           rejected=dict(self.node.stats.rejected),
                           refused=dict(self.node.stats.refused_from),
                           failures=dict(self.node.stats.failures))
        log.info("PS %d done: %d steps, final accuracy %.2f%%, median %.4f s/step", cfg.rank,
                 cfg.num_iter, self.accuracy if self.accuracy is not None else float("nan"),
                 statistics.median(warm))

    # -- life cycle (see Role.run) --------------------------------------------------------
    def _started(self) -> None:
        cfg = self.cfg
        log.info("PS %d listening on port %d (%s mode, gar=%s, model rule=%s, q_w=%d, q_ps=%d, "
                 "device %s)", cfg.rank, self.node.port, cfg.mode, cfg.gar, cfg.model_rule, cfg.q_w,
                 cfg.q_ps, describe_device(self.replica.device))
        self.metrics.write(event="start", rank=cfg.rank, role="ps", config=cfg.to_dict(),
                           parameters=self.replica.grad_size, state_size=self.replica.state_size,
                           device=str(self.replica.device),
                           resumed_at=self.step)

    def _failed(self, exc: ByzSGDError) -> None:
        log.error("PS %d stopped: %s", self.cfg.rank, exc)
        self.metrics.write(event="error", error=str(exc))

    def _stopped(self) -> None:
        log.info("PS %d stopped by signal at step %d", self.cfg.rank, self.step)
        self.metrics.write(event="stopped", step=self.step)

    async def _shutdown(self) -> None:
        # Tell the workers (they leave once every PS is) and the peers (they stop waiting
        # for us) that we are done.
        try:
            self.node.broadcast(self.cfg.worker_ranks + self.peers, KIND_DONE, self.step, [])
        except Exception:  # pragma: no cover - closing anyway
            pass
        if self.peers and self.step >= self.cfg.num_iter and self.stop is not None:
            await self._grace()
        self.models.close()
        await self.node.close(drain_timeout=DRAIN_S)
        self.metrics.close()

    async def _grace(self) -> None:
        """After the last step, keep answering the peers' re-asks (a peer in its last
        gather may have lost our model, or needs it because the others left) until all
        peers but fps are done — the correct ones: each of them needs q_ps - 1 peer models
        of its last step, ours possibly among them — for at most --step_timeout, or until
        a signal."""
        try:
            await asyncio.wait_for(race(self.all_peers_done.wait(), self.stop.wait()),
                                   self.cfg.step_timeout)
        except asyncio.TimeoutError:
            pass
