"""Attacks built from the statistics of the honest gradients the colluding nodes know.

``honest`` is Tensor[k, d]: the step's honest gradients (omniscient collusion), or the
gradients of several batches computed by the Byzantine nodes themselves (Garfield estimates
ALIE's statistics from fw batches).  ``mu = honest.mean(0)``.  Output: f copies of one vector.

* ``alie`` -- "A Little Is Enough", Baruch, Baruch, Goldberg, NeurIPS 2019: ``mu + z * sigma``,
  sigma the per-coordinate standard deviation of the rows (unbiased, correction 1).  ``z`` is
  a number, or ``"textbook"`` (also what an absent ``z`` means) for the paper's z_max:
  ``s = floor(n/2 + 1) - f`` and ``z = Phi^-1((n - s)/n)``
  (``statistics.NormalDist``), n = total number of workers (param ``n``, default ``k + f``).  s is
  clamped to [1, n - 1] so z stays finite (s <= 0 means the Byzantine already hold a majority;
  Phi^-1(1) would be +inf).  For n = 20, f = 8: s = 3, z = Phi^-1(0.85) = 1.0364 (Garfield's
  hard-coded 1.035).  With a single row (k = 1) no spread can be estimated: sigma = 0 and the
  attack sends ``mu`` -- finite, unlike Garfield's NaN for fw = 1; supply several batches'
  gradients as rows to get a real attack.

  The textbook z is tiny at small n: ``alie_z(7, 1) = 0.18`` (an average moves by 0.03 sigma)
  and ``alie_z(6, 1) = 0.0`` exactly (s = 3, Phi^-1(0.5): the Byzantine worker sends the honest
  mean).  It is the strength the paper argues for many workers, not an attack at these sizes;
  whatever shows an ALIE result (the tests, the README's figure) names its z, and uses one that
  bites the plain average (``{"z": 100}`` there) next to the robust rules.
* ``ipm`` -- Inner Product Manipulation, Xie, Koyejo, Gupta, "Fall of Empires: Breaking
  Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019: ``-epsilon * mu``,
  default epsilon = 0.1 (the small-epsilon regime that fools median/Krum).
* ``empire`` -- the same formula with Garfield's default epsilon = 10.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch

from byzsgd.attacks.registry import register
from byzsgd.errors import ConfigError

__all__ = ["alie_z", "alie", "alie_strength", "ipm", "empire", "honest_stats", "TEXTBOOK"]

#: ``alie``'s ``z`` that asks for the paper's z_max (:func:`alie_z`)
TEXTBOOK = "textbook"


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max for n workers of which f Byzantine (finite; see module doc)."""
    if n < 2 or f < 0 or f >= n:
        raise ConfigError(f"ALIE needs n >= 2 and 0 <= f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    s = min(max(s, 1), n - 1)
    return NormalDist().inv_cdf((n - s) / n)


def honest_stats(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased std) per coordinate; std = 0 with a single row."""
    mu = honest.mean(dim=0)
    k = honest.shape[0]
    if k < 2:
        return mu, torch.zeros_like(mu)
    # the two-pass formula by hand: torch's std/var over a short leading dimension of wide
    # rows is ~35x slower on CPU (2.5 ms for 4 x 21,840), which made a Byzantine worker
    # slower than the honest ones -- and so absent from the quorums it means to attack
    return mu, (honest - mu).square_().sum(dim=0).div_(k - 1).sqrt_()


def _default_n(honest: torch.Tensor, f: int, n: int | None) -> int:
    if n is None:
        return honest.shape[0] + f
    if isinstance(n, bool) or not isinstance(n, int) or n < f + 1:
        raise ConfigError(f"n (total workers) must be an int >= f + 1 = {f + 1}, got {n!r}")
    return n


def alie_strength(z, n: int | None = None, f: int | None = None) -> float | None:
    """ALIE's z as a number: ``z`` itself, or :func:`alie_z` (n, f) for ``None`` /
    ``"textbook"`` (None when n or f is not given: the check of an argument)."""
    if z is None or z == TEXTBOOK:
        return alie_z(n, f) if n is not None and f is not None else None
    if isinstance(z, bool) or not isinstance(z, (int, float, str)):
        raise ConfigError(f"alie: z must be a number or {TEXTBOOK!r}, got {z!r}")
    try:
        value = float(z)
    except ValueError:
        raise ConfigError(f"alie: z must be a number or {TEXTBOOK!r}, got {z!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"alie: z must be finite, got {z!r}")
    return value


def _checked_z(z):
    """A bad z fails at start, not at the first forged gradient."""
    alie_strength(z)
    return z


@register("alie", reference="Baruch, Baruch, Goldberg, A Little Is Enough, NeurIPS 2019", params=("n", "z"),
          needs_estimate=True, checks={"z": lambda z, cfg: _checked_z(z)})
def alie(honest: torch.Tensor, f: int, n: int | None = None, z: float | str | None = None) -> torch.Tensor:
    textbook = z is None or z == TEXTBOOK
    z = alie_strength(z, _default_n(honest, f, n) if textbook else None, f)
    mu, sigma = honest_stats(honest)
    return (mu + z * sigma).unsqueeze(0).repeat(f, 1)


@register("ipm", reference="Xie, Koyejo, Gupta, Fall of Empires (inner product manipulation), UAI 2019",
          params=("epsilon",), needs_estimate=True)
def ipm(honest: torch.Tensor, f: int, epsilon: float = 0.1) -> torch.Tensor:
    return (honest.mean(dim=0) * -float(epsilon)).unsqueeze(0).repeat(f, 1)


@register("empire", reference="Garfield's fall-of-empires attack: -epsilon * mean, epsilon 10",
          params=("epsilon",), needs_estimate=True)
def empire(honest: torch.Tensor, f: int, epsilon: float = 10.0) -> torch.Tensor:
    return ipm(honest, f, epsilon=epsilon)
