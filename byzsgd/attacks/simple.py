"""Simple worker attacks: functions of the honest gradient(s) the Byzantine node knows.

Conventions (all attacks): ``honest`` is Tensor[k, d]; ``g = honest.mean(0)`` is "the" honest
gradient (the node's own when k = 1).  The result is Tensor[f, d] with the dtype and device of
``honest``.  Deterministic attacks send the same vector f times; randomized ones (``random``,
``gaussian``, ``drop``) draw every row independently from a private CPU ``torch.Generator``
seeded with ``seed`` (same result on CPU and CUDA), or from torch's global generator when
``seed`` is None.

* ``random``    -- i.i.d. uniform coordinates in ``[0, scale)`` (Garfield's ``torch.rand`` for scale=1).
* ``gaussian``  -- i.i.d. ``N(0, std^2)`` coordinates (default std = 200, the usual "Gaussian attack").
* ``reverse``   -- ``-factor * g`` (default factor = 100, as Garfield's reverse attack).
* ``sign_flip`` -- ``-g``.
* ``drop``      -- ``g`` with exactly ``round(p * d)`` coordinates set to 0 (default p = 0.3), the
  coordinates drawn uniformly without replacement per row.  (Garfield's version is a no-op:
  it discards the result of the non-in-place ``masked_fill``.)
* ``inf`` / ``nan`` -- all coordinates +inf / NaN.
* ``mimic``     -- a copy of ``honest[target]`` (default target 0; Karimireddy et al., ICLR 2022).
"""
from __future__ import annotations

import torch

from byzsgd.attacks.registry import register
from byzsgd.errors import ConfigError

__all__ = ["random_attack", "gaussian", "reverse", "sign_flip", "drop", "inf", "nan", "mimic"]


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def _repeat(v: torch.Tensor, f: int) -> torch.Tensor:
    return v.unsqueeze(0).repeat(f, 1)


@register("random", reference="Garfield's random attack (uniform noise)", params=("scale", "seed"))
def random_attack(honest: torch.Tensor, f: int, scale: float = 1.0, seed: int | None = None) -> torch.Tensor:
    d = honest.shape[1]
    u = torch.rand(f, d, generator=_generator(seed), dtype=torch.float64)
    return (u * float(scale)).to(dtype=honest.dtype, device=honest.device)


@register("gaussian", reference="Gaussian attack, e.g. Xie, Koyejo, Gupta, Generalized Byzantine-tolerant SGD, 2018",
          params=("std", "seed"))
def gaussian(honest: torch.Tensor, f: int, std: float = 200.0, seed: int | None = None) -> torch.Tensor:
    d = honest.shape[1]
    z = torch.randn(f, d, generator=_generator(seed), dtype=torch.float64)
    return (z * float(std)).to(dtype=honest.dtype, device=honest.device)


@register("reverse", reference="Garfield's reverse attack: -factor * g (factor 100)", params=("factor",))
def reverse(honest: torch.Tensor, f: int, factor: float = 100.0) -> torch.Tensor:
    return _repeat(honest.mean(dim=0) * -float(factor), f)


@register("sign_flip", reference="Sign flipping, e.g. Allen-Zhu et al., Byzantine-Resilient Non-Convex SGD, ICLR 2021")
def sign_flip(honest: torch.Tensor, f: int) -> torch.Tensor:
    return _repeat(-honest.mean(dim=0), f)


@register("drop", reference="Garfield's partial drop attack (fixed: coordinates really zeroed)", params=("p", "seed"))
def drop(honest: torch.Tensor, f: int, p: float = 0.3, seed: int | None = None) -> torch.Tensor:
    if not (0.0 <= float(p) <= 1.0):
        raise ConfigError(f"attack 'drop': p must be in [0, 1], got {p!r}")
    d = honest.shape[1]
    count = int(round(float(p) * d))
    gen = _generator(seed)
    out = _repeat(honest.mean(dim=0), f)
    for i in range(f):
        cols = torch.randperm(d, generator=gen)[:count].to(honest.device)
        out[i, cols] = 0
    return out


@register("inf", reference="Non-finite attack: every coordinate +inf")
def inf(honest: torch.Tensor, f: int) -> torch.Tensor:
    return torch.full((f, honest.shape[1]), float("inf"), dtype=honest.dtype, device=honest.device)


@register("nan", reference="Non-finite attack: every coordinate NaN")
def nan(honest: torch.Tensor, f: int) -> torch.Tensor:
    return torch.full((f, honest.shape[1]), float("nan"), dtype=honest.dtype, device=honest.device)


@register("mimic", reference="Karimireddy, He, Jaggi, Byzantine-Robust Learning on Heterogeneous Datasets via Bucketing, ICLR 2022",
          params=("target",), needs_estimate=True)
def mimic(honest: torch.Tensor, f: int, target: int = 0) -> torch.Tensor:
    k = honest.shape[0]
    if isinstance(target, bool) or not isinstance(target, int) or not (-k <= target < k):
        raise ConfigError(f"attack 'mimic': target {target!r} out of range for {k} honest rows")
    return _repeat(honest[target], f)
