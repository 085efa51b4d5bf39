"""The attack registry: name -> forging function, with a one-line reference.

An attack is a pure function of what a Byzantine node can see (its honest gradient,
or the step's honest gradients when colluding) returning the f vectors it sends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from byzsgd.errors import UnknownNameError

ForgeFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Attack:
    name: str
    fn: ForgeFn
    reference: str
    params: tuple[str, ...] = field(default=())
    needs_rule: bool = False  # optimal_* attacks take the GAR in use (gar=..., gar_f=...)


_ATTACKS: dict[str, Attack] = {}


def register(name: str, *, reference: str, params: tuple[str, ...] = (), needs_rule: bool = False):
    def deco(fn: ForgeFn) -> ForgeFn:
        if name in _ATTACKS:
            raise RuntimeError(f"attack {name!r} registered twice")
        _ATTACKS[name] = Attack(name, fn, reference, params, needs_rule)
        return fn

    return deco


def get(name: str) -> Attack:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise UnknownNameError("attack", name, list(_ATTACKS)) from None


def names() -> list[str]:
    return sorted(_ATTACKS)
