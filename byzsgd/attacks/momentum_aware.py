"""Momentum-aware attacks: choose the gradient that puts a chosen row into the PS's momentum.

Why: with ``--worker_momentum beta`` the PS aggregates one momentum row per worker
(:class:`byzsgd.gars.worker_momentum.WorkerMomentum`, heavy-ball rows ``buf <- beta buf + g``,
``buf_1 = g``), not the gradients.  An attack computed on the honest *gradients* and sent as a
gradient is averaged away by the PS's momentum; the attacker that knows the momentum state
aims at the rows the rule really sees instead:

* its own row at the PS is known exactly: the PS computes it from what the attacker sent, and
  the adversary that orders the messages knows its gradient was in the quorum;
* the honest rows are tracked from the honest gradients it is told (the omniscient adversary),
  with the PS's exact arithmetic: an exponential average ``m <- beta m + (1 - beta) g`` started at
  zero, in the PS's dtype (float32), the row being ``m / (1 - beta)`` (so the first row is ``g``);
  a rank's momentum moves only at the steps where its gradient is used, non-finite gradients
  never enter (the PS drops them first).

Given the row ``target`` it wants (any registered attack applied to the honest momentum rows,
with the defence-aware search on those rows: :meth:`MomentumAwareAttacker.forge`), it sends
``g = target - beta * row_old``: then ``beta m_old + (1 - beta) g = (1 - beta) target``, i.e. the
PS's row is ``target`` (to float rounding; the attacker then records what the PS computes from
``g``, not ``target``, so the rounding never accumulates).  A non-finite target (``inf`` /
``nan`` attacks) gives a non-finite gradient, which the PS drops: the row is then not updated.

Pure state, no network: the in-process screen (:mod:`byzsgd.experiments.screen`) and the
worker role (:mod:`byzsgd.roles.byzantine`) drive it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from byzsgd.attacks.registry import forge as forge_rows
from byzsgd.errors import ConfigError

__all__ = ["MomentumAwareAttacker", "MomentumAwareWorker"]


class MomentumAwareAttacker:
    """The PS's per-worker momentum as the attacker tracks it (see the module docstring).

    ``beta``: the PS's ``--worker_momentum``; ``dtype``: the PS's momentum dtype (float32, as
    :class:`WorkerMomentum`'s default); ``device``: where the momenta live (default: that of
    the first gradient observed)."""

    def __init__(self, beta: float, *, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str | None" = None):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) < 1.0:
            raise ConfigError(f"momentum-aware attack: beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.dim: int | None = None
        self._ema: dict[int, torch.Tensor] = {}  # rank -> m (the PS's EMA, not yet / (1 - beta))

    # -- state ----------------------------------------------------------------------------
    def _vector(self, t: torch.Tensor, what: str) -> torch.Tensor:
        v = t.reshape(-1)
        if self.dim is None:
            self.dim = v.numel()
            if self.device is None:
                self.device = v.device
        elif v.numel() != self.dim:
            raise ValueError(f"momentum-aware attack: {what} of size {v.numel()}, expected {self.dim}")
        return v.to(device=self.device, dtype=self.dtype)

    def _update(self, rank: int, g: torch.Tensor) -> None:
        m = self._ema.get(rank)
        if m is None:
            m = torch.zeros_like(g)
        self._ema[rank] = m.mul(self.beta).add_(g, alpha=1.0 - self.beta)  # WorkerMomentum.rows

    def observe(self, grads_by_rank: Mapping[int, torch.Tensor]) -> None:
        """The PS used these gradients (rank -> gradient) at this step: update their momentums
        as the PS does.  Non-finite gradients are skipped (the PS drops them before)."""
        for rank, grad in grads_by_rank.items():
            g = self._vector(grad, f"gradient of rank {rank}")
            if bool(torch.isfinite(g).all()):
                self._update(int(rank), g)

    @property
    def ranks(self) -> list[int]:
        """The ranks whose momentum has been updated at least once."""
        return sorted(self._ema)

    def row(self, rank: int) -> torch.Tensor:
        """``rank``'s heavy-ball row at the PS, ``m / (1 - beta)`` (zeros before its first use)."""
        m = self._ema.get(int(rank))
        if m is None:
            if self.dim is None:
                raise ValueError("momentum-aware attack: nothing observed yet (dimension unknown)")
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        return m.div(1.0 - self.beta)  # WorkerMomentum.heavy_ball_rows

    def honest_rows(self, ranks: Iterable[int]) -> torch.Tensor:
        """The heavy-ball rows of ``ranks`` as a [k, d] tensor, in that order."""
        ranks = list(ranks)
        if not ranks:
            raise ValueError("momentum-aware attack: no honest rank given")
        return torch.stack([self.row(r) for r in ranks])

    # -- the attack -------------------------------------------------------------------------
    def gradient_for(self, rank: int, target: torch.Tensor, *, commit: bool = True) -> torch.Tensor:
        """The gradient that makes ``rank``'s row at the PS equal to ``target`` [d]; with
        ``commit`` (default) the attacker records that the PS used it.  Returned in
        ``target``'s dtype and on its device."""
        t = target.reshape(-1)
        if self.dim is None:
            self._vector(t, "target")
        elif t.numel() != self.dim:
            raise ValueError(f"momentum-aware attack: target of size {t.numel()}, expected {self.dim}")
        old = self.row(rank).to(device=t.device, dtype=torch.float64)
        grad = (t.double() - self.beta * old).to(t.dtype)
        if commit:
            self.observe({int(rank): grad})
        return grad

    def forge(self, name: str, byzantine: Sequence[int], honest: Sequence[int] | None = None,
              **params) -> dict[int, torch.Tensor]:
        """Run attack ``name`` on the honest momentum rows (``honest`` ranks; default: every
        tracked rank not in ``byzantine``) and return, per Byzantine rank, the gradient that
        puts its forged row into the PS's momentum (committed).  Rule-aware attacks take the
        rule, f, n and pipeline the PS aggregates these rows with in ``params``."""

        byz = [int(r) for r in byzantine]
        if not byz:
            raise ValueError("momentum-aware attack: no Byzantine rank given")
        ranks = [r for r in self.ranks if r not in byz] if honest is None else list(honest)
        target = forge_rows(name, self.honest_rows(ranks), len(byz), **params)
        return {r: self.gradient_for(r, target[i]) for i, r in enumerate(byz)}

    def state(self) -> dict:
        """A copy of the tracked momenta (rank -> heavy-ball row): for tests and reports."""
        return {r: self.row(r) for r in self.ranks}


class MomentumAwareWorker:
    """The worker role's side (``attack_args: {"momentum_aware": true, "collude": true}``):
    one Byzantine worker that knows, at each step, its own honest gradient (row 0, never sent)
    and the other workers' honest gradients (rows 1.., always in the same order).

    What a deployment's worker cannot know is which honest gradients entered each PS's
    quorum, so it assumes all of them did (each PS then holds the same honest momentums);
    its own row is exact when its gradient is in the quorums (the adversarially scheduled
    deployment).  The screen, which knows the quorum, drives :class:`MomentumAwareAttacker`
    directly and is exact.  A worker answers several requests per step (one per PS, each on
    that PS's model): the momentums move once per step, at its first request, and the
    gradient recorded as sent is that first one."""

    OWN = -1  # the tracker's key for this worker's own row

    def __init__(self, beta: float, name: str, f: int):
        self.tracker = MomentumAwareAttacker(beta)
        self.name, self.f = name, f
        self._step: int | None = None
        self._sent: torch.Tensor | None = None

    def gradient(self, step: int, known: torch.Tensor, params: dict) -> torch.Tensor:
        """The gradient to send at ``step`` given the known rows [k, d] (see the class doc)."""

        tr = self.tracker
        if known.shape[0] < 2:
            raise ConfigError("momentum-aware attack needs the other workers' gradients (collude: true)")
        if self._step is None or step > self._step:
            if self._sent is not None:
                tr.observe({self.OWN: self._sent})
            tr.observe({i: known[i] for i in range(1, known.shape[0])})
            self._step, self._sent = step, None
        target = forge_rows(self.name, tr.honest_rows(range(1, known.shape[0])).to(known.dtype),
                            self.f, **params)[0]
        grad = tr.gradient_for(self.OWN, target, commit=False).contiguous()
        if self._sent is None and step == self._step:
            self._sent = grad.clone()
        return grad
