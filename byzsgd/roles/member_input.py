"""What a role does with each value a member sends it (docs/design.md §3, "Who may send what").

The transport vouches only for a frame's form: a registered kind, the authenticated sender,
a kind that sender's role may send, a step in [0, 2**62), tensors of the registered shapes
and an allowed dtype, a meta map of at most 64 scalars (None, bool, int in msgpack's 64-bit
range, float, str, bytes).  The values are the member's choice, so a role takes nothing
from a message as it is: each value is checked here (a bad one is left out and counted as a
refusal, ``NodeStats.refuse``) or reduced by a rule that a minority of the quorum cannot move
far.  Issue 24: two workers reporting a loss of 1e308 overflowed the PS's mean and ended it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: the meta fields of a ``grad`` (everything else in a gradient's meta is ignored)
LOSS, REJECTED = "loss", "rejected"


def finite_real(value) -> float | None:
    """``value`` as a finite float, or None: an int or float (not a bool) whose float is
    finite (a 64-bit int always is)."""
    if type(value) not in (int, float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def count_in(value, low: int, high: int) -> int | None:
    """``value`` if it is an int (not a bool) in [low, high], else None."""
    return value if type(value) is int and low <= value <= high else None


@dataclass(frozen=True)
class GradMeta:
    """What a PS takes from one gradient's meta: its loss (None when absent or refused), the
    models its worker's filters refused (0..n_ps, paper --sync), the fields refused."""

    loss: float | None = None
    rejected: int = 0
    refused: tuple[str, ...] = ()


def grad_meta(meta, num_ps: int) -> GradMeta:
    """Check a ``grad`` message's meta: ``loss`` a finite real, ``rejected`` an int in
    [0, num_ps] (a worker cannot refuse more PSes than there are); anything else is ignored.
    Never raises."""
    if not isinstance(meta, dict):
        return GradMeta(refused=("meta",))
    refused = []
    loss = finite_real(meta.get(LOSS))
    if loss is None and meta.get(LOSS) is not None:
        refused.append(LOSS)
    rejected = count_in(meta.get(REJECTED), 0, num_ps)
    if rejected is None and meta.get(REJECTED) is not None:
        refused.append(REJECTED)
    return GradMeta(loss, rejected or 0, tuple(refused))


def median_finite(values) -> float | None:
    """The median of the finite floats among ``values`` (None if there is none).

    The loss a PS reports for a quorum of q_w gradients, fw of them Byzantine: while fewer
    than half the values are Byzantine the median lies between two correct ones, where a
    mean follows any one of them (and a sum of two 1e308 overflows).  The middle pair is
    halved before it is added: their mean never overflows."""
    finite = sorted(v for v in values if type(v) is float and math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    if len(finite) % 2:
        return finite[mid]
    return finite[mid - 1] / 2 + finite[mid] / 2
