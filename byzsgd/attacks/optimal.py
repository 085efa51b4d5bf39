"""Rule-aware attacks: tune ALIE's z or IPM's epsilon against the GAR in use.

Both simulate the aggregation the target runs: ``gar`` (a registered aggregation rule name)
applied with ``gar_f`` (default f) to the honest rows plus f copies of the candidate, after
the PS's pre-aggregation ``pipeline`` (a ``--pre_agg`` spec such as ``"nnm"``; default None:
the rule alone, as before; see :mod:`byzsgd.attacks.defence`), and pick the factor that
maximizes ``||aggregate - mu||`` (``mu`` = mean of the honest rows), i.e. that moves the
aggregate furthest from the honest mean.  ``gar_params`` (a dict) is passed on to the rule.  ``n`` is the total number of inputs the GAR receives (default ``k + f``); if it
differs from k + f, the honest part of the simulation is the known honest rows repeated
cyclically (or truncated) to n - f rows (the best stand-in for gradients the attacker has
not seen).  The configuration is first checked against the GAR's resilience bound.

Search over the factor t (deterministic, ``2*levels + 1 + 2*golden_steps`` GAR calls at most):
1. a signed doubling grid ``0, +-t0, +-2 t0, ..., +-t0 2^(levels-1)`` (t0 = ``start``, default
   1/8; 14 levels reach 1024) -- the candidate is ``mu + t sigma`` (optimal_alie) or
   ``-t mu`` (optimal_ipm), so negative t covers both directions;
2. a golden-section refinement (``golden_steps`` iterations, default 20) of the objective on the
   bracket made of the best grid point's two neighbours;
3. the best factor evaluated overall is kept (never worse than the grid).
A non-finite aggregate counts as an infinitely successful attack and stops the search.

* ``optimal_alie`` -- Baruch et al. NeurIPS 2019's attack with z tuned as in Shejwalkar &
  Houmansadr (NDSS 2021) / ByzFL's Opt-ALIE.  sigma = unbiased per-coordinate std of the rows
  (0 with a single row, then every candidate equals mu).
* ``optimal_ipm`` -- Xie et al. UAI 2019's attack with epsilon tuned the same way.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from byzsgd.attacks.defence import simulator
from byzsgd.attacks.registry import register
from byzsgd.attacks.statistical import honest_stats
from byzsgd.errors import ConfigError

__all__ = ["optimal_alie", "optimal_ipm", "optimal_alie_factor", "optimal_ipm_factor", "line_search"]

_GOLD = (math.sqrt(5) - 1) / 2


def line_search(objective: Callable[[float], float], start: float = 0.125, levels: int = 14,
                golden_steps: int = 20) -> float:
    """Maximize ``objective`` over t: signed doubling grid, then golden section (see module doc)."""
    if start <= 0 or levels < 1 or golden_steps < 0:
        raise ConfigError("line search needs start > 0, levels >= 1, golden_steps >= 0")
    pos = [start * 2.0 ** j for j in range(levels)]
    grid = [-t for t in reversed(pos)] + [0.0] + pos
    best_t, best_v = 0.0, -math.inf
    values = []
    for t in grid:
        v = objective(t)
        if math.isinf(v) and v > 0:
            return t
        values.append(v)
        if v > best_v:
            best_t, best_v = t, v
    i = grid.index(best_t)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    a, b = lo + (1 - _GOLD) * (hi - lo), lo + _GOLD * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(golden_steps):
        for t, v in ((a, fa), (b, fb)):
            if math.isinf(v) and v > 0:
                return t
            if v > best_v:
                best_t, best_v = t, v
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - _GOLD) * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLD * (hi - lo)
            fb = objective(b)
    for t, v in ((a, fa), (b, fb)):
        if v > best_v or (math.isinf(v) and v > 0):
            best_t, best_v = t, v
    return best_t


def optimal_alie_factor(honest: torch.Tensor, f: int, gar: str | None = None, gar_f: int | None = None,
                        n: int | None = None, gar_params: dict | None = None, start: float = 0.125,
                        levels: int = 14, golden_steps: int = 20, pipeline=None) -> float:
    """The z that :func:`optimal_alie` uses (``mu + z * sigma``): for callers that reuse it."""
    mu, distance = simulator(honest, f, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params,
                             pipeline=pipeline, name="optimal_alie")
    _, sigma = honest_stats(honest)
    return line_search(lambda t: distance(mu + t * sigma), start, levels, golden_steps)


def optimal_ipm_factor(honest: torch.Tensor, f: int, gar: str | None = None, gar_f: int | None = None,
                       n: int | None = None, gar_params: dict | None = None, start: float = 0.125,
                       levels: int = 14, golden_steps: int = 20, pipeline=None) -> float:
    """The epsilon that :func:`optimal_ipm` uses (``-epsilon * mu``): for callers that reuse it."""
    mu, distance = simulator(honest, f, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params,
                             pipeline=pipeline, name="optimal_ipm")
    return line_search(lambda t: distance(-t * mu), start, levels, golden_steps)


@register("optimal_alie", reference="ALIE (Baruch et al., NeurIPS 2019) with z tuned against the GAR (ByzFL Opt-ALIE)",
          params=("gar", "gar_f", "n", "gar_params", "pipeline", "start", "levels", "golden_steps"),
          needs_rule=True, needs_estimate=True, search=(optimal_alie_factor, "alie", "z"))
def optimal_alie(honest: torch.Tensor, f: int, gar: str | None = None, gar_f: int | None = None,
                 n: int | None = None, gar_params: dict | None = None, start: float = 0.125,
                 levels: int = 14, golden_steps: int = 20, pipeline=None) -> torch.Tensor:
    z = optimal_alie_factor(honest, f, gar, gar_f, n, gar_params, start, levels, golden_steps, pipeline)
    mu, sigma = honest_stats(honest)
    return (mu + z * sigma).unsqueeze(0).repeat(f, 1)


@register("optimal_ipm", reference="IPM (Xie et al., UAI 2019) with epsilon tuned against the GAR (ByzFL Opt-IPM)",
          params=("gar", "gar_f", "n", "gar_params", "pipeline", "start", "levels", "golden_steps"),
          needs_rule=True, needs_estimate=True, search=(optimal_ipm_factor, "ipm", "epsilon"))
def optimal_ipm(honest: torch.Tensor, f: int, gar: str | None = None, gar_f: int | None = None,
                n: int | None = None, gar_params: dict | None = None, start: float = 0.125,
                levels: int = 14, golden_steps: int = 20, pipeline=None) -> torch.Tensor:
    eps = optimal_ipm_factor(honest, f, gar, gar_f, n, gar_params, start, levels, golden_steps, pipeline)
    return (-eps * honest.mean(dim=0)).unsqueeze(0).repeat(f, 1)
