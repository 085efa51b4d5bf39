"""``stealth``: the forgery the default's gradient check cannot see.

Why: the main job's PSes recompute a random row of each quorum and ban its sender when the row
is further than ``--check_tolerance`` (relative L2 distance) from the gradient the sender's
batch gives (:mod:`byzsgd.roles.gradient_check`).  Every other attack of the menu forges far
beyond that and is banned within a few steps.  An attacker that adapts to the check knows the
tolerance (the configuration is public) and stays inside it: it sends its own gradient ``g``
moved by ``margin * tolerance * |g|`` in the most harmful direction it knows, every step, and
is never banned.  Its cell measures what the check leaves to an unbannable forger: a push of at
most ``tolerance`` of each Byzantine row's norm, always the same way (docs/worst_case.md).

Directions (``u``, scaled to length ``margin * tolerance * |g|``):

* ``reverse``: against the mean of the honest rows it knows (its own gradient alone, or the
  step's honest gradients when colluding or scheduled): the inner-product attack's direction;
* ``sign``: ``-sign(mean)``, the same budget spread evenly over the coordinates (each
  coordinate's push is then the largest the L2 budget allows for a push of every coordinate).

The first row of ``honest`` is the attacker's own gradient (the attacks' convention,
:mod:`byzsgd.attacks.simple`): the check recomputes exactly that one.
"""
from __future__ import annotations

import torch

from byzsgd.attacks.registry import register
from byzsgd.errors import ConfigError

__all__ = ["stealth", "DIRECTIONS"]

DIRECTIONS = ("reverse", "sign")


def _margin(value, cfg=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"must be a number in (0, 1] (the share of the tolerance used), got {value!r}")
    return float(value)


def _tolerance(value, cfg=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ConfigError(f"must be a number > 0 (the PSes' --check_tolerance), got {value!r}")
    return float(value)


def _direction(value, cfg=None) -> str:
    if value not in DIRECTIONS:
        raise ConfigError(f"must be one of {', '.join(DIRECTIONS)}, got {value!r}")
    return value


@register("stealth",
          reference="a forgery inside the gradient check's tolerance: the own gradient moved by "
                    "margin x tolerance of its norm against the honest mean (this project, "
                    "docs/worst_case.md)",
          params=("check_tolerance", "margin", "direction"), own_row=True,
          checks={"check_tolerance": _tolerance, "margin": _margin, "direction": _direction})
def stealth(honest: torch.Tensor, f: int, check_tolerance: float = 1e-3, margin: float = 0.9,
            direction: str = "reverse") -> torch.Tensor:
    own = honest[0].double()
    mean = honest.double().mean(dim=0)
    u = -mean if direction == "reverse" else -torch.sign(mean)
    norm = u.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        out = own  # nothing known to push against: the honest gradient
    else:
        out = own + u * (float(margin) * float(check_tolerance) * own.norm() / norm)
    return out.to(dtype=honest.dtype, device=honest.device).unsqueeze(0).repeat(f, 1)
