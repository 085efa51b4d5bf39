"""Spectral filters: SMEA (exact subset search) and CAF (iterative spectral reweighting).

Both work on the n x n Gram matrix of the inputs, never on a d x d covariance, so d can be
the size of a model.  The inputs are first shifted by their (NaN-safe) coordinate-wise
median -- every quantity used is translation invariant -- and the Gram matrix is computed in
float64 to avoid cancellation when the vectors share a large common part (models).

*Gram trick.*  For rows ``y_i`` (i in S, |S| = m) with mean ``mu`` and empirical covariance
``Sigma = (1/m) sum (y_i - mu)(y_i - mu)^T``, the non-zero eigenvalues of Sigma are those of the
m x m matrix ``(1/m) H K_SS H`` (``H = I - 11^T/m`` the centring matrix, ``K = Y Y^T``); more
generally, for weights ``p`` (sum 1) and ``A = diag(sqrt p)(Y - 1 mu^T)``, ``Sigma_p = A^T A`` and
``A A^T`` share their non-zero spectrum, the top eigenvector of Sigma_p being ``A^T u / sqrt(lambda)``
for the top eigenvector ``u`` of ``A A^T``.  Eigenpairs come from ``torch.linalg.eigh``: exact
(to float64 rounding), no power iteration, no randomness.

Non-finite inputs: a row with any NaN/inf coordinate (or whose shifted squared norm overflows
float64) is treated as excluded from the start (SMEA: every subset containing it scores
+inf; CAF: its weight starts at 0).  If more than f rows are non-finite the resilience
assumption is broken and the output is all-NaN, rather than a silently wrong vector.

SMEA: Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the Privacy-Robustness-Utility Trilemma
in Distributed Learning", ICML 2023.  Enumerates every subset S of size n - f (in
``itertools.combinations`` order, chunked), scores it by ``lambda_max(Sigma_S)`` and returns the
mean of the first subset of minimal score.  Cost: C(n, f) small eigenproblems; refused
(ConfigError) above ``max_subsets`` (default 1e6) subsets.

CAF: Allouah, Guerraoui, Stephan, "Towards Trustworthy Federated Learning with Untrusted
Participants", ICML 2025 (Covariance-bound Agnostic Filter).  Weights c_i = 1; while
``sum c > n - 2f``: weighted mean mu_c, weighted covariance Sigma_c = sum (c_i/C)(x_i-mu_c)(x_i-mu_c)^T,
its exact top eigenpair (lambda, v); remember mu_c if lambda is the smallest seen;
``tau_i = ((x_i - mu_c)^T v)^2``; ``c_i <- c_i (1 - tau_i / max_{j: c_j > 0} tau_j)``.  Returns the
remembered mean.  The maximum is taken over rows still weighted, so at least one weighted row
is zeroed per iteration: at most n iterations.  (ByzFL takes the max over all rows and uses a
single random power step; we use the exact eigenvector as the paper's analysis assumes.)
If lambda = 0 (all weighted rows equal) the current mean is optimal and the loop stops.
With f = 0 CAF is the plain average.  A degenerate top eigenvalue makes v non-unique; the
result is then deterministic but may depend on input order.

Resilience: ``n >= 2f + 1`` for both (the papers' f < n/2).
"""
from __future__ import annotations

import itertools
import math

import torch

from byzsgd.errors import ConfigError
from byzsgd.gars.aksel_condense import robust_coordinate_median
from byzsgd.gars.registry import register

__all__ = ["smea", "caf"]

_CHUNK = 4096


def _shifted_gram(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of usable rows, float64 Gram matrix of those rows after a median shift)."""
    finite = torch.isfinite(vectors).all(dim=1)
    idx = torch.nonzero(finite).flatten()
    if idx.numel() == 0:
        return idx, torch.zeros(0, 0, dtype=torch.float64, device=vectors.device)
    rows = vectors[idx]
    y = (rows - robust_coordinate_median(rows)).double()
    gram = y @ y.T
    ok = torch.isfinite(torch.diagonal(gram))
    if not bool(ok.all()):
        idx, gram = idx[ok], gram[ok][:, ok]
    return idx, gram


def _nan_like(vectors: torch.Tensor) -> torch.Tensor:
    return torch.full_like(vectors[0], float("nan"))


@register(
    "smea",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Allouah et al., On the Privacy-Robustness-Utility Trilemma in Distributed Learning (SMEA), ICML 2023",
)
def smea(vectors: torch.Tensor, f: int, max_subsets: int = 1_000_000) -> torch.Tensor:
    """Mean of the size-(n-f) subset whose empirical covariance has the smallest top eigenvalue."""
    n = vectors.shape[0]
    m = n - f
    count = math.comb(n, m)
    if count > max_subsets:
        raise ConfigError(f"rule 'smea': C({n}, {m}) = {count} subsets exceeds max_subsets={max_subsets}")
    idx, gram = _shifted_gram(vectors)
    if n - idx.numel() > f:
        return _nan_like(vectors)
    # Full n x n Gram with +inf marking unusable rows (any subset touching them scores +inf).
    bad = torch.ones(n, dtype=torch.bool, device=vectors.device)
    bad[idx] = False
    K = torch.zeros(n, n, dtype=torch.float64, device=vectors.device)
    K[idx.unsqueeze(1), idx.unsqueeze(0)] = gram
    best_val, best_subset = math.inf, None
    combos = itertools.combinations(range(n), m)
    while True:
        chunk = list(itertools.islice(combos, _CHUNK))
        if not chunk:
            break
        s = torch.tensor(chunk, dtype=torch.long, device=vectors.device)  # [B, m]
        sub = K[s.unsqueeze(2), s.unsqueeze(1)]  # [B, m, m]
        row = sub.mean(dim=2, keepdim=True)
        col = sub.mean(dim=1, keepdim=True)
        tot = sub.mean(dim=(1, 2), keepdim=True)
        centred = sub - row - col + tot
        centred = (centred + centred.transpose(1, 2)) / 2
        lam = torch.linalg.eigvalsh(centred)[:, -1] / m
        lam = torch.where(bad[s].any(dim=1), torch.full_like(lam, math.inf), lam)
        j = int(torch.argmin(lam))
        v = float(lam[j])
        if v < best_val:
            best_val, best_subset = v, chunk[j]
    if best_subset is None:  # every subset touches a non-finite row
        return _nan_like(vectors)
    sel = torch.tensor(best_subset, dtype=torch.long, device=vectors.device)
    return vectors[sel].mean(dim=0)


@register(
    "caf",
    min_inputs=lambda f: 2 * f + 1,
    condition="n >= 2f + 1",
    reference="Allouah, Guerraoui, Stephan, Towards Trustworthy Federated Learning with Untrusted Participants (CAF), ICML 2025",
)
def caf(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Covariance-bound Agnostic Filter with exact top eigenvectors (Gram trick)."""
    n = vectors.shape[0]
    idx, K = _shifted_gram(vectors)
    k = idx.numel()
    if n - k > f:
        return _nan_like(vectors)
    rows = vectors[idx]
    if f == 0:
        return rows.mean(dim=0)
    w = torch.ones(k, dtype=torch.float64, device=vectors.device)
    best_val, best_p = math.inf, w / k
    threshold = n - 2 * f
    for _ in range(n + 1):
        total = float(w.sum())
        if total <= threshold:
            break
        p = w / total
        Kp = K @ p
        D = K - Kp.unsqueeze(0) - Kp.unsqueeze(1) + p @ Kp  # Gram of (y_i - mu_c)
        sp = p.sqrt()
        M = sp.unsqueeze(1) * D * sp.unsqueeze(0)
        M = (M + M.T) / 2
        evals, evecs = torch.linalg.eigh(M)
        lam = float(evals[-1])
        if lam < best_val:
            best_val, best_p = lam, p
        if lam <= 0.0:
            break
        proj = D @ (sp * evecs[:, -1])  # (x_i - mu_c)^T v * sqrt(lambda)
        tau = proj.pow(2) / lam
        tau_max = float(tau[w > 0].max())
        if tau_max <= 0.0:
            break
        w = (w * (1.0 - tau / tau_max)).clamp_min(0.0)
        w = torch.where(w > 0, w, torch.zeros_like(w))
    return (best_p.to(rows.dtype).unsqueeze(0) @ rows).squeeze(0)
