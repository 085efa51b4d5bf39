"""MoNNA's nearest-neighbour averaging (NNA) step.

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with
Linear Gradient Overhead", ICML 2023.  An honest node i mixes the n received vectors (its own
included) by averaging the n - f vectors nearest (Euclidean) to **its own** vector x_i.

Here the reference vector is ``vectors[reference_index]`` (default 0: by convention the
aggregating, trusted node puts its own vector first).  The reference is its own nearest
neighbour (distance 0), so it is always in the average.  Ties in distance: lower index first.
Distances that are NaN/inf count as +inf, so with at most f non-finite *other* inputs none of
them is averaged.  The reference itself is trusted: if it is non-finite the output is NaN
(a correct node never holds a non-finite vector).  Permutation invariance holds for any
permutation that keeps the reference at ``reference_index``.

Resilience: ``n >= 2f + 1`` (honest majority, the setting of the paper and of ByzFL's MoNNA).
This is MoNNA's mixing step only; the momentum (the "Mo") is applied by the caller.
"""
from __future__ import annotations

import torch

from byzsgd.errors import ConfigError
from byzsgd.gars.registry import register

__all__ = ["monna"]


@register(
    "monna",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Farhadkhani et al., Robust Collaborative Learning with Linear Gradient Overhead (MoNNA), ICML 2023",
)
def monna(vectors: torch.Tensor, f: int, reference_index: int = 0) -> torch.Tensor:
    """Average of the n - f nearest neighbours of ``vectors[reference_index]`` (itself included)."""
    n = vectors.shape[0]
    if isinstance(reference_index, bool) or not isinstance(reference_index, int) \
            or not (-n <= reference_index < n):
        raise ConfigError(f"rule 'monna': reference_index {reference_index!r} out of range for n={n}")
    ref_idx = reference_index % n
    ref = vectors[ref_idx]
    if not bool(torch.isfinite(ref).all()):
        return torch.full_like(ref, float("nan"))
    dist = (vectors - ref).pow(2).sum(dim=1)
    dist = torch.where(torch.isfinite(dist), dist, torch.full_like(dist, float("inf")))
    dist[ref_idx] = -1.0  # the reference first, even against exact duplicates
    keep = torch.sort(dist, stable=True).indices[: n - f]
    return vectors[keep].mean(dim=0)
