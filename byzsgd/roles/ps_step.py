"""The PS step on one gradient quorum: what a PS does between "the q_w gradients are in" and
"the model moved".  One object, :class:`PSStep`, so that the deployed PS
(:meth:`byzsgd.roles.ps_base.PSBase._gradient_phase`) and the in-process screen
(:mod:`byzsgd.experiments.screen`) step the same way:

1. the spot checks (``--check_gradients``, :mod:`byzsgd.roles.gradient_check`): a worker caught
   forging is banned from the aggregation;
2. the gradient aggregation (:class:`byzsgd.roles.gradient_aggregation.GradientAggregation`:
   non-finite rows, the per-worker momentum stage, the rows that enter, ``--pre_agg``, ``--gar``);
3. the BatchNorm buffers, when the model has any, with the same rule (NaN/Inf rows left out);
4. one optimizer step of the replica.

Collecting the quorum, its members' metadata and the metrics stay with the caller.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from byzsgd.config import RunConfig
from byzsgd.roles.aggregation import aggregate_finite
from byzsgd.roles.gradient_aggregation import GradientAggregation
from byzsgd.roles.gradient_check import GradientCheck
from byzsgd.roles.replica import Replica

__all__ = ["PSStep", "StepOutcome"]

log = logging.getLogger("byzsgd.ps")


@dataclass
class StepOutcome:
    """What one step found: the workers ``banned`` by the spot checks at this step, the
    senders whose gradient rows (``nonfinite``) or buffer rows (``nonfinite_buffers``) were
    left out as NaN/Inf, and ``lifted`` when the checks went off (:meth:`PSStep.lift_bans`)."""
    banned: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    nonfinite_buffers: list[int] = field(default_factory=list)
    #: the workers whose bans were lifted when the checks were found unreliable at this step
    #: (:meth:`PSStep.lift_bans`); None when that did not happen
    lifted: list[int] | None = None


class PSStep:
    """The PS step of ``cfg`` on ``replica`` (the PS's model); ``rng`` draws the spot-checked
    rows (default: the operating system's random source, which no worker can predict)."""

    def __init__(self, cfg: RunConfig, replica: Replica, *, rng: random.Random | None = None):
        self.cfg, self.replica = cfg, replica
        self.gradients = GradientAggregation(
            cfg.gar, cfg.fw, cfg.gar_args, dim=replica.grad_size, worker_ranks=cfg.worker_ranks,
            pipeline=cfg.pre_agg, beta=cfg.worker_momentum, rows=cfg.wm_rows,
            staleness=cfg.wm_staleness, drop_nonfinite=cfg.drop_nonfinite, seed=cfg.seed,
            device=replica.device)
        self.check = GradientCheck(cfg, cfg.check_gradients, cfg.check_tolerance, rng=rng) \
            if cfg.check_gradients else None

    @property
    def banned(self) -> set[int]:
        """The workers caught forging: their gradients are taken no more."""
        return self.gradients.banned

    def __call__(self, step: int, snapshot: torch.Tensor, senders: list[int], rows: torch.Tensor,
                 buffers: torch.Tensor | None = None) -> StepOutcome:
        """Step the replica with the quorum ``rows`` (row i from ``senders[i]``, computed on
        the model ``snapshot`` of ``step``) and, when given, its BatchNorm ``buffers`` rows."""
        cfg, out = self.cfg, StepOutcome()
        if self.check is not None and self.gradients.check_off:
            self.check = None  # a resumed PS whose checks were found unreliable before
        if self.check is not None:
            caught = self.check.check(step, snapshot, senders, rows)
            failed = self.gradients.banned | set(caught)
            if len(failed) > cfg.fw:
                out.lifted = self.lift_bans(step, failed)
            else:
                out.banned = caught
                for rank in caught:
                    self.gradients.ban(rank)
        g, out.nonfinite = self.gradients(step, senders, rows)
        agg_buffers = None
        if buffers is not None:
            agg_buffers, dropped = aggregate_finite(cfg.gar, buffers, cfg.fw,
                                                    drop_nonfinite=cfg.drop_nonfinite, step=step,
                                                    seed=cfg.seed, **cfg.gar_args)
            out.nonfinite_buffers = [senders[i] for i in dropped]
        self.replica.apply_gradient(g, agg_buffers)
        return out

    def lift_bans(self, step: int, failed: set[int]) -> list[int]:
        """More than fw distinct workers (``failed``) failed the spot checks, so correct
        workers fail them: this PS's recomputation is not what its correct workers compute (a different device
        type -- CUDA and CPU draw different dropout masks from one seed --, a different model
        or data).  At most fw workers are Byzantine, so this can only be the setting, never an
        attack: the checks go off for the rest of the run (persisted in the checkpoint) and
        every ban is lifted, so that the PS keeps its quorum of q_w and the rule tolerates fw
        again (an uncapped ban list left fewer than q_w workers to ask: the PS waited for ever).
        Returns the workers whose bans were lifted."""
        lifted = sorted(self.gradients.banned)
        log.error("PS %d, step %d: %d distinct workers (%s) failed the gradient spot checks, more "
                  "than fw=%d Byzantine ones can be: this PS does not recompute what its correct "
                  "workers compute (different device types or software?). The checks are off for "
                  "the rest of the run and every ban is lifted; the rule alone remains.",
                  self.cfg.rank, step, len(failed), ",".join(map(str, sorted(failed))), self.cfg.fw)
        self.gradients.banned.clear()
        self.gradients.check_off = True
        self.check = None
        return lifted
