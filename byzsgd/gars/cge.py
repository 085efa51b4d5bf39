"""CGE: comparative gradient elimination (norm-based).

Gupta, Liu, Vaidya, "Byzantine Fault-Tolerant Distributed Machine Learning Using Stochastic
Gradient Descent (SGD) and Norm-Based Comparative Gradient Elimination (CGE)", DSN-W 2021
(arXiv 2008.04699, 2020).  The server sorts the n received vectors by Euclidean norm and drops
the f largest; we return the **average** of the n - f smallest-norm vectors (the paper uses
their *sum*; the constant factor n - f is a learning-rate rescaling, and the average keeps
CGE interchangeable with the other rules, which also aggregate models).

Ties in norm: the lower index is kept first (stable sort).  A vector with a NaN or infinite
norm ranks as +inf, i.e. among the largest, so with at most f non-finite inputs none of them
is averaged.  Resilience: ``n >= 2f + 1`` (the paper's honest-majority setting, f < n/2).
"""
from __future__ import annotations

import torch

from byzsgd.gars.registry import register

__all__ = ["cge"]


@register(
    "cge",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Gupta, Liu, Vaidya, norm-based Comparative Gradient Elimination (CGE), DSN-W 2021",
)
def cge(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Average of the n - f vectors of smallest Euclidean norm."""
    n = vectors.shape[0]
    norms = vectors.norm(dim=1)
    norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, float("inf")))
    keep = torch.sort(norms, stable=True).indices[: n - f]
    return vectors[keep].mean(dim=0)
