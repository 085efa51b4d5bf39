"""AKSEL and CONDENSE: two coordinate-wise-median-based rules from Garfield.

Both rest on the coordinate-wise median, computed here as numpy's (mean of the two middle
values for even n, docs/design.md §6) with one documented NaN policy: a NaN coordinate is ranked as
``+inf`` (an outlier on the high side), so up to ``f < n/2`` non-finite inputs can shift the
median by at most ``f`` ranks and never make it non-finite.  (Garfield uses ``torch.median``,
the *lower* median, which also propagates NaN; we deliberately differ on both counts.)

AKSEL (Boussetta, El-Mhamdi, Guerraoui, Maurer, Rouault, "AKSEL: Fast Byzantine SGD",
OPODIS 2020), as in Garfield's ``aksel.py``:

1. ``m`` = coordinate-wise median of the n inputs;
2. ``d_i = ||x_i - m||^2`` (squared Euclidean distance), a non-finite ``d_i`` counts as ``+inf``;
3. keep the ``c`` inputs with the smallest ``d_i`` (ties: lower index first) and average them,
   where ``c = ceil(n/2) = (n+1)//2`` in mode ``"mid"`` (Garfield's default: the inputs whose
   distance is at most the median distance) or ``c = n - f`` in mode ``"n-f"``.

Resilience: ``n >= 2f + 1`` (Garfield's check).  With at most f non-finite inputs and
``n >= 2f+1``, ``c <= n - f`` in both modes, so non-finite inputs are never selected.

CONDENSE (Garfield's ``condense.py``, the randomized median used for parameter vectors):
each coordinate independently takes the coordinate-wise median with probability ``p``
(default 0.9) and otherwise the *designated* vector's coordinate, the designated vector being
``vectors[own_index]`` (default 0: the aggregating node's own vector).  Differences from
Garfield, all documented: numpy-style NaN-safe median (see above); where the designated
vector's coordinate is non-finite the median is used instead, so a non-finite designated
vector cannot poison the output; the Bernoulli mask is drawn from a private
``torch.Generator`` seeded with ``seed`` (deterministic, identical on CPU and CUDA because it is
drawn on the CPU), or from torch's global generator when ``seed`` is None.  Callers that
want a fresh mask every step pass a step-dependent seed.  Resilience: ``n >= 2f + 2``
(Garfield's check).  Permutation invariance: given the same seed, the output is invariant
under any permutation that keeps the designated vector at ``own_index``.
"""
from __future__ import annotations

import torch

from byzsgd.errors import ConfigError
from byzsgd.gars.median_family import coordinate_median
from byzsgd.gars.registry import register

__all__ = ["robust_coordinate_median", "aksel", "condense"]


def robust_coordinate_median(vectors: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of ``vectors`` [n, d] (numpy's definition), NaN ranked as +inf.

    Delegates to :func:`byzsgd.gars.median_family.coordinate_median` (same semantics), so
    AKSEL/CONDENSE agree bit for bit with the ``median`` rule.
    """
    return coordinate_median(vectors)


def _sq_dist_to(vectors: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances of each row to ``point``; non-finite ones become +inf."""
    d = (vectors - point).pow(2).sum(dim=1)
    return torch.where(torch.isfinite(d), d, torch.full_like(d, float("inf")))


@register(
    "aksel",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Boussetta et al., AKSEL: Fast Byzantine SGD, OPODIS 2020 (Garfield's aksel.py)",
)
def aksel(vectors: torch.Tensor, f: int, mode: str = "mid") -> torch.Tensor:
    """Average of the inputs closest (squared L2) to the coordinate-wise median."""
    n = vectors.shape[0]
    if mode == "mid":
        c = (n + 1) // 2
    elif mode == "n-f":
        c = n - f
    else:
        raise ConfigError(f"rule 'aksel': mode must be 'mid' or 'n-f', got {mode!r}")
    med = robust_coordinate_median(vectors)
    dist = _sq_dist_to(vectors, med)
    order = torch.sort(dist, stable=True).indices[:c]
    return vectors[order].mean(dim=0)


@register(
    "condense",
    min_inputs=lambda f: 2 * f + 2,
    condition="n >= 2f + 2",
    reference="Garfield's condense.py (El-Mhamdi et al., Genuinely Distributed Byzantine ML, PODC 2020)",
)
def condense(vectors: torch.Tensor, f: int, p: float = 0.9, seed: int | None = None,
             own_index: int = 0) -> torch.Tensor:
    """Per coordinate: the median with probability p, else the designated (own) vector's value."""
    n, d = vectors.shape
    if not (0.0 < float(p) <= 1.0):
        raise ConfigError(f"rule 'condense': p must be in (0, 1], got {p!r}")
    if not (-n <= own_index < n):
        raise ConfigError(f"rule 'condense': own_index {own_index} out of range for n={n}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
    take_median = (torch.rand(d, generator=gen, dtype=torch.float64) < float(p)).to(vectors.device)
    med = robust_coordinate_median(vectors)
    own = vectors[own_index]
    take_median = take_median | ~torch.isfinite(own)
    return torch.where(take_median, med, own)
