"""Private kernels shared by the coordinate-wise rules: pruned sorting networks.

``torch.median(dim=0)`` / ``torch.sort(dim=0)`` on a wide [n, d] tensor are slow on CPU
(docs/design.md §9: 64x the copy floor at n=20, d=1.1e7) because each column is sorted on its own
through strided memory.  Here a column block ``X[:, c0:c1]`` is copied into a reused
buffer of n+1 contiguous rows (~8 MB per block on CPU: with smaller blocks the per-op
dispatch overhead dominates) and sorted *across rows* by a comparator
network (Batcher's odd-even merge sort) in which every comparator is two vectorised
element-wise ops (``torch.minimum`` / ``torch.maximum``) over the whole block.

The network is compiled once per (n, wanted outputs):

* backward pruning drops comparators whose outputs are never needed, and turns a
  comparator whose min (max) output alone is needed into one ``minimum`` (``maximum``);
* outputs may be grouped: a *group* of several sorted positions is only needed as a
  multiset (e.g. the kept middle of a trimmed mean, which is only summed), so a
  comparator whose two wires both end in the same group and that no later kept
  comparator touches is a mere permutation within the group and is dropped;
* the program is a static list of ``(op, a, b, out)`` on buffer rows: a two-output
  comparator writes its min into the spare row and its max in place, and the wire-to-row
  map is rotated at compile time, so no copies and no allocations happen at run time.

Non-finite inputs: every value is first passed through ``nan_to_num(nan=+inf,
posinf=+inf, neginf=-inf)`` so that NaN sorts as +inf (``minimum``/``maximum`` would
otherwise propagate NaN into both outputs).  A NaN therefore behaves exactly like +inf:
within a rule's bound it lands at the top end and is trimmed.

Results are value-identical between block sizes (every column is processed independently
by the same sequence of IEEE operations), hence deterministic; CUDA runs the same program
on larger blocks (or the whole width), so CPU and CUDA agree exactly on the network part
and up to floating-point summation order on the epilogues.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

# --------------------------------------------------------------------------- networks


@functools.lru_cache(maxsize=None)
def batcher_comparators(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for n wires (power of two padding dropped).

    Padding wires >= n are +inf forever (a comparator (i, j>=n) leaves both as they
    are), so comparators touching them are simply omitted.
    """
    comps: list[tuple[int, int]] = []
    if n <= 1:
        return ()
    size = 1 << (n - 1).bit_length()
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if (a // (2 * p)) == (b // (2 * p)) and b < n:
                        comps.append((a, b))
            k //= 2
        p *= 2
    return tuple(comps)


class Program:
    """A compiled, pruned network on an (n+1)-row buffer.

    ``ops``: list of ``(kind, a, b, out)`` with kind 0 = minimum, 1 = maximum.
    ``group_rows``: for each requested group, the buffer rows holding its values; a
    group of one position holds that exact order statistic.
    """

    def __init__(self, n: int, groups: Sequence[Sequence[int]]):
        self.n = n
        self.groups = tuple(tuple(g) for g in groups)
        comps = batcher_comparators(n)
        group_of = {}
        for gi, g in enumerate(self.groups):
            for p in g:
                if not 0 <= p < n or p in group_of:
                    raise ValueError(f"bad output position {p} for n={n}")
                group_of[p] = gi
        live = set(group_of)
        untouched = set(range(n))  # wires no later kept comparator touches
        kept: list[tuple[str, int, int]] = []
        for i, j in reversed(comps):
            li, lj = i in live, j in live
            if not li and not lj:
                continue
            if (li and lj and i in untouched and j in untouched
                    and len(self.groups[group_of[i]]) > 1
                    and group_of[i] == group_of[j]):
                continue  # permutation inside a multiset group
            kind = "cx" if (li and lj) else ("min" if li else "max")
            kept.append((kind, i, j))
            live.add(i)
            live.add(j)
            untouched.discard(i)
            untouched.discard(j)
        kept.reverse()
        # Assign rows: wire w starts in row w; row n is the spare.
        row = list(range(n))
        spare = n
        ops: list[tuple[int, int, int, int]] = []
        for kind, i, j in kept:
            a, b = row[i], row[j]
            if kind == "cx":
                ops.append((0, a, b, spare))
                ops.append((1, a, b, b))
                row[i], spare = spare, a
            elif kind == "min":
                ops.append((0, a, b, a))
            else:
                ops.append((1, a, b, b))
        self.ops = tuple(ops)
        self.group_rows = tuple(tuple(row[p] for p in g) for g in self.groups)
        self.comparators = len(kept)


@functools.lru_cache(maxsize=256)
def program(n: int, groups: tuple[tuple[int, ...], ...]) -> Program:
    return Program(n, groups)


# --------------------------------------------------------------------------- execution

# Above this many rows, a (stable) torch.sort along dim 0 replaces the network.  Networks
# cost O(n log^2 n) ops per column but the sort is slow per element; measured on the dev box
# (median, d=5e4, 1 thread), network vs sort: n=33 5.5 vs 56 ms, 64 10 vs 125, 96 18 vs
# 221, 128 37 vs 325, 200 70 vs 529, 256 134 vs 715, 512 358 vs 2170.
NETWORK_MAX_N = 512
# The fused kernels (Triton, torch.compile) keep all n values of a column in registers:
# bounded tighter (tested up to n=50; register spills and compile time grow with n).
FUSED_MAX_N = 64

# Columns per block on CPU.  Per-op overhead (~2-5 us of dispatch) dominates small blocks:
# measured on the 2-core dev box, the median at n=20, d=1e6 takes 114/66/44/33/28/27 ms
# with 0.25/0.5/1/2/4/8 MB blocks, and slows again from 32 MB; n=50 behaves alike.
_CPU_BLOCK_BYTES = 8 << 20
_CPU_MIN_COLS = 4096
_CPU_MAX_COLS = 1 << 17
# On CUDA every op is a kernel launch: use wide blocks (bounded to keep memory sane).
_CUDA_BLOCK_ELEMS = 1 << 27


def block_cols(n: int, d: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type == "cpu":
        esize = torch.empty((), dtype=dtype).element_size()
        c = _CPU_BLOCK_BYTES // ((n + 1) * esize)
        c = max(_CPU_MIN_COLS, min(_CPU_MAX_COLS, c))
        c = 1 << (c.bit_length() - 1)
    else:
        c = max(1 << 16, _CUDA_BLOCK_ELEMS // (n + 1))
    return max(1, min(c, d))


Epilogue = Callable[[list[list[torch.Tensor]], torch.Tensor], None]


def run(vectors: torch.Tensor, groups: Sequence[Sequence[int]], epilogue: Epilogue,
        rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sort every column of ``vectors`` [n, d] (or of its rows ``rows``) by a pruned network.

    For each column block, ``epilogue(values, out_block)`` receives, per requested group,
    the list of [c] tensors holding the sorted positions of that group (in the group's
    order; a multi-position group in no particular order), and writes ``out_block`` [c].
    The tensors are views into a reused buffer: the epilogue must not keep them.
    """
    n_all, d = vectors.shape
    n = n_all if rows is None else int(rows.numel())
    if out is None:
        out = torch.empty(d, dtype=vectors.dtype, device=vectors.device)
    if d == 0:
        return out
    inf = math.inf
    if n > NETWORK_MAX_N:
        # Networks grow as n log^2 n: fall back to a (stable, deterministic) sort.
        c = max(1, min(d, (1 << 24) // max(n, 1)))
        for c0 in range(0, d, c):
            w = min(c, d - c0)
            src = vectors[:, c0:c0 + w] if rows is None else vectors[rows, c0:c0 + w]
            s = torch.sort(torch.nan_to_num(src, nan=inf, posinf=inf, neginf=-inf),
                           dim=0, stable=True).values
            epilogue([[s[p] for p in g] for g in groups], out[c0:c0 + w])
        return out
    prog = program(n, tuple(tuple(g) for g in groups))
    c = block_cols(n, d, vectors.dtype, vectors.device)
    buf = torch.empty((n + 1, c), dtype=vectors.dtype, device=vectors.device)
    full_rows = list(buf.unbind(0))
    fns = (torch.minimum, torch.maximum)
    ops = [(fns[k], a, b, o) for k, a, b, o in prog.ops]
    for c0 in range(0, d, c):
        w = min(c, d - c0)
        src = vectors[:, c0:c0 + w] if rows is None else vectors[rows, c0:c0 + w]
        if w == c:
            r = full_rows
            torch.nan_to_num(src, nan=inf, posinf=inf, neginf=-inf, out=buf[:n])
        else:
            part = buf[:, :w]
            r = list(part.unbind(0))
            torch.nan_to_num(src, nan=inf, posinf=inf, neginf=-inf, out=part[:n])
        for fn, a, b, o in ops:
            fn(r[a], r[b], out=r[o])
        epilogue([[r[x] for x in g] for g in prog.group_rows], out[c0:c0 + w])
    return out


def sum_into(rows: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """out = rows[0] + rows[1] + ... (left to right), written in place."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for t in rows[2:]:
        out.add_(t)
    return out


# --------------------------------------------------------------------------- distances


def pairwise_sq_dists(vectors: torch.Tensor, return_bad: bool = False):
    """Squared Euclidean distances [n, n] (float64) via one Gram-matrix product.

    ``||x||^2 + ||y||^2 - 2 x.y`` with ``G = X X^T`` computed in the input dtype (the only
    O(n^2 d) work; squared norms are G's diagonal), the O(n^2) rest in float64, clamped at
    0, made exactly symmetric, diagonal exactly 0.  A row whose squared norm is not finite (a NaN/Inf coordinate,
    or overflow) is infinitely far from every other row (its row and column are +inf,
    except the diagonal).  With ``return_bad``, also returns that [n] bool mask.
    """
    g = (vectors @ vectors.T).to(torch.float64)
    nrm = torch.diagonal(g).clone()
    d = (nrm.unsqueeze(1) + nrm.unsqueeze(0)) - 2.0 * g
    d = torch.nan_to_num(d, nan=math.inf).clamp_min_(0.0)
    d = (d + d.T) * 0.5  # exactly symmetric (the Gram product need not be)
    bad = ~torch.isfinite(nrm)
    if bool(bad.any()):
        d[bad, :] = math.inf
        d[:, bad] = math.inf
    d.fill_diagonal_(0.0)
    return (d, bad) if return_bad else d


def mean_of_rows(vectors: torch.Tensor, idx, all_finite: bool) -> torch.Tensor:
    """Mean of ``vectors[idx]`` [d].

    When every row of ``vectors`` is finite this is one weighted GEMV (``w @ X``, w = 1/m
    on the selected rows): a single read of X, no [m, d] copy.  Otherwise (a zero weight
    times an infinite row would give NaN) it gathers the rows first.
    """
    n = vectors.shape[0]
    idx_t = torch.as_tensor(idx, dtype=torch.long).to(vectors.device)
    m = int(idx_t.numel())
    if all_finite and m > 1:
        w = torch.zeros(n, dtype=vectors.dtype, device=vectors.device)
        w[idx_t] = 1.0 / m
        return w @ vectors
    return vectors.index_select(0, idx_t).mean(dim=0)


def krum_scores(dists: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores [n]: sum of the squared distances to the n - f - 2 nearest others."""
    n = dists.shape[0]
    k = n - f - 2
    if k <= 0:
        return torch.zeros(n, dtype=dists.dtype, device=dists.device)
    off = dists.clone()
    off.fill_diagonal_(math.inf)
    near = torch.sort(off, dim=1).values[:, :k]
    return near.sum(dim=1)


# --------------------------------------------------------------------------- mean around


class AroundPlan:
    """Layout of "mean of the n - e values closest to a center" (MeaMed, Phocas, Bulyan).

    With sorted values s and window size beta = n - e, the beta values closest to c are
    the window s[k : k + beta] with

        k = #{ i in [0, e) : c - s[i] > s[i + beta] - c }

    (the predicate is monotone in i: c - s[i] decreases and s[i + beta] - c increases, so it
    holds for a prefix; a tie keeps the lower value, excluding the upper one).  Only the
    positions [0, e) and [beta, n) (and the median's, when it is the center) need their
    exact order; the others, [e, beta), are always in the window and only summed.

    ``groups`` (for :func:`run`): the singleton positions ``singles`` in order, then the
    core multiset (if not empty).  Needs 0 < e < n; center "trimmed_mean" needs 2e < n.
    """

    def __init__(self, n: int, e: int, center: str):
        self.n, self.e, self.center = n, e, center
        self.beta = beta = n - e
        self.med = sorted({(n - 1) // 2, n // 2})
        singles = set(range(e)) | set(range(beta, n))
        if center == "median":
            singles |= set(self.med)
        self.singles = sorted(singles)
        self.core = [p for p in range(e, beta) if p not in singles]
        self.groups = [[p] for p in self.singles] + ([self.core] if self.core else [])
        self.at = {p: i for i, p in enumerate(self.singles)}
        # For center="trimmed_mean": positions [e, n - e) = core + singles inside it.
        self.trim_singles = [p for p in self.singles if e <= p < n - e]

    def conditions(self):
        """For each single position p: (p, need k <= p, need k > p - beta)."""
        return [(p, p < self.e, p >= self.beta) for p in self.singles]


@functools.lru_cache(maxsize=256)
def around_plan(n: int, e: int, center: str) -> AroundPlan:
    return AroundPlan(n, e, center)
