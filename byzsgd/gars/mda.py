"""Minimum-Diameter Averaging (MDA), exact.

MDA (El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient
Stochastic Gradient Descent", ICLR 2021 / arXiv 2020; the estimator is Rousseeuw's
minimum-volume idea, 1985): among all subsets of n - f inputs, take the one of minimum
diameter (largest pairwise distance) and return its average.

Exact algorithm (not a heuristic), on the precomputed [n, n] squared-distance matrix
(one Gram product, :func:`byzsgd.gars._select.pairwise_sq_dists`):

1. The optimal diameter is one of the pairwise distances.  For a threshold t, a subset of
   n - f inputs with all pairwise distances <= t exists iff the *conflict graph* (an edge
   where distance > t) has a vertex cover of at most f vertices (the excluded inputs).
   Feasibility is monotone in t, so a binary search over the sorted distinct distances
   finds the optimum t*.
2. Each feasibility test is a branch-and-bound vertex-cover search with budget f:
   a vertex of degree > budget must be excluded; a vertex of degree 1 has its neighbour
   excluded; the search fails when the edges left exceed budget x max degree; otherwise it
   branches on a max-degree vertex v: exclude v, or exclude all its neighbours.  Its
   cost is bounded by ~1.47^f search nodes and is tiny for typical inputs.
3. Ties (several optimal subsets) are broken deterministically: the lexicographically
   first subset of sorted indices, i.e. exactly the first minimum that
   ``itertools.combinations(range(n), n - f)`` would meet.  It is built greedily (include
   index i iff a feasible completion exists), one vertex-cover test per index.

Non-finite inputs: a row with a NaN/Inf coordinate is at distance +inf from all others,
so it is excluded whenever a finite-diameter subset exists (at most f such rows).
"""
from __future__ import annotations

import torch

from byzsgd.gars import _select
from byzsgd.gars.registry import register

__all__ = ["mda", "mda_select"]


def _vertex_cover(adj: list[int], alive: int, k: int) -> bool:
    """Is there a vertex cover of size <= k of the graph induced by the ``alive`` bitmask?"""
    while True:
        best_v, best_deg, edges2 = -1, 0, 0
        forced = -1
        a = alive
        while a:
            low = a & -a
            v = low.bit_length() - 1
            a ^= low
            deg = (adj[v] & alive).bit_count()
            if deg == 0:
                continue
            edges2 += deg
            if deg > best_deg:
                best_v, best_deg = v, deg
            if deg == 1 and forced < 0:
                forced = v
        if best_deg == 0:
            return True
        if k <= 0:
            return False
        if edges2 // 2 > k * best_deg:
            return False
        if best_deg > k:  # best_v must be in every cover of size <= k
            alive &= ~(1 << best_v)
            k -= 1
            continue
        if forced >= 0:  # degree-1 vertex: taking its neighbour is never worse
            u = (adj[forced] & alive).bit_length() - 1
            alive &= ~(1 << u)
            k -= 1
            continue
        break
    v = best_v
    if _vertex_cover(adj, alive & ~(1 << v), k - 1):
        return True
    nb = adj[v] & alive
    c = nb.bit_count()
    return c <= k and _vertex_cover(adj, alive & ~nb & ~(1 << v), k - c)


def _feasible(adj: list[int], n: int, f: int, inc: int, exc: int) -> bool:
    """A cover of size <= f containing ``exc`` and avoiding ``inc`` (bitmasks)?"""
    forced = exc
    a = inc
    while a:
        low = a & -a
        v = low.bit_length() - 1
        a ^= low
        if adj[v] & inc:
            return False
        forced |= adj[v]
    if forced & inc:
        return False
    k = f - forced.bit_count()
    if k < 0:
        return False
    alive = ((1 << n) - 1) & ~forced & ~inc
    return _vertex_cover(adj, alive, k)


def _conflicts(d: list[list[float]], n: int, t: float) -> list[int]:
    adj = [0] * n
    for i in range(n):
        row = d[i]
        m = 0
        for j in range(n):
            if j != i and row[j] > t:
                m |= 1 << j
        adj[i] = m
    return adj


def mda_select(dists: torch.Tensor, f: int) -> list[int]:
    """Indices (sorted) of the lexicographically first minimum-diameter (n - f)-subset.

    ``dists``: [n, n] symmetric (squared) distances; only their order matters.
    """
    n = dists.shape[0]
    m = n - f
    if f <= 0:
        return list(range(n))
    if m <= 1:
        return [0]
    d = dists.detach().to("cpu", torch.float64).tolist()
    vals = sorted({d[i][j] for i in range(n) for j in range(i + 1, n)})
    lo, hi = 0, len(vals) - 1  # vals[hi] (the max) is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(_conflicts(d, n, vals[mid]), n, f, 0, 0):
            hi = mid
        else:
            lo = mid + 1
    adj = _conflicts(d, n, vals[lo])
    inc = exc = 0
    chosen: list[int] = []
    for i in range(n):
        if len(chosen) == m:
            break
        if len(chosen) + (n - i) == m or _feasible(adj, n, f, inc | (1 << i), exc):
            inc |= 1 << i
            chosen.append(i)
        else:
            exc |= 1 << i
    return chosen


@register("mda", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="El Mhamdi, Guerraoui, Rouault, 'Distributed Momentum for Byzantine-"
                    "resilient SGD', ICLR 2021 (MDA); Rousseeuw 1985")
def mda(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Minimum-Diameter Averaging: the mean of the n - f inputs of smallest diameter,
    exact (see the module docstring for the algorithm and the tie rule)."""
    dists, bad = _select.pairwise_sq_dists(vectors, return_bad=True)
    idx = mda_select(dists, f)
    return _select.mean_of_rows(vectors, idx, all_finite=not bool(bad.any()))
