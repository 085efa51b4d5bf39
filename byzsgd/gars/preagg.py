"""Pre-aggregation rules (``pre=True``): Tensor[n, d] -> Tensor[m, d], fed to a robust rule.

Use through :func:`byzsgd.gars.pre_aggregate`, then aggregate the result with any rule (with
the same f, unless stated otherwise).  Non-finite inputs: a row with a NaN/inf coordinate is
never mixed into a finite row by NNM, and comes out as a non-finite row from clipping / ARC
(its norm is +inf); bucketing averages it into its bucket (at most f buckets are affected,
which is exactly what the downstream rule tolerates).  The downstream robust rule then
discards those rows.

* ``nnm`` -- Nearest Neighbour Mixing, Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
  "Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023:
  row i becomes the average of the n - f rows nearest (Euclidean) to x_i, itself included
  (ties: lower index first; non-finite distances rank last).  A non-finite row i becomes an
  all-NaN row.  Bound: ``n >= 2f + 1``.
* ``bucketing`` -- Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
  via Bucketing", ICLR 2022: a random permutation pi (``torch.randperm`` on a CPU generator
  seeded with ``seed``; torch's global generator when ``seed`` is None), then ceil(n/s) buckets
  of s consecutive permuted rows (the last one smaller when s does not divide n), each
  replaced by its average; ``s = bucket_size`` (default 2).  The f Byzantine rows can corrupt
  at most f buckets, so the downstream rule needs ceil(n/s) >= 2f + 1, i.e. ``n >= 2sf + 1``.
  The registry's bound (``min_inputs``, checked at start-up) is the one for the default
  ``bucket_size = 2``: ``n >= 4f + 1``; a call with another bucket size checks
  ``n >= 2*bucket_size*f + 1`` itself and raises ResilienceError naming it (so bucket_size = 1
  is also refused below 4f + 1 by the registry).  Output order: bucket order.
* ``clipping`` -- static norm clipping: ``x_i <- x_i * min(1, tau / ||x_i||)``.  ``tau`` None
  (default) uses the median of the n norms (numpy median, non-finite norms ranked +inf), an
  adaptive threshold robust to f < n/2 outliers.  Clipping alone does not give robustness:
  bound ``n >= f + 1`` (at least one correct input); the downstream rule carries its own.
* ``arc`` -- Adaptive Robust Clipping, Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan,
  "The Vital Role of Gradient Clipping in Byzantine-Resilient Distributed Learning"
  (arXiv 2405.14432, 2024): with ``k = floor(2 (f/n) (n - f))`` (computed in integers as
  ``2f(n-f) // n``), the k largest-norm rows are clipped to the norm of the (k+1)-th largest;
  the others are unchanged.  k >= f whenever n >= 2f, so every non-finite row is clipped (to
  NaN) and the threshold is a finite norm.  Ties in norm: the lower index counts as smaller.
  Bound: ``n >= 2f + 1``.
"""
from __future__ import annotations

import torch

from byzsgd.gars._select import pairwise_sq_dists

from byzsgd.errors import ConfigError, ResilienceError
from byzsgd.gars.registry import register

__all__ = ["nnm", "bucketing", "clipping", "arc"]


def _finite_norms(vectors: torch.Tensor) -> torch.Tensor:
    norms = vectors.norm(dim=1)
    return torch.where(torch.isfinite(norms), norms, torch.full_like(norms, float("inf")))


def _clip_rows(vectors: torch.Tensor, norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Scale row i by min(1, thresholds_i / norms_i); a row of norm +inf becomes NaN."""
    scale = torch.ones_like(norms)
    over = norms > thresholds
    scale = torch.where(over, thresholds / norms, scale)  # +inf norm -> 0 ...
    out = vectors * scale.unsqueeze(1)
    inf_rows = torch.isinf(norms)
    if bool(inf_rows.any()):  # ... and 0 * inf would be a silent mix of NaN and 0: make it NaN
        out[inf_rows] = float("nan")
    return out


@register(
    "nnm",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Allouah et al., Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity (NNM), AISTATS 2023",
    pre=True,
)
def nnm(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Each row replaced by the average of its n - f nearest neighbours (itself included)."""
    n = vectors.shape[0]
    finite = torch.isfinite(vectors).all(dim=1)
    dist = pairwise_sq_dists(vectors)  # one Gram product; non-finite rows infinitely far
    dist.fill_diagonal_(-1.0)  # each row is its own nearest neighbour
    keep = torch.sort(dist, dim=1, stable=True).indices[:, : n - f]  # [n, n-f]
    # Averages as one [n, n] x [n, d] product (no [n, n-f, d] gather).  A finite row's n - f
    # nearest are finite when at most f rows are not, so zeroing those rows changes nothing
    # but keeps 0 * NaN out of the product.
    weights = torch.zeros(n, n, dtype=vectors.dtype, device=vectors.device)
    weights.scatter_(1, keep, 1.0 / (n - f))
    clean = torch.where(finite.unsqueeze(1), vectors, torch.zeros((), dtype=vectors.dtype,
                                                                  device=vectors.device))
    out = weights @ clean
    bad = ~finite | ~torch.isfinite(dist[:, :].gather(1, keep)).all(dim=1)
    out[bad] = float("nan")
    return out


@register(
    "bucketing",
    min_inputs=lambda f: 4 * f + 1,
    condition="n >= 2*bucket_size*f + 1, i.e. n >= 4f + 1 at the default bucket_size=2",
    reference="Karimireddy, He, Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing, ICLR 2022",
    pre=True,
)
def bucketing(vectors: torch.Tensor, f: int, bucket_size: int = 2, seed: int | None = None) -> torch.Tensor:
    """Seeded shuffle, then the averages of consecutive buckets of ``bucket_size`` rows."""
    n = vectors.shape[0]
    s = bucket_size
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ConfigError(f"rule 'bucketing': bucket_size must be an int >= 1, got {s!r}")
    bound = 2 * s * f + 1
    if n < bound:
        raise ResilienceError("bucketing", n, f, bound, "n >= 2*bucket_size*f + 1")
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen).to(vectors.device)
    shuffled = vectors[perm]
    full = n // s
    parts = []
    if full:
        parts.append(shuffled[: full * s].reshape(full, s, -1).mean(dim=1))
    if full * s < n:
        parts.append(shuffled[full * s:].mean(dim=0, keepdim=True))
    return torch.cat(parts, dim=0)


@register(
    "clipping",
    min_inputs=lambda f: f + 1,
    condition="n >= f + 1 (the downstream rule carries the robustness bound)",
    reference="Static norm clipping (e.g. Allouah et al., The Vital Role of Gradient Clipping..., 2024)",
    pre=True,
)
def clipping(vectors: torch.Tensor, f: int, tau: float | None = None) -> torch.Tensor:
    """Clip every row to norm ``tau`` (default: the median of the row norms)."""
    norms = _finite_norms(vectors)
    if tau is None:
        s = norms.sort().values
        n = s.shape[0]
        lo, hi = s[(n - 1) // 2], s[n // 2]
        t = lo if n % 2 == 1 else torch.where(lo == hi, lo, (lo + hi) / 2)
    else:
        if not (float(tau) >= 0.0):
            raise ConfigError(f"rule 'clipping': tau must be >= 0, got {tau!r}")
        t = torch.tensor(float(tau), dtype=norms.dtype, device=norms.device)
    return _clip_rows(vectors, norms, t.expand_as(norms))


@register(
    "arc",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Allouah et al., The Vital Role of Gradient Clipping in Byzantine-Resilient Distributed Learning (ARC), 2024",
    pre=True,
)
def arc(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Clip the floor(2(f/n)(n-f)) largest-norm rows to the norm of the next largest."""
    n = vectors.shape[0]
    k = (2 * f * (n - f)) // n
    if k == 0:
        return vectors.clone()
    norms = _finite_norms(vectors)
    order = torch.sort(norms, stable=True).indices  # ascending, ties: lower index first
    clipped = order[n - k:]
    threshold = norms[order[n - k - 1]]
    thresholds = torch.full_like(norms, float("inf"))
    thresholds[clipped] = threshold
    return _clip_rows(vectors, norms, thresholds)
