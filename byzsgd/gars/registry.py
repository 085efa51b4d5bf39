"""The GAR registry: name -> rule, with its resilience condition and reference.

Each rule module registers itself with :func:`register`.  A rule carries its own
resilience check (the least ``n`` it needs for ``f``) and says why it refuses, as
Garfield's registry does; ``--gar`` flags and ``--help`` read this table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from byzsgd.errors import ConfigError, ResilienceError, UnknownNameError

AggregateFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One registered aggregation (or pre-aggregation) rule."""

    name: str
    fn: AggregateFn
    min_inputs: Callable[[int], int]  # least n for f Byzantine inputs
    condition: str  # human-readable bound, e.g. "n >= 2f + 3"
    reference: str  # one line: authors, venue, year
    pre: bool = False  # True: pre-aggregation, returns Tensor[m, d]
    params: tuple[str, ...] = field(default=())  # documented keyword parameters

    def check(self, n: int, f: int) -> None:
        """Raise ResilienceError naming rule, n, f and the bound when n is too small."""
        if f < 0:
            raise ConfigError(f"rule {self.name!r}: f must be >= 0, got {f}")
        bound = self.min_inputs(f)
        if n < bound:
            raise ResilienceError(self.name, n, f, bound, self.condition)


_RULES: dict[str, Rule] = {}


def register(
    name: str,
    *,
    min_inputs: Callable[[int], int],
    condition: str,
    reference: str,
    pre: bool = False,
    params: tuple[str, ...] = (),
) -> Callable[[AggregateFn], AggregateFn]:
    """Decorator: add a rule to the registry under ``name``."""

    def deco(fn: AggregateFn) -> AggregateFn:
        if name in _RULES:
            raise RuntimeError(f"GAR {name!r} registered twice")
        _RULES[name] = Rule(name, fn, min_inputs, condition, reference, pre, params)
        return fn

    return deco


def get(name: str) -> Rule:
    try:
        return _RULES[name]
    except KeyError:
        raise UnknownNameError("GAR", name, list(_RULES)) from None


def names(*, pre: bool | None = None) -> list[str]:
    return sorted(n for n, r in _RULES.items() if pre is None or r.pre == pre)


def rules() -> dict[str, Rule]:
    return dict(_RULES)


def check_params(name: str, params: dict, *, what: str = "parameters") -> None:
    """Refuse, before step 0, keyword parameters rule ``name`` does not take (an unknown key
    would otherwise be a TypeError at the first aggregation).  The rule function's own
    signature is the reference: every keyword after ``(vectors, f)``."""
    import inspect

    rule = get(name)
    sig = inspect.signature(rule.fn)
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    known = [p for p in sig.parameters.values()
             if p not in positional and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - {p.name for p in known})
    if unknown:
        raise ConfigError(f"{what}: rule {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(p.name for p in known) or 'none'}")
