"""Coordinate-wise rules: median, trimmed mean, MeaMed, Phocas.

On CUDA (and where Triton imports) the same networks run inside one generated Triton
kernel per rule, in registers (:mod:`byzsgd.gars._triton_select`); set
``BYZSGD_NO_TRITON=1`` to force the pure-torch path.  On CPU, ``BYZSGD_GAR_COMPILE=1``
opts in to the same program fused by ``torch.compile`` (:mod:`byzsgd.gars._compiled`;
~1-1.5x the copy floor at n=20 instead of ~3-8x, at the price of a one-off compilation).

All four sort every coordinate across the n inputs with the pruned min/max networks of
:mod:`byzsgd.gars._select` (column blocks of ~8 MB; see docs/design.md §9), not with
``torch.median``/``torch.sort`` on dim 0, which are 10-60x slower on wide inputs.

Non-finite inputs (all four rules): NaN is ordered as +inf, +inf as +inf, -inf as -inf.
Within the bound (at most f non-finite values per coordinate, n >= 2f + 1) they are
trimmed away and never reach the output.  Beyond it the output may be +-inf or NaN
(e.g. the mean of +inf and -inf), never an exception.

Public helpers other modules may import (plain tensors in, plain tensors out, no
resilience check):

* :func:`coordinate_median` (vectors [n, d]) -> [d], numpy's median;
* :func:`coordinate_trimmed_mean` (vectors, b) -> [d], drop the b largest and b smallest;
* :func:`mean_around` (vectors, e, center="median" | "trimmed_mean") -> [d], the mean of
  the n - e values closest to the center, per coordinate (MeaMed, Phocas, Bulyan's last
  step).
"""
from __future__ import annotations

import torch

from byzsgd.gars import _compiled, _select, _triton_select
from byzsgd.gars.registry import register

__all__ = [
    "coordinate_median",
    "coordinate_trimmed_mean",
    "trimmed_mean_rows",
    "mean_around",
    "median",
    "trimmed_mean",
    "meamed",
    "phocas",
]


def _check_2d(vectors: torch.Tensor) -> tuple[int, int]:
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be [n, d], got {tuple(vectors.shape)}")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("no input vectors")
    return n, d


def coordinate_median(vectors: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median of ``vectors`` [n, d] (or of ``vectors[rows]``), numpy's way.

    Odd n: the middle value; even n: the mean of the two middle values ((a + b) / 2).
    NaN sorts as +inf (see module docstring).  Returns a new [d] tensor, same dtype.
    """
    n, _ = _check_2d(vectors)
    if rows is not None:
        n = int(rows.numel())
    elif _triton_select.available(vectors):
        r = _triton_select.median(vectors)
        if r is not None:
            return r
    elif _compiled.enabled(vectors):
        r = _compiled.median(vectors)
        if r is not None:
            return r
    if n % 2:
        groups = [[n // 2]]

        def epi(v, out):
            out.copy_(v[0][0])
    else:
        groups = [[n // 2 - 1], [n // 2]]

        def epi(v, out):
            torch.add(v[0][0], v[1][0], out=out)
            out.mul_(0.5)
    return _select.run(vectors, groups, epi, rows=rows)


def coordinate_trimmed_mean(vectors: torch.Tensor, b: int,
                            rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per coordinate, drop the ``b`` largest and ``b`` smallest values, average the rest.

    Needs n > 2b.  NaN sorts as +inf.  Returns a new [d] tensor, same dtype.
    """
    n, _ = _check_2d(vectors)
    if rows is not None:
        n = int(rows.numel())
    if not 0 <= 2 * b < n:
        raise ValueError(f"trimmed mean of n={n} values cannot drop 2*{b}")
    m = n - 2 * b
    if rows is None and _triton_select.available(vectors):
        r = _triton_select.trimmed_mean(vectors, b)
        if r is not None:
            return r
    if rows is None and _compiled.enabled(vectors):
        r = _compiled.trimmed_mean(vectors, b)
        if r is not None:
            return r
    if b == 0:
        groups = [list(range(n))]
    else:
        groups = [list(range(b, n - b))]

    def epi(v, out):
        _select.sum_into(v[0], out)
        out.div_(m)
    return _select.run(vectors, groups, epi, rows=rows)


# Name kept for callers that think of it as "trimmed mean over rows".
trimmed_mean_rows = coordinate_trimmed_mean


def mean_around(vectors: torch.Tensor, e: int, center: str = "median",
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per coordinate, the mean of the n - e values closest to a center.

    ``center="median"``: numpy's median of the n values (MeaMed, Bulyan);
    ``center="trimmed_mean"``: the mean after dropping the e largest and e smallest
    (Phocas; needs n >= 2e + 1).  Needs e < n (Bulyan excludes 2f of n - 2f values).

    The n - e closest values form a window of the sorted values, found without any search
    (see :class:`byzsgd.gars._select.AroundPlan`); a tie in distance between a lower and
    an upper value keeps the lower one.  Values equal to each other are interchangeable, so
    the result is well defined.
    """
    n, _ = _check_2d(vectors)
    if rows is not None:
        n = int(rows.numel())
    if not 0 <= e < n:
        raise ValueError(f"mean_around of n={n} values cannot exclude e={e} (needs e < n)")
    if center not in ("median", "trimmed_mean"):
        raise ValueError(f"center must be 'median' or 'trimmed_mean', got {center!r}")
    if center == "trimmed_mean" and 2 * e >= n:
        raise ValueError(f"an e-trimmed mean of n={n} values needs n >= 2e+1, e={e}")
    m = n - e
    if rows is None and _triton_select.available(vectors):
        r = _triton_select.mean_around(vectors, e, center)
        if r is not None:
            return r
    if rows is None and _compiled.enabled(vectors):
        r = _compiled.mean_around(vectors, e, center)
        if r is not None:
            return r
    if e == 0:
        def epi0(v, out):
            _select.sum_into(v[0], out)
            out.div_(n)
        return _select.run(vectors, [list(range(n))], epi0, rows=rows)

    plan = _select.around_plan(n, e, center)
    beta, single_at = plan.beta, plan.at
    ns = len(plan.singles)
    conds = plan.conditions()

    def epi(v, out):
        sv = [g[0] for g in v[:ns]]  # sorted values at plan.singles
        core_sum = _select.sum_into(v[ns], torch.empty_like(out)) if plan.core else None
        if center == "median":
            c = sv[single_at[plan.med[0]]]
            if n % 2 == 0:
                c = (c + sv[single_at[plan.med[1]]]) * 0.5
        else:
            parts = ([core_sum] if core_sum is not None else []) + [
                sv[single_at[p]] for p in plan.trim_singles]
            c = _select.sum_into(parts, torch.empty_like(out)) / (n - 2 * e)
        k = torch.zeros(out.shape, dtype=torch.int8, device=out.device)
        for i in range(e):
            k += (c - sv[single_at[i]]) > (sv[single_at[i + beta]] - c)
        if core_sum is not None:
            out.copy_(core_sum)
        else:
            out.zero_()
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        for p, need_lo, need_hi in conds:
            val = sv[single_at[p]]
            if need_lo and need_hi:
                keep = (k <= p) & (k > p - beta)
            elif need_lo:
                keep = k <= p
            elif need_hi:
                keep = k > p - beta
            else:
                out.add_(val)
                continue
            out.add_(torch.where(keep, val, zero))
        out.div_(m)
    return _select.run(vectors, plan.groups, epi, rows=rows)


# ---------------------------------------------------------------- registered rules


@register("median", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="Yin, Chen, Ramchandran, Bartlett, ICML 2018 (coordinate-wise median)")
def median(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards
    Optimal Statistical Rates", ICML 2018), numpy's definition: mean of the two middle
    values for even n.  NaN orders as +inf; within n >= 2f+1 non-finite values never
    reach the output.  ``f`` only enters the resilience check."""
    return coordinate_median(vectors)


@register("trimmed_mean", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="Yin, Chen, Ramchandran, Bartlett, ICML 2018 (coordinate-wise trimmed mean)")
def trimmed_mean(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the f
    largest and f smallest values and average the n - 2f others.  NaN orders as +inf and
    is trimmed within the bound."""
    return coordinate_trimmed_mean(vectors, f)


@register("meamed", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="Xie, Koyejo, Gupta, 'Generalized Byzantine-tolerant SGD', 2018 (MeaMed)")
def meamed(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Mean-around-median (Xie, Koyejo, Gupta, arXiv:1802.10116, 2018): per coordinate,
    the mean of the n - f values closest to the (numpy) median.  Ties in distance exclude
    the upper value first.  NaN orders as +inf and is excluded within the bound."""
    return mean_around(vectors, f, "median")


@register("phocas", min_inputs=lambda f: 2 * f + 1, condition="n >= 2f + 1",
          reference="Xie, Koyejo, Gupta, 'Phocas: dimensional Byzantine-resilient SGD', 2018")
def phocas(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Phocas (Xie, Koyejo, Gupta, arXiv:1805.09682, 2018): per coordinate, the mean of the
    n - f values closest to the f-trimmed mean.  Ties in distance exclude the upper value
    first.  NaN orders as +inf and is excluded within the bound."""
    return mean_around(vectors, f, "trimmed_mean")
