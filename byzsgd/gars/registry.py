"""The GAR registry: name -> rule, with its resilience condition and reference.

Each rule module registers itself with :func:`register`.  A rule carries its own
resilience check (the least ``n`` it needs for ``f``) and says why it refuses, as
Garfield's registry does; ``--gar`` flags and ``--help`` read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    reference: str  # one line: authors, venue, year (python -m byzsgd.gars lists it)
    pre: bool = False  # True: pre-aggregation, returns Tensor[m, d]

    def keywords(self) -> list[str] | None:
        """The keyword parameters the rule takes: its function's signature after ``(vectors, f)``
        (None: any, the function takes ``**kwargs``)."""
        import inspect

        sig = inspect.signature(self.fn)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return None
        positional = [p for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
        return [p.name for p in sig.parameters.values()
                if p not in positional and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

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
) -> Callable[[AggregateFn], AggregateFn]:
    """Decorator: add a rule to the registry under ``name``."""

    def deco(fn: AggregateFn) -> AggregateFn:
        if name in _RULES:
            raise RuntimeError(f"GAR {name!r} registered twice")
        _RULES[name] = Rule(name, fn, min_inputs, condition, reference, pre)
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
    signature is the reference (:meth:`Rule.keywords`)."""
    known = get(name).keywords()
    if known is None:
        return
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{what}: rule {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(known) or 'none'}")


def describe() -> str:
    """Every registered rule: its bound, its keyword parameters and its reference (what
    ``--gar``, ``--model_rule``, ``--gar_args`` and ``--pre_agg`` accept)."""
    lines = []
    for kind, pre in (("rules (--gar, --model_rule)", False), ("pre-aggregations (--pre_agg)", True)):
        lines.append(f"{kind}:")
        for name in names(pre=pre):
            rule = _RULES[name]
            keywords = rule.keywords()
            args = "any" if keywords is None else ", ".join(keywords) or "none"
            lines.append(f"  {name}: {rule.condition}; parameters: {args}")
            lines.append(f"      {rule.reference}")
    return "\n".join(lines)
