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
3. Ties.  Several subsets often share the minimum diameter (it is set by one pair, and the
   other members can often be swapped).  A tie rule that looks at indices would let the
   order of arrival decide (a Byzantine input that arrives first would be kept), so the
   optimum is refined without looking at indices: among the minimum-diameter subsets, the
   one whose pairwise distances, sorted in decreasing order, are lexicographically
   smallest (least diameter, then least second-largest distance, ...).  With distinct
   distances it is unique, and found greedily: the pair at the optimal diameter belongs to
   every optimal subset, so both ends are chosen; then the least threshold t for the
   distances not between two chosen rows is searched again (the chosen rows' mutual
   distances are common to all candidates and do not discriminate), its pair chosen, and so
   on until n - f rows are chosen -- at most n - f rounds of the binary search above.  Only
   exact ties in distance (duplicate rows, lattice points: measure zero for real gradients)
   fall back to index order: the first such subset in ``itertools.combinations`` order.

Non-finite inputs: a row with a NaN/Inf coordinate is at distance +inf from all others,
so it is excluded whenever a finite-diameter subset exists (at most f such rows).
"""
from __future__ import annotations

import math

import numpy as np
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


def _conflicts(d: np.ndarray, t: float, inside: np.ndarray) -> list[int]:
    """Conflict graph as bitmasks: an edge where the distance exceeds ``t``, except between
    two rows already chosen (``inside``): those are in every candidate subset."""
    n = d.shape[0]
    conf = d > t
    conf &= ~np.outer(inside, inside)
    np.fill_diagonal(conf, False)
    packed = np.packbits(conf, axis=1, bitorder="little")
    return [int.from_bytes(packed[i].tobytes(), "little") for i in range(n)]


def _bits(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _index_order_completion(adj: list[int], n: int, f: int, m: int, inc: int) -> list[int]:
    """Exact-tie fallback: extend ``inc`` greedily in index order (include i iff a feasible
    completion exists), i.e. the first optimal subset in ``combinations`` order."""
    exc = 0
    for i in range(n):
        if inc.bit_count() == m:
            break
        if (inc >> i) & 1:
            continue
        if _feasible(adj, n, f, inc | (1 << i), exc):
            inc |= 1 << i
        else:
            exc |= 1 << i
    return _bits(inc)


def mda_select(dists: torch.Tensor, f: int) -> list[int]:
    """Indices (sorted) of the (n - f)-subset whose pairwise distances, sorted in decreasing
    order, are lexicographically smallest: the minimum diameter, then the smallest next
    largest distance, and so on (the module docstring says why and how).

    ``dists``: [n, n] symmetric (squared) distances; only their order matters.
    """
    n = dists.shape[0]
    m = n - f
    if f <= 0:
        return list(range(n))
    if m <= 1:
        return [0]
    d = dists.detach().to("cpu", torch.float64).numpy()
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    inc = 0
    inside = np.zeros(n, dtype=bool)
    cap = math.inf
    while inc.bit_count() < m:
        # The next largest distance of the candidates, among pairs not both chosen.
        free = upper & ~np.outer(inside, inside)
        vals = np.unique(d[free & (d <= cap)])  # sorted; its largest is always feasible
        lo, hi = 0, len(vals) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _feasible(_conflicts(d, vals[mid], inside), n, f, inc, 0):
                hi = mid
            else:
                lo = mid + 1
        t = float(vals[lo])
        pairs = np.argwhere(free & (d == t))
        if len(pairs) != 1:  # exact tie in distance: index order decides from here
            return _index_order_completion(_conflicts(d, t, inside), n, f, m, inc)
        # Distinct distances: every optimal subset contains both ends of the one pair at t
        # (one without it would have all its free distances below t), so both are chosen.
        for v in pairs[0]:
            inc |= 1 << int(v)
            inside[int(v)] = True
        cap = t
    return _bits(inc)


@register("mda", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="El Mhamdi, Guerraoui, Rouault, 'Distributed Momentum for Byzantine-"
                    "resilient SGD', ICLR 2021 (MDA); Rousseeuw 1985")
def mda(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Minimum-Diameter Averaging: the mean of the n - f inputs of smallest diameter,
    exact (see the module docstring for the algorithm and the tie rule)."""
    dists, bad = _select.pairwise_sq_dists(vectors, return_bad=True)
    idx = mda_select(dists, f)
    return _select.mean_of_rows(vectors, idx, all_finite=not bool(bad.any()))
