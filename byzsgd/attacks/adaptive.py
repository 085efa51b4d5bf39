"""Min-Max and Min-Sum: the largest deviation that still looks like an honest gradient.

Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021 (their "AGR-agnostic" attacks).  ``honest`` is
Tensor[k, d] (the step's honest gradients, or momentum rows), ``mu`` their mean.  The f
Byzantine rows all send ``m = mu + gamma * p`` with the perturbation ``p`` (``direction``):

* ``"unit"`` -- ``-mu / ||mu||`` (0 when mu = 0);
* ``"std"`` (default) -- ``-sigma``, sigma the unbiased per-coordinate std (0 with k = 1);
* ``"sign"`` -- ``-sign(mu)``.

``search: "distance"`` (default) takes the paper's gamma: the largest gamma >= 0 with

* ``minmax``: ``max_i ||m - h_i|| <= max_{i,j} ||h_i - h_j||`` (m is no further from any honest
  row than the two furthest honest rows are from each other);
* ``minsum``: ``sum_i ||m - h_i||^2 <= max_i sum_j ||h_i - h_j||^2`` (``bound: "max"``, the
  paper's equation); ``bound: "min"`` is ``min_i`` instead, as the authors' released code
  (``our_attack_score``) has it.

found by the paper's search, as in the authors' code: ``gamma = gamma_init`` (10), ``step =
gamma_init``, ``gamma_succ = 0``; while ``|gamma_succ - gamma| > tol`` (1e-5): if gamma
satisfies the constraint, ``gamma_succ = gamma`` and ``gamma += step / 2``, else ``gamma -=
step / 2``; ``step /= 2``.  Deterministic.  That search never exceeds ``2 gamma_init``, too
small for a ``unit`` direction on large gradients (gamma is then a distance), so by default
(``expand: true``) gamma_init is first doubled while the constraint still holds at
``2 gamma_init`` (the feasible set is an interval [0, gamma*]: both constraints are convex
in gamma and hold at 0, so this only removes the cap); ``expand: false`` is the authors'
search exactly.  The result satisfies the constraint and is within ``2 tol`` of the largest
gamma that does.  Both constraints are quadratics in gamma, ``||mu - h_i + gamma p||^2 =
a_i + 2 gamma b_i + gamma^2 c``, whose coefficients are computed once (float64, on the rows'
device): the search itself is scalar arithmetic, one device sync in all.  (Min-Sum has the
closed form ``gamma* = max_i ||h_i - mu|| / ||p||`` -- ``min_i`` for ``bound: "min"`` -- since
``sum_i (mu - h_i) = 0``; the tests check the search against it.)

``search: "defence"`` instead maximises ``||aggregate - mu||`` over gamma >= 0 with the
deployed aggregation simulated (``gar``, ``gar_f``, ``n``, ``gar_params``, ``pipeline``: see
:mod:`byzsgd.attacks.defence`), by :func:`byzsgd.attacks.optimal.line_search` over
``gamma = t * gamma_dist`` (gamma_dist: the distance search's gamma, or ``||mu|| / ||p||``
when that is 0), t >= 0.  ``t = 1`` (the paper's gamma) is always among the candidates, so
the defence search is never worse than the paper's gamma on the defence's own objective.
"""
from __future__ import annotations

import math

import torch

from byzsgd.attacks.defence import simulator
from byzsgd.attacks.optimal import line_search
from byzsgd.attacks.registry import register
from byzsgd.attacks.statistical import honest_stats
from byzsgd.errors import ConfigError

__all__ = ["minmax", "minsum", "adaptive_gamma", "perturbation", "paper_search",
           "DIRECTIONS", "SEARCHES"]

DIRECTIONS = ("unit", "std", "sign")
SEARCHES = ("distance", "defence")
_MAX_ITER = 400  # the halving search's safety cap (step is ~gamma_init * 2^-400 by then)
_MAX_DOUBLINGS = 64


def perturbation(honest: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, p)`` for ``direction`` in :data:`DIRECTIONS` (see the module docstring)."""
    mu, sigma = honest_stats(honest)
    if direction == "std":
        return mu, -sigma
    if direction == "sign":
        return mu, -torch.sign(mu)
    if direction == "unit":
        norm = mu.norm()
        return mu, torch.where(norm > 0, -mu / norm.clamp_min(torch.finfo(mu.dtype).tiny), torch.zeros_like(mu))
    raise ConfigError(f"minmax/minsum: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")


def _check_search(gamma_init, tol) -> None:
    for name, v in (("gamma_init", gamma_init), ("tol", tol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ConfigError(f"minmax/minsum: {name} must be a finite number > 0, got {v!r}")


def paper_search(feasible, gamma_init: float = 10.0, tol: float = 1e-5, expand: bool = True) -> float:
    """The largest feasible gamma by the authors' halving search (module docstring);
    ``feasible(gamma) -> bool`` must hold on an interval [0, gamma*]."""
    _check_search(gamma_init, tol)
    g0 = float(gamma_init)
    if expand:
        for _ in range(_MAX_DOUBLINGS):
            if not feasible(2.0 * g0):
                break
            g0 *= 2.0
    gamma, step, succ = g0, g0, 0.0
    for _ in range(_MAX_ITER):
        if abs(succ - gamma) <= tol:
            break
        if feasible(gamma):
            succ = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return succ


def _coefficients(honest: torch.Tensor, mu: torch.Tensor, p: torch.Tensor):
    """``(a, b, c, d2)`` on the CPU, float64: ``||mu - h_i + gamma p||^2 = a_i + 2 gamma b_i +
    gamma^2 c`` and the pairwise squared distances ``d2`` [k, k] (from centred rows: no
    cancellation of the rows' common part)."""
    x = honest.double() - mu.double()
    pd = p.double()
    gram = x @ x.T
    sq = gram.diagonal()
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2.0 * gram).clamp_min_(0.0)
    b = -(x @ pd)
    c = pd.dot(pd)
    packed = torch.cat([sq, b, c.reshape(1), d2.reshape(-1)]).cpu()
    k = honest.shape[0]
    return packed[:k], packed[k:2 * k], float(packed[2 * k]), packed[2 * k + 1:].reshape(k, k)


def _feasibility(kind: str, a: torch.Tensor, b: torch.Tensor, c: float, d2: torch.Tensor, bound: str):
    if kind == "minmax":
        limit = float(d2.max())
        return lambda g: float((a + 2.0 * g * b + g * g * c).max()) <= limit
    scores = d2.sum(dim=1)
    limit = float(scores.max() if bound == "max" else scores.min())
    total_a, total_b, k = float(a.sum()), float(b.sum()), a.shape[0]
    return lambda g: total_a + 2.0 * g * total_b + k * g * g * c <= limit


def adaptive_gamma(kind: str, honest: torch.Tensor, f: int, direction: str = "std", *,
                   gamma_init: float = 10.0, tol: float = 1e-5, expand: bool = True,
                   bound: str = "max", search: str = "distance", gar: str | None = None,
                   gar_f: int | None = None, n: int | None = None, gar_params: dict | None = None,
                   pipeline=None, start: float = 0.125, levels: int = 14,
                   golden_steps: int = 20) -> float:
    """The gamma that ``kind`` (``"minmax"`` / ``"minsum"``) uses: for callers that reuse it."""
    return _solve(kind, honest, f, direction, gamma_init=gamma_init, tol=tol, expand=expand,
                  bound=bound, search=search, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params,
                  pipeline=pipeline, start=start, levels=levels, golden_steps=golden_steps)[0]


def _solve(kind: str, honest: torch.Tensor, f: int, direction: str, *, gamma_init, tol, expand,
           bound, search, gar, gar_f, n, gar_params, pipeline, start, levels, golden_steps):
    """``(gamma, mu, p)``."""
    if kind not in ("minmax", "minsum"):
        raise ConfigError(f"adaptive_gamma: kind must be 'minmax' or 'minsum', got {kind!r}")
    if search not in SEARCHES:
        raise ConfigError(f"{kind}: search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if bound not in ("max", "min"):
        raise ConfigError(f"{kind}: bound must be 'max' (the paper) or 'min' (the authors' code), "
                          f"got {bound!r}")
    _check_search(gamma_init, tol)
    mu, p = perturbation(honest, direction)
    a, b, c, d2 = _coefficients(honest, mu, p)
    simulate = search == "defence"
    if simulate:  # refuse, even when there is nothing to search, what the PS would refuse
        _, distance = simulator(honest, f, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params,
                                pipeline=pipeline, name=kind)
    if not (c > 0):  # no perturbation (k = 1 with std, mu = 0 with unit/sign): m = mu whatever gamma
        return 0.0, mu, p
    gamma = paper_search(_feasibility(kind, a, b, c, d2, bound), gamma_init, tol, expand)
    if not simulate:
        return gamma, mu, p
    scale = gamma if gamma > 0 else (float(mu.double().norm()) / math.sqrt(c) or 1.0)

    def objective(t: float) -> float:
        return -math.inf if t < 0 else distance(mu + (t * scale) * p)

    best = line_search(objective, start, levels, golden_steps)
    if best != 1.0 and objective(1.0) > objective(best):
        best = 1.0
    return best * scale, mu, p


def _forge(kind: str, honest: torch.Tensor, f: int, direction: str, **kw) -> torch.Tensor:
    kw.setdefault("bound", "max")
    gamma, mu, p = _solve(kind, honest, f, direction, **kw)
    return (mu + gamma * p).unsqueeze(0).repeat(f, 1)


_PARAMS = ("direction", "gamma_init", "tol", "expand", "search", "gar", "gar_f", "n", "gar_params",
           "pipeline", "start", "levels", "golden_steps")


@register("minmax", reference="Min-Max, Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021",
          params=_PARAMS, needs_rule=True, needs_estimate=True)
def minmax(honest: torch.Tensor, f: int, direction: str = "std", gamma_init: float = 10.0,
           tol: float = 1e-5, expand: bool = True, search: str = "distance", gar: str | None = None,
           gar_f: int | None = None, n: int | None = None, gar_params: dict | None = None,
           pipeline=None, start: float = 0.125, levels: int = 14, golden_steps: int = 20) -> torch.Tensor:
    return _forge("minmax", honest, f, direction, gamma_init=gamma_init, tol=tol, expand=expand,
                  search=search, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params, pipeline=pipeline,
                  start=start, levels=levels, golden_steps=golden_steps)


@register("minsum", reference="Min-Sum, Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021",
          params=_PARAMS + ("bound",), needs_rule=True, needs_estimate=True)
def minsum(honest: torch.Tensor, f: int, direction: str = "std", gamma_init: float = 10.0,
           tol: float = 1e-5, expand: bool = True, search: str = "distance", gar: str | None = None,
           gar_f: int | None = None, n: int | None = None, gar_params: dict | None = None,
           pipeline=None, start: float = 0.125, levels: int = 14, golden_steps: int = 20,
           bound: str = "max") -> torch.Tensor:
    return _forge("minsum", honest, f, direction, gamma_init=gamma_init, tol=tol, expand=expand,
                  bound=bound, search=search, gar=gar, gar_f=gar_f, n=n, gar_params=gar_params,
                  pipeline=pipeline, start=start, levels=levels, golden_steps=golden_steps)
