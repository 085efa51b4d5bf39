"""A parameter server: ``python -m byzsgd.roles.ps``.

Mode ``garfield`` (docs/design.md §3), step t:

1. send the model (tagged t) to every worker — the gradient request;
2. take gradients for step t as they arrive: the first q_w = n_w - fw distinct workers;
3. g = GAR(grads, f=fw); optimizer step;
4. gather: send the updated model to every other PS, take peers' step-t models as they
   arrive until q_ps = n_ps - fps (own included); model = GAR(models, f=fps);
5. every --acc_freq steps evaluate the (consistent) model and log a metrics line.

No sleeps, no polling: each wait is a quorum future of :class:`byzsgd.net.Mailbox`.  A
request nobody answered within --resend_after is sent again to those who did not answer
(a restarted peer lost it), so a late or silent node is never waited for beyond a quorum.
"""
from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time

import torch

from byzsgd import gars
from byzsgd.learning.checkpoint import CheckpointPolicy, common_checkpoint_step
from byzsgd.config import RunConfig
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.metrics import MetricsWriter, diameter
from byzsgd.net import FrameLimits, Message
from byzsgd.net import errors as net_errors
from byzsgd.roles import byzantine
from byzsgd.roles.common import (KIND_DONE, KIND_GRAD, KIND_MODEL, KIND_PS_AFTER, KIND_PS_MODEL, KIND_PULL,
                                 exit_now, install_stop_signals, make_node, setup_logging, until_stopped)
from byzsgd.roles.aggregation import aggregate_finite
from byzsgd.roles.newest import NewestModels
from byzsgd.roles.replica import Replica

log = logging.getLogger("byzsgd.ps")

#: paper --sync: pulls of one worker answered per step served (its own pull and the median's).
PULLS_PER_STEP = 2


class ParameterServer:
    """One PS: owns a model replica, a node, and the step loop."""

    def __init__(self, cfg: RunConfig):
        if not cfg.is_ps:
            raise ConfigError(f"rank {cfg.rank} is a worker (ranks below --num_ps={cfg.num_ps} are PS)")
        cfg.check_resilience()
        self.cfg = cfg
        self.replica = Replica(cfg, with_test_set=True)
        self.limits = FrameLimits.for_model(self.replica.state_size)
        self.node = make_node(cfg, self.limits)
        grad_shapes = [(self.replica.grad_size,)]
        if self.replica.buffer_size:
            grad_shapes.append((self.replica.buffer_size,))
        window = max(8, 2 * cfg.gather_period + 2)
        self.grad_box = self.node.mailbox(KIND_GRAD, window=window, shapes=grad_shapes)
        peers = [r for r in cfg.ps_ranks if r != cfg.rank]
        self.models = NewestModels(KIND_PS_MODEL, peers)
        self.node.on(KIND_PS_MODEL, self.models.deliver, shapes=[(self.replica.state_size,)])
        self.nonfinite_dropped = 0  # NaN/Inf rows left out of aggregations
        # paper --sync: workers pull; the model served for the current step, pulls waiting
        self.serving: tuple[int, torch.Tensor] | None = None
        self.pending_pulls: dict[int, int] = {}
        self.pulls_answered: dict[int, int] = {}  # per worker, for the step served
        if cfg.sync:
            self.node.on(KIND_PULL, self._on_pull, shapes=[])
        # paper mode: models after a gather, to log the exact diameter after it
        self.after_inbox: dict[int, Message] = {}
        self.own_after: tuple[int, torch.Tensor] | None = None
        self.own_before: tuple[int, torch.Tensor] | None = None
        self.late_before: dict[str, float] = {}
        self.measure_after = cfg.mode == "paper" and cfg.log_diameter and cfg.num_ps > 1
        if self.measure_after:
            self.node.on(KIND_PS_AFTER, self._on_after, shapes=[(self.replica.state_size,)])
        self.models_rejected = 0  # paper --sync: models the workers' filters refused
        self.peers = peers
        self.step = 0
        self.checkpoints = CheckpointPolicy(cfg.checkpoint_dir, cfg.checkpoint_every, cfg.rank) \
            if cfg.checkpoint_dir else None
        if self.checkpoints is not None and cfg.resume:
            # PSes sharing a directory resume at the newest step all of them have
            common = common_checkpoint_step(cfg.checkpoint_dir, cfg.ps_ranks)
            resumed = self.checkpoints.restore(self.replica, common)
            self.step = resumed or 0
            log.info("PS %d resumes at step %d from %s", cfg.rank, self.step, cfg.checkpoint_dir)
        self.behaviour = byzantine.ps_behaviour(cfg) if cfg.attack else None
        self.metrics = MetricsWriter(cfg.metrics)
        self.gathered: dict[str, float] = {}
        self.stop: asyncio.Event | None = None  # created inside the event loop

    # -- sending ----------------------------------------------------------------------
    def _send_model(self, ranks, kind: str, step: int, state: torch.Tensor) -> None:
        """Send ``state`` (a snapshot nobody mutates) to ``ranks``; a Byzantine PS forges."""
        if self.behaviour is None:
            self.node.broadcast(ranks, kind, step, [state])
        else:
            self.behaviour.send(self.node, ranks, kind, step, state)

    # -- paper --sync: workers pull -----------------------------------------------------
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
        self.serving = (t, snapshot)
        self.pulls_answered = {}
        ready = [w for w, s in self.pending_pulls.items() if s <= t]
        for w in ready:
            del self.pending_pulls[w]
            self.pulls_answered[w] = 1
        if ready:
            self._send_model(ready, KIND_MODEL, t, snapshot)

    # -- paper mode: the diameter after a gather ------------------------------------------
    def _on_after(self, msg: Message) -> None:
        old = self.after_inbox.get(msg.sender)
        if msg.sender not in self.peers or (old is not None and old.step >= msg.step):
            msg.release()
            return
        if old is not None:
            old.release()
        self.after_inbox[msg.sender] = msg

    def _distances_after(self) -> dict[str, float]:
        """Distances from our model after the last gather to the peers' after theirs (same
        step), for the peers whose model came; those messages are consumed."""
        if self.own_after is None:
            return {}
        step, own = self.own_after
        out = {}
        for sender in [s for s, m in self.after_inbox.items() if m.step <= step]:
            msg = self.after_inbox.pop(sender)
            try:
                if msg.step == step:
                    out[_pair(self.cfg.rank, sender)] = _distance(own, msg.tensors[0], self.replica.grad_size)
            finally:
                msg.release()
        return out

    def _late_distances(self) -> dict[str, float]:
        """Distances from our model before the previous gather to the peers' models of that
        step that came after the quorum (still held, unless a newer one replaced them): the
        pairs the quorum left out of ``distances_before``."""
        if self.own_before is None:
            return {}
        step, own = self.own_before
        return {_pair(self.cfg.rank, s): _distance(own, m.tensors[0], self.replica.grad_size)
                for s, m in self.models.newest.items() if m.step == step}

    def _publish_after(self, t: int) -> None:
        """Log the distances after the previous gather, then send ours after this one."""
        if self.own_after is not None:
            self._log_after()
        own = self.replica.state_vector()
        self.own_after = (t, own)
        self._send_model(self.peers, KIND_PS_AFTER, t, own)

    def _log_after(self) -> None:
        dists = self._distances_after()
        if dists or self.late_before:
            self.metrics.write(event="diameter_after", step=self.own_after[0], distances=dists,
                               distances_before=self.late_before)
        self.late_before = {}

    # -- quorums ----------------------------------------------------------------------
    async def _quorum(self, wait, step: int, q: int, ranks: list[int], resend, what: str,
                      interrupt=None):
        """Await ``wait()`` (a quorum with a timeout); re-send to the silent ranks each time
        it times out.  Never gives up: a stall is logged, the node keeps serving.  Returns
        None if the future ``interrupt()`` completes first."""
        started = time.monotonic()
        warned = False
        while True:
            task = asyncio.ensure_future(wait())
            if interrupt is not None:
                stop = interrupt()
                await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done():
                    task.cancel()
                    try:
                        await task
                    except (asyncio.CancelledError, net_errors.NetError):
                        pass
                    return None
                stop.cancel()
            try:
                return await task
            except net_errors.QuorumTimeout as exc:
                answered = set(getattr(exc, "received", {}) or {})
                silent = [r for r in ranks if r not in answered]
                if resend is not None and silent:
                    resend(silent)
                waited = time.monotonic() - started
                if waited > self.cfg.step_timeout and not warned:
                    warned = True
                    log.warning("step %d: quorum of %d %s not reached after %.0f s (answered: %s); "
                                "still waiting", step, q, what, waited, sorted(answered))

    async def _gather(self, t: int, own: torch.Tensor, M: torch.Tensor, *, at_least: int | None = None) -> int:
        """Gather phase: the first q_ps - 1 peers' models of step >= t with ours; the model
        rule aggregates them.  Returns the step the PS continues from (t + 1, or later when
        its peers are ahead and it jumps to them)."""
        cfg, peers = self.cfg, self.peers
        q = cfg.q_ps - 1
        least = t if at_least is None else at_least
        models = await self._quorum(
            lambda: self.models.gather(q, least, timeout=cfg.resend_after), t, q, peers,
            lambda silent: self._send_model(silent, KIND_PS_MODEL, t, own), "peer models")
        try:
            M[0].copy_(own)
            self._stack(models, 0, M[1:])
            reached = min(m.step for m in models.values())
            if cfg.mode == "paper":  # what DMC contracts: the rows of step t, before it
                ranks = [cfg.rank] + [s for s in sorted(models) if models[s].step == t]
                rows = [0] + [1 + i for i, s in enumerate(sorted(models)) if models[s].step == t]
                self.gathered = {_pair(ranks[a], ranks[b]): _distance(M[rows[a]], M[rows[b]], self.replica.grad_size)
                                 for a in range(len(rows)) for b in range(a + 1, len(rows))}
        finally:
            for msg in models.values():
                msg.release()
        self.replica.load_state_vector(self._aggregate_models(M))
        if reached > t:
            log.info("PS %d was behind at step %d: jumped to its peers' step %d", cfg.rank, t, reached)
            self.metrics.write(event="jump", step=t, to_step=reached + 1)
            if self.checkpoints is not None:
                self.checkpoints.maybe_save(reached + 1, self.replica)
        return max(t, reached) + 1

    def _aggregate(self, rule: str, rows: torch.Tensor, f: int, params: dict) -> torch.Tensor:
        out, dropped = aggregate_finite(rule, rows, f, drop_nonfinite=self.cfg.drop_nonfinite, **params)
        self.nonfinite_dropped += dropped
        return out

    def _aggregate_models(self, M: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        params = cfg.gar_args if cfg.model_rule == cfg.gar else {}
        return self._aggregate(cfg.model_rule, M, cfg.fps, params)

    @staticmethod
    def _stack(messages: dict[int, Message], index: int, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor ``index`` of each message into a row of ``out`` (sender order), release."""
        for row, sender in enumerate(sorted(messages)):
            msg = messages[sender]
            out[row].copy_(msg.tensors[index])
        return out

    # -- the step loop ------------------------------------------------------------------
    async def run(self) -> int:
        self.stop = asyncio.Event()
        install_stop_signals(self.stop)
        cfg = self.cfg
        finished = True  # unless a signal stops the loop
        try:
            started, _ = await until_stopped(self.node.start(timeout=self.cfg.startup_timeout),
                                             self.stop)
            if not started:  # stopped by a signal while still meeting the others
                return 0
            log.info("PS %d listening on port %d (%s mode, gar=%s, model rule=%s, q_w=%d, q_ps=%d)",
                     cfg.rank, self.node.port, cfg.mode, cfg.gar, cfg.model_rule, cfg.q_w, cfg.q_ps)
            self.metrics.write(event="start", rank=cfg.rank, role="ps", config=cfg.to_dict(),
                               parameters=self.replica.grad_size, state_size=self.replica.state_size,
                               resumed_at=self.step)
            finished, _ = await until_stopped(self._train(), self.stop)
        except ByzSGDError as exc:
            log.error("PS %d stopped: %s", cfg.rank, exc)
            self.metrics.write(event="error", error=str(exc))
            return 1
        finally:
            if not finished:
                log.info("PS %d stopped by signal at step %d", cfg.rank, self.step)
                self.metrics.write(event="stopped", step=self.step)
            await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        # Tell the workers we are done, so they can leave once every PS is.
        try:
            self.node.broadcast(self.cfg.worker_ranks, KIND_DONE, self.step, [])
        except Exception:  # pragma: no cover - closing anyway
            pass
        self.models.close()
        for msg in self.after_inbox.values():
            msg.release()
        self.after_inbox.clear()
        await self.node.close()
        self.metrics.close()

    async def _train(self) -> None:
        cfg, replica = self.cfg, self.replica
        workers = cfg.worker_ranks
        peers = self.peers
        q_peers = cfg.q_ps - 1
        G = torch.empty(cfg.q_w, replica.grad_size)
        B = torch.empty(cfg.q_w, replica.buffer_size) if replica.buffer_size else None
        M = torch.empty(cfg.q_ps, replica.state_size)
        step_times: list[float] = []
        accuracy = None
        t = self.step
        next_eval = (t // cfg.acc_freq + 1) * cfg.acc_freq
        evaluated_at = -1
        while t < cfg.num_iter:
            self.step = t
            started = time.perf_counter()
            if self.behaviour is not None and self.behaviour.before_step(t):
                return  # crash / silent behaviours end here
            record: dict = {}
            if q_peers > 0 and self.models.ready(q_peers, t + 1):
                # enough peers are ahead: skip the gradient phase, join them
                t = await self._gather(t, replica.state_vector(), M, at_least=t + 1)
                continue
            # 1. gradient request: the model of step t to every worker.
            self.grad_box.advance(t)  # after a jump the window must start at t
            snapshot = replica.state_vector()
            if cfg.sync:  # workers pull it (each from one PS)
                self._serve(t, snapshot)
                resend = None
            else:
                self._send_model(workers, KIND_MODEL, t, snapshot)
                resend = lambda silent: self._send_model(silent, KIND_MODEL, t, snapshot)  # noqa: E731
            # 2. the first q_w distinct workers' gradients, as they arrive.
            grads = await self._quorum(
                lambda: self.grad_box.collect(t, cfg.q_w, senders=workers, timeout=cfg.resend_after),
                t, cfg.q_w, workers, resend,
                "gradients", interrupt=(lambda: self.models.wait_ready(q_peers, t + 1)) if q_peers else None)
            if grads is None:  # enough peers got ahead meanwhile: join them
                t = await self._gather(t, replica.state_vector(), M, at_least=t + 1)
                continue
            losses = []
            try:
                self._stack(grads, 0, G)
                if B is not None:
                    self._stack(grads, 1, B)
                for msg in grads.values():
                    meta = msg.meta if isinstance(msg.meta, dict) else {}
                    loss = meta.get("loss")
                    if isinstance(loss, (int, float)) and math.isfinite(loss):
                        losses.append(float(loss))
                    rejected = meta.get("rejected")
                    if type(rejected) is int and 0 <= rejected <= cfg.num_ps:  # a liar cannot inflate it
                        record["models_rejected"] = record.get("models_rejected", 0) + rejected
            finally:
                for msg in grads.values():
                    msg.release()
            # 3. aggregate and step.
            g = self._aggregate(cfg.gar, G, cfg.fw, cfg.gar_args)
            buffers = self._aggregate(cfg.gar, B, cfg.fw, cfg.gar_args) if B is not None else None
            replica.apply_gradient(g, buffers)
            # 4. gather the peers' models (every step; every --gather_period in paper mode).
            t_next = t + 1
            if q_peers > 0 and (cfg.mode == "garfield" or (t + 1) % cfg.gather_period == 0):
                if self.measure_after:
                    self.late_before = self._late_distances()
                own = replica.state_vector()
                self._send_model(peers, KIND_PS_MODEL, t, own)
                self.own_before = (t, own)
                self.gathered = {}
                t_next = await self._gather(t, own, M)
                if cfg.mode == "paper":  # M still holds the gathered models: what DMC contracts
                    record["diameter_before"] = diameter(M)
                    record["distances_before"] = self.gathered
                    if self.measure_after and t_next == t + 1:
                        self._publish_after(t)
            step_time = time.perf_counter() - started
            step_times.append(step_time)
            # 5. evaluate a consistent snapshot.
            last = t_next >= cfg.num_iter
            record.update(step=t, step_time=step_time,
                          loss=statistics.fmean(losses) if losses else None,
                          bytes_sent=self.node.stats.bytes_sent,
                          bytes_received=self.node.stats.bytes_received)
            if last or t_next >= next_eval:
                next_eval = (t_next // cfg.acc_freq + 1) * cfg.acc_freq
                accuracy, test_loss = replica.evaluate(full=last)
                evaluated_at = t_next
                record.update(accuracy=accuracy, test_loss=test_loss)
                if cfg.log:
                    log.info("step %d/%d loss %.4f accuracy %.2f%% (%.3f s/step)", t + 1,
                             cfg.num_iter, record["loss"] or float("nan"), accuracy,
                             statistics.median(step_times[-cfg.acc_freq:]))
            elif cfg.bench:
                log.info("step %d: %.4f s", t, step_time)
            self.models_rejected += record.get("models_rejected", 0)
            self.metrics.write(**record)
            if self.checkpoints is not None:
                self.checkpoints.maybe_save(t_next, replica)
            t = t_next
        self.step = cfg.num_iter
        if evaluated_at < cfg.num_iter:  # the run ended on a jump: evaluate what we hold
            accuracy, test_loss = replica.evaluate(full=True)
            self.metrics.write(step=cfg.num_iter - 1, accuracy=accuracy, test_loss=test_loss)
        if self.measure_after and self.own_after is not None:  # the last gather's, as far as come
            self.late_before = self._late_distances()
            self._log_after()
        warm = step_times[min(5, len(step_times) - 1):] if step_times else [0.0]
        self.metrics.write(event="done", step=cfg.num_iter, final_accuracy=accuracy,
                           nonfinite_dropped=self.nonfinite_dropped,
                           models_rejected=self.models_rejected,
                           median_step_time=statistics.median(warm),
                           bytes_sent=self.node.stats.bytes_sent,
                           bytes_received=self.node.stats.bytes_received)
        log.info("PS %d done: %d steps, final accuracy %.2f%%, median %.4f s/step", cfg.rank,
                 cfg.num_iter, accuracy if accuracy is not None else float("nan"),
                 statistics.median(warm))


def _pair(a: int, b: int) -> str:
    """The metrics key of a pair of PS ranks: ``"low-high"``."""
    return f"{min(a, b)}-{max(a, b)}"


def _distance(x: torch.Tensor, y: torch.Tensor, num_params: int) -> float:
    """Euclidean distance of two state vectors over the parameters."""
    return float(torch.linalg.vector_norm((x[:num_params] - y[:num_params]).double()))


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.ps`` (see :func:`byzsgd.roles.entry.run_role`)."""
    from byzsgd.roles.entry import main as entry_main

    return entry_main("ps", argv)


if __name__ == "__main__":
    exit_now(main())
