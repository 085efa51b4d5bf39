"""Per-worker momentum computed by the PS, before aggregation (pure state, no network).

Why: with momentum taken per worker *before* the robust rule, the honest inputs' variance
shrinks by ~(1 - beta)/(1 + beta) while a Byzantine worker's lie does not get the same
benefit, which is what defeats small-but-consistent attacks such as ALIE (Karimireddy,
He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021;
El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient SGD", ICLR 2021;
Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Byzantine Machine Learning Made Easy by
Resilient Averaging of Momentums", ICML 2022).

Convention (Farhadkhani et al. 2022; Karimireddy et al. 2021 write the same as
``m = (1 - beta) g + beta m``), an exponential average started at zero::

    m_i <- beta * m_i + (1 - beta) * g_i

In steady state this has the gradient's scale, whereas the heavy-ball momentum of
``torch.optim.SGD`` (``buf <- momentum * buf + g``, ``buf_1 = g_1``) has 1/(1 - momentum)
times it.  :meth:`WorkerMomentum.heavy_ball_rows` returns ``m_i / (1 - beta)``, which is
exactly PyTorch's buffer (``m_1 / (1 - beta) = g_1``, then ``beta buf + g``): this is what a
PS aggregates (``--worker_momentum``), so that switching from optimizer momentum beta to
worker momentum beta keeps the learning rate's meaning.  The two are never stacked
(:func:`check_worker_momentum`, :func:`optimizer_args`: an optimizer momentum equal to beta
means that momentum moved to the workers).

Workers outside a quorum: a worker's momentum is updated only at the steps where its
gradient is used (it is in the quorum); otherwise it is left as it was, not decayed.  The PS
computes every momentum from the gradients it received, so a Byzantine worker can only
choose its gradient, never its momentum, and cannot opt out of the averaging.

Non-finite gradients never enter a momentum: the caller drops a gradient row with a NaN/Inf
coordinate before calling :meth:`WorkerMomentum.rows` (as the PS already does with
``--drop_nonfinite``); :meth:`rows` refuses one with ValueError rather than poisoning the buffer
for ever.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from byzsgd.errors import ConfigError

__all__ = ["WorkerMomentum", "check_worker_momentum", "optimizer_args"]


def _beta(beta) -> float:
    if isinstance(beta, bool):
        raise ConfigError(f"worker momentum beta must be a number in [0, 1), got {beta!r}")
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ConfigError(f"worker momentum beta must be a number in [0, 1), got {beta!r}") from None
    if not 0.0 <= b < 1.0:
        raise ConfigError(f"worker momentum beta must be in [0, 1), got {beta!r} "
                          f"(beta = 1 would never move; 0 disables it)")
    return b


def check_worker_momentum(beta, opt_args: Mapping | None) -> float:
    """Validate ``--worker_momentum beta`` against the PS optimizer's arguments; return beta.

    With ``beta > 0`` the momentum moves from the PS's optimizer to the workers' streams: the
    optimizer's ``momentum`` must be 0 (or absent) or ``beta`` itself, which then means the
    same momentum taken per worker (:func:`optimizer_args` drops it from the PS's optimizer,
    so it is never applied twice).  Refused: beta outside [0, 1); beta > 0 with another
    optimizer momentum (two momentums stacked, or an ambiguous one), or with ``nesterov`` /
    ``dampening`` (not defined per worker).  ``opt_args`` values may be strings (Garfield's
    ``--opt_args '{"lr": "0.05", "momentum": "0.9"}'``)."""
    b = _beta(beta)
    args = opt_args or {}
    raw = args.get("momentum", 0)
    try:
        mom = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--opt_args momentum must be a number, got {raw!r}") from None
    if b > 0.0 and mom != 0.0 and mom != b:
        raise ConfigError(
            f"--worker_momentum {b} with optimizer momentum {raw} (from --opt_args): the PS would "
            f"apply momentum twice; with worker momentum set --opt_args momentum to 0 or to {b} "
            f"(the same momentum, taken per worker: the PS aggregates PyTorch-style buffers "
            f"m <- {b} m + g and its optimizer runs without momentum; keep the same lr), or "
            f"--worker_momentum 0")
    if b > 0.0:
        from byzsgd.flags import parse_bool

        if parse_bool(str(args.get("nesterov", False))) or float(args.get("dampening", 0) or 0) != 0:
            raise ConfigError(f"--worker_momentum {b}: nesterov / dampening in --opt_args are not "
                              f"defined for per-worker momentum; remove them or use "
                              f"--worker_momentum 0")
    return b


def optimizer_args(beta, opt_args: Mapping | None) -> dict:
    """The PS optimizer's arguments under ``--worker_momentum beta``: ``opt_args`` without its
    momentum when beta > 0 (the momentum is the workers' then), else ``opt_args`` unchanged."""
    args = dict(opt_args or {})
    if _beta(beta) > 0.0:
        args.pop("momentum", None)
    return args


class WorkerMomentum:
    """One momentum buffer per worker rank, kept by a PS (see the module docstring)."""

    def __init__(self, beta: float, dim: int, ranks: Iterable[int], *,
                 dtype: torch.dtype = torch.float32, device: "torch.device | str" = "cpu"):
        self.beta = _beta(beta)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"worker momentum: dim must be an int >= 1, got {dim!r}")
        self.ranks = tuple(int(r) for r in ranks)
        if not self.ranks or len(set(self.ranks)) != len(self.ranks):
            raise ConfigError(f"worker momentum: ranks must be distinct and not empty, got {self.ranks}")
        self.dim = dim
        self._index = {r: i for i, r in enumerate(self.ranks)}
        self.momenta = torch.zeros(len(self.ranks), dim, dtype=dtype, device=device)
        self.updates = torch.zeros(len(self.ranks), dtype=torch.long)  # contributions per rank

    def _slot(self, rank: int) -> int:
        try:
            return self._index[int(rank)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"worker momentum: unknown worker rank {rank!r}; known: "
                             f"{list(self.ranks)}") from None

    def rows(self, grads_by_rank: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Update the momenta of the ranks in ``grads_by_rank`` (the quorum: rank -> gradient
        [d]) and return them as [len(quorum), d], in the mapping's order."""
        if not grads_by_rank:
            raise ValueError("worker momentum: empty quorum")
        slots = [self._slot(r) for r in grads_by_rank]
        if len(set(slots)) != len(slots):
            raise ValueError("worker momentum: a rank appears twice in the quorum")
        g = torch.stack([t.reshape(-1) if t.dim() != 1 else t for t in grads_by_rank.values()])
        if g.shape[1] != self.dim:
            raise ValueError(f"worker momentum: gradients of size {g.shape[1]}, expected {self.dim}")
        g = g.to(device=self.momenta.device, dtype=self.momenta.dtype)
        if not bool(torch.isfinite(g).all()):
            bad = [r for r, t in grads_by_rank.items() if not bool(torch.isfinite(t).all())]
            raise ValueError(f"worker momentum: non-finite gradient from rank(s) {bad}: drop it "
                             f"before, it would poison that worker's momentum for ever")
        idx = torch.tensor(slots, device=self.momenta.device)
        m = self.momenta.index_select(0, idx).mul_(self.beta).add_(g, alpha=1.0 - self.beta)
        self.momenta.index_copy_(0, idx, m)
        self.updates[torch.tensor(slots)] += 1
        return m

    def heavy_ball_rows(self, grads_by_rank: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """:meth:`rows` scaled by 1 / (1 - beta): each row is then ``torch.optim.SGD``'s
        momentum buffer of that worker's gradients (``buf <- beta buf + g``, ``buf_1 = g``)."""
        return self.rows(grads_by_rank).div_(1.0 - self.beta)

    def state_dict(self) -> dict:
        """Tensors and settings for a checkpoint (copies: later steps do not alter it)."""
        return {"beta": self.beta, "ranks": list(self.ranks), "momenta": self.momenta.clone(),
                "updates": self.updates.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`'s output; refuses another beta, ranks or shape."""
        try:
            beta, ranks, mom, upd = state["beta"], state["ranks"], state["momenta"], state["updates"]
        except (KeyError, TypeError):
            raise ConfigError("worker momentum checkpoint lacks beta/ranks/momenta/updates") from None
        if float(beta) != self.beta:
            raise ConfigError(f"worker momentum checkpoint has beta={beta}, this run beta={self.beta}")
        if tuple(int(r) for r in ranks) != self.ranks:
            raise ConfigError(f"worker momentum checkpoint has ranks {list(ranks)}, this run "
                              f"{list(self.ranks)}")
        if not isinstance(mom, torch.Tensor) or tuple(mom.shape) != tuple(self.momenta.shape):
            raise ConfigError(f"worker momentum checkpoint momenta of shape "
                              f"{tuple(getattr(mom, 'shape', ()))}, expected {tuple(self.momenta.shape)}")
        if not isinstance(upd, torch.Tensor) or tuple(upd.shape) != (len(self.ranks),):
            raise ConfigError("worker momentum checkpoint: bad 'updates' tensor")
        if not bool(torch.isfinite(mom).all()):
            raise ConfigError("worker momentum checkpoint holds non-finite momenta")
        self.momenta.copy_(mom)
        self.updates.copy_(upd)
