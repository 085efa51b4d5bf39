"""Fang et al.'s attack on the coordinate-wise rules, on gradients.

Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
USENIX Security 2020, §3.3 (trimmed mean) and §3.4 (median: "we use the same attacks for
trimmed mean to attack the median").  In the paper the workers send local *models*
``w_i`` and ``s_j`` is the direction in which the j-th global parameter would move without
attack; per coordinate the c compromised workers send values on the other side of the benign
extremes, so that the aggregate moves against ``s_j``.  Full knowledge: if ``s_j = -1``, c
numbers drawn uniformly in ``[w_max,j, b w_max,j]`` (``w_max,j > 0``) or ``[w_max,j, w_max,j / b]``
(``w_max,j <= 0``); if ``s_j = 1``, in ``[w_min,j / b, w_min,j]`` (``w_min,j > 0``) or
``[b w_min,j, w_min,j]`` (``w_min,j <= 0``); b > 1, 2 in the paper.

Adaptation to gradients (what this module implements).  Here the workers send gradients ``g_i``
and the PS steps ``w <- w - lr * aggregate(g)``, so the parameter would move along
``-sign(mu_j)`` (``mu`` = mean of the honest rows) and pushing it the other way means pushing
the aggregate gradient against ``sign(mu_j)``: the role of the benign maximum is played by the
honest **minimum** ``g_min,j`` and vice versa, and the b-intervals are applied to the gradient
values themselves (the paper's tie ``s_j = -1`` when the mean does not move is ``mu_j = 0``,
pushed down like ``mu_j > 0``):

* ``mu_j >= 0``: uniform in ``[g_min,j / b, g_min,j]`` (``g_min,j > 0``) or ``[b g_min,j, g_min,j]``
  (``g_min,j <= 0``) -- at or below every honest value, within a factor b of the minimum;
* ``mu_j < 0``: uniform in ``[g_max,j, b g_max,j]`` (``g_max,j > 0``) or ``[g_max,j, g_max,j / b]``
  (``g_max,j <= 0``) -- at or above every honest value, within a factor b of the maximum.

``knowledge: "partial"`` is the paper's partial-knowledge variant (the extremes estimated from
the known rows' mean and unbiased std): ``[mu_j - 4 sigma_j, mu_j - 3 sigma_j]`` when ``mu_j >=
0``, ``[mu_j + 3 sigma_j, mu_j + 4 sigma_j]`` otherwise -- for a lone attacker whose rows are its
own gradients.  ``variant`` (``"trimmed_mean"`` / ``"median"``) names the target rule: as the
paper says, both get the same values (the result does not depend on which one is attacked).
Each of the f rows and each coordinate is drawn independently, from a private CPU generator
seeded with ``seed`` (same values on CPU and CUDA), or torch's global one when ``seed`` is None.
"""
from __future__ import annotations

import math

import torch

from byzsgd.attacks.registry import register
from byzsgd.attacks.simple import _generator
from byzsgd.attacks.statistical import honest_stats
from byzsgd.errors import ConfigError

__all__ = ["fang", "fang_interval", "VARIANTS", "KNOWLEDGE"]

VARIANTS = ("trimmed_mean", "median")
KNOWLEDGE = ("full", "partial")


def fang_interval(honest: torch.Tensor, b: float = 2.0, knowledge: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` [d] (float64): the interval each coordinate is drawn from (module docstring)."""
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b >= 1.0):
        raise ConfigError(f"attack 'fang': b must be a finite number >= 1 (2 in the paper), got {b!r}")
    if knowledge not in KNOWLEDGE:
        raise ConfigError(f"attack 'fang': knowledge must be one of {', '.join(KNOWLEDGE)}, got {knowledge!r}")
    h = honest.double()
    mu = h.mean(dim=0)
    down = mu >= 0  # push the aggregate down: values at or below the honest minimum
    if knowledge == "full":
        g_min, g_max = h.min(dim=0).values, h.max(dim=0).values
        below = (torch.where(g_min > 0, g_min / b, g_min * b), g_min)
        above = (g_max, torch.where(g_max > 0, g_max * b, g_max / b))
    else:
        _, sigma = honest_stats(h)
        below = (mu - 4.0 * sigma, mu - 3.0 * sigma)
        above = (mu + 3.0 * sigma, mu + 4.0 * sigma)
    return torch.where(down, below[0], above[0]), torch.where(down, below[1], above[1])


@register("fang", reference="Fang, Cao, Jia, Gong, Local Model Poisoning Attacks to Byzantine-Robust "
                            "Federated Learning, USENIX Security 2020 (trimmed-mean/median attack, on gradients)",
          params=("variant", "b", "knowledge", "seed"), needs_estimate=True)
def fang(honest: torch.Tensor, f: int, variant: str = "trimmed_mean", b: float = 2.0,
         knowledge: str = "full", seed: int | None = None) -> torch.Tensor:
    if variant not in VARIANTS:
        raise ConfigError(f"attack 'fang': variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    lo, hi = fang_interval(honest, b, knowledge)
    u = torch.rand(f, honest.shape[1], generator=_generator(seed), dtype=torch.float64)
    u = u.to(honest.device)
    return (lo + u * (hi - lo)).to(honest.dtype)
