"""Distance-based selection rules: Krum, Multi-Krum, Bulyan.

Distances come from one Gram-matrix product (``X X^T``, see
:func:`byzsgd.gars._select.pairwise_sq_dists`), not ``torch.cdist``: docs/design.md §9 measured
2.7-11x the copy floor against 13-53x.  The O(n^2 log n) scoring is done on the small
[n, n] float64 matrix.

Non-finite inputs: a row with any NaN/Inf coordinate (or whose squared norm overflows) is
infinitely far from all others, so its Krum score is +inf and it is never selected while
n is within the bound.  Krum / Multi-Krum: ties in score go to the lowest row index
(deterministic); Bulyan's rounds break ties without regard to the order of the rows.
"""
from __future__ import annotations

import math

import torch

from byzsgd.gars import _compiled, _select, _triton_select
from byzsgd.gars.median_family import mean_around
from byzsgd.gars.registry import register

__all__ = ["krum", "multi_krum", "bulyan", "krum_select", "bulyan_select"]


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by increasing score, ties by increasing index."""
    return torch.sort(scores, stable=True).indices


def krum_select(vectors: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Indices (on CPU, int64) of the m rows with the best (lowest) Krum scores."""
    scores = _select.krum_scores(_select.pairwise_sq_dists(vectors), f)
    return _order(scores.cpu())[:m]


@register("krum", min_inputs=lambda f: 2 * f + 3, condition="n >= 2f + 3",
          reference="Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017 (Krum)")
def krum(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017): the input whose sum of SQUARED distances to its
    n - f - 2 nearest other inputs is smallest.  Returns a copy of that row."""
    i = int(krum_select(vectors, f, 1)[0])
    return vectors[i].clone()


@register("multi_krum", min_inputs=lambda f: 2 * f + 3, condition="n >= 2f + 3",
          reference="Blanchard et al., NeurIPS 2017 / El Mhamdi et al., ICML 2018 (Multi-Krum)")
def multi_krum(vectors: torch.Tensor, f: int, m: int | None = None) -> torch.Tensor:
    """Multi-Krum (Blanchard et al. 2017; El Mhamdi, Guerraoui, Rouault, ICML 2018): the
    mean of the m inputs with the lowest Krum scores (scores computed once on all n);
    default m = n - f.  m = 1 is Krum."""
    n = vectors.shape[0]
    if m is None:
        m = n - f
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"multi_krum: m must be an int in [1, n={n}], got {m!r}")
    dists, bad = _select.pairwise_sq_dists(vectors, return_bad=True)
    idx = _order(_select.krum_scores(dists, f).cpu())[:m]
    return _select.mean_of_rows(vectors, idx, all_finite=not bool(bad.any()))


def _round_winner(sub: torch.Tensor, f: int) -> int:
    """One Bulyan round on the [n', n'] distances of the remaining rows: the position of the
    Krum winner with at least one neighbour, ties broken without looking at positions.

    Score: the sum of the squared distances to the k = max(n' - f - 2, 1) nearest others
    (at most n' - 1).  Textbook Krum would use n' - f - 2 <= 0 neighbours in Bulyan's last
    rounds at n = 4f + 3, every score 0, and the first remaining row -- the one that arrived
    first -- would win.  With one neighbour, two mutual nearest neighbours tie exactly (the
    distance matrix is exactly symmetric), so ties go to the smaller (k+1)-th nearest
    distance, then the (k+2)-th, ...: the sorted distance rows, compared lexicographically.
    Only rows whose whole sorted distance rows are equal (e.g. duplicates, where either
    choice gives the same values) fall back to the lower position.
    """
    m = sub.shape[0]
    k = min(max(m - f - 2, 1), m - 1)
    off = sub.clone()
    off.fill_diagonal_(math.inf)
    srt = torch.sort(off, dim=1).values  # [m, m]: the m - 1 distances, then +inf
    scores = srt[:, :k].sum(dim=1) if k > 0 else torch.zeros(m, dtype=srt.dtype)
    keys = torch.cat([scores.unsqueeze(1), srt[:, k: m - 1]], dim=1).tolist()
    return min(range(m), key=lambda i: (keys[i], i))


def bulyan_select(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan's selection: theta = n - 2f indices chosen by iterated Krum.

    Each round scores the rows not yet selected (:func:`_round_winner`: Krum with
    max(n' - f - 2, 1) neighbours, n' the remaining count, order-free ties), selects the
    winner and removes it.  Returned in selection order (CPU int64).
    """
    n = vectors.shape[0]
    theta = n - 2 * f
    dists = _select.pairwise_sq_dists(vectors).cpu()
    active = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        idx = torch.tensor(active)
        sub = dists.index_select(0, idx).index_select(1, idx)
        chosen.append(active.pop(_round_winner(sub, f)))
    return torch.tensor(chosen, dtype=torch.long)


@register("bulyan", min_inputs=lambda f: 4 * f + 3, condition="n >= 4f + 3",
          reference="El Mhamdi, Guerraoui, Rouault, 'The Hidden Vulnerability of Distributed "
                    "Learning in Byzantium', ICML 2018 (Bulyan over Krum)")
def bulyan(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan (El Mhamdi et al., ICML 2018) over Krum: select theta = n - 2f inputs by
    iterated Krum (each time removing the selected one and re-scoring the rest; every round
    scores with at least one neighbour and breaks ties by the rows' further distances, so
    the selection does not depend on the order of arrival -- see :func:`_round_winner`), then per
    coordinate average the beta = theta - 2f selected values closest to the coordinate's
    (numpy) median of the selected.  Non-finite rows are never selected within the bound
    (infinite Krum score)."""
    sel = bulyan_select(vectors, f).to(vectors.device)
    if _triton_select.available(vectors) or _compiled.enabled(vectors):
        # The fused kernels read a dense [theta, d] tensor: one gather, then one pass.
        return mean_around(vectors.index_select(0, sel), 2 * f, "median")
    return mean_around(vectors, 2 * f, "median", rows=sel)
