"""Spot checks of the workers' gradients: a protocol lever no aggregation rule has.

Why: under the asynchronous adversary (its fw workers in every quorum, omniscient) every
robust rule is left with an error of the order of the honest rows' spread (the (f, kappa)
bound, docs/worst_case.md), and attacks that hide inside that spread (minmax, minsum on the
momentum rows) drive the model away step after step.  But in this deployment a correct
worker's gradient is a *function*: of the model the PS sent for step t, of the worker's batch
for step t (its shard and batches are a seeded, public function of the deployment:
:class:`byzsgd.learning.shards.WorkerShard`) and of the seeded forward pass
(:func:`byzsgd.roles.replica.step_seed`).  So a PS can recompute it.

Each step the PS recomputes the gradients of ``k`` members of the quorum drawn with a private
random source (``random.SystemRandom``: a worker cannot know whether its row will be checked
when it sends it) and compares: a row further than ``tolerance`` (relative L2 distance) from
the recomputed one is a forgery, and its sender is **banned** at this PS for the rest of the
run: its gradients are no longer taken (the quorum of q_w comes from the others: at most fw
are faulty) and it no longer counts among the Byzantine rows the rule must tolerate.

What it costs: ``k`` gradient computations per step at the PS (a worker's cost), a model copy
and the training set.  What it bounds: a Byzantine worker that forges a row every step is
checked with probability k / q_w each step, so it is banned after q_w / k forged steps on
average, whatever it forges; one that forges rarely to stay unbanned does proportionally
little.  What it never does: ban more than fw workers.  Correct workers fail the check only
when the PS's recomputation is not theirs (a CUDA worker and a CPU PS draw different dropout
masks from one seed; other software or data), so a (fw+1)-th failing worker proves the setting
wrong, and the PS turns the checks off and lifts every ban
(:meth:`byzsgd.roles.ps_step.PSStep.lift_bans`) rather than ban its correct workers until it
has fewer than q_w to ask.  What it cannot check: ``--mode paper`` (a worker's gradient is
computed on the median of the models it gathered, which the PS does not know), so it is
refused there.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from typing import Callable

import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError

__all__ = ["GradientCheck"]

log = logging.getLogger("byzsgd.ps")


class GradientCheck:
    """``check(step, state, senders, rows)`` -> the senders banned by this check.

    ``recompute(rank, state, step)`` (default: a worker replica of this deployment on this
    PS) returns the gradient a correct worker ``rank`` sends for ``step`` on ``state``;
    ``rng`` draws the checked rows (default: the operating system's random source)."""

    def __init__(self, cfg: RunConfig, k: int, tolerance: float, *,
                 recompute: Callable[[int, torch.Tensor, int], torch.Tensor] | None = None,
                 rng: random.Random | None = None):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= cfg.q_w:
            raise ConfigError(f"--check_gradients must be an int in [1, q_w={cfg.q_w}], got {k!r}")
        if not tolerance > 0:
            raise ConfigError(f"--check_tolerance must be > 0, got {tolerance!r}")
        if cfg.mode != "garfield":
            raise ConfigError("--check_gradients needs --mode garfield: in paper mode a worker's "
                              "gradient is computed on the median of the models it gathered, "
                              "which the PS cannot know")
        self.k, self.tolerance = k, float(tolerance)
        self.cfg = cfg
        self.rng = rng or random.SystemRandom()
        self._recompute = recompute or self._replica_gradient
        self._replica = None
        self._shards: dict[int, object] = {}
        self.banned: dict[int, int] = {}  # rank -> the step it was caught at
        self.checked = 0

    def check(self, step: int, state: torch.Tensor, senders: list[int], rows: torch.Tensor) -> list[int]:
        """Recompute ``k`` random rows of ``rows`` (row i from ``senders[i]``; ``state``: the
        model the PS asked step ``step``'s gradients on); ban the senders of forged ones."""
        picks = self.rng.sample(range(len(senders)), min(self.k, len(senders)))
        caught = []
        for i in picks:
            rank = senders[i]
            want = self._recompute(rank, state, step).to(rows.device, rows.dtype)
            got = rows[i]
            self.checked += 1
            if not bool(torch.isfinite(want).all()):
                continue  # the model itself diverged: a correct worker's row is not finite either
            err = (got.double() - want.double()).norm()
            scale = want.double().norm().clamp_min(1e-12)
            if not bool(torch.isfinite(err)) or float(err / scale) > self.tolerance:
                self.banned[rank] = step
                caught.append(rank)
                log.warning("PS %d: worker %d's gradient of step %d is not the one its batch gives "
                            "(relative error %.3g > %.3g): banned", self.cfg.rank, rank, step,
                            float(err / scale) if bool(torch.isfinite(err)) else float("inf"),
                            self.tolerance)
        return caught

    # -- the default recomputation: a worker replica of this deployment ---------------------
    def _replica_gradient(self, rank: int, state: torch.Tensor, step: int) -> torch.Tensor:
        from byzsgd.learning import device_data, shards
        from byzsgd.roles.replica import Replica

        cfg = self.cfg
        if self._replica is None:
            # a plain RunConfig (a ValidatedConfig's replace would run every check again)
            plain = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
            first = RunConfig(**{**plain, "rank": cfg.worker_ranks[0], "attack": None, "attack_args": {}})
            self._replica = Replica(first, with_train_shard=True)
        replica = self._replica
        shard = self._shards.get(rank)
        if shard is None:
            index = rank - cfg.num_ps
            base = replica.shard
            shard = device_data.on_device(
                shards.WorkerShard(base.dataset, index, cfg.num_workers, cfg.batch, split=cfg.split,
                                 seed=cfg.seed, augment=base.augment), replica.device)
            self._shards[rank] = shard
        return replica.gradient_of(shard, rank - cfg.num_ps, state, step)
