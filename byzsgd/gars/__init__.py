"""Gradient (and model) aggregation rules: pure tensor functions, no networking.

Public API::

    aggregate(name, vectors, f, **params) -> Tensor[d]        # vectors: Tensor[n, d]
    pre_aggregate(name, vectors, f, **params) -> Tensor[m, d]
    min_inputs(name, f) -> int                                # least n for f Byzantine inputs
    check(name, n, f)                                         # raises ResilienceError below the bound

Each rule lives in its own module and registers itself in :mod:`byzsgd.gars.registry`.
"""
from __future__ import annotations

import torch

from byzsgd.errors import ConfigError
from byzsgd.gars import registry
from byzsgd.gars.registry import Rule, get, names, rules

# Importing the rule modules registers them.
from byzsgd.gars import basic, median_family, krum_family, mda, geometric  # noqa: F401,E402
from byzsgd.gars import aksel_condense, cge, monna, spectral, preagg  # noqa: F401,E402

__all__ = ["aggregate", "pre_aggregate", "min_inputs", "check", "get", "names", "rules", "Rule"]


def _validate(rule: Rule, vectors: torch.Tensor, f: int) -> None:
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        raise ConfigError(f"rule {rule.name!r}: vectors must be a 2-D tensor [n, d], got "
                          f"{getattr(vectors, 'shape', type(vectors))}")
    if not vectors.is_floating_point():
        raise ConfigError(f"rule {rule.name!r}: vectors must be floating point, got {vectors.dtype}")
    if isinstance(f, bool) or not isinstance(f, int):
        raise ConfigError(f"rule {rule.name!r}: f must be an int, got {f!r}")
    rule.check(vectors.shape[0], f)


def min_inputs(name: str, f: int) -> int:
    """The least number of inputs rule ``name`` needs to tolerate ``f`` Byzantine ones."""
    return get(name).min_inputs(f)


def check(name: str, n: int, f: int) -> None:
    """Raise :class:`~byzsgd.errors.ResilienceError` when n inputs are too few for f."""
    get(name).check(n, f)


def aggregate(name: str, vectors: torch.Tensor, f: int, **params) -> torch.Tensor:
    """Aggregate ``vectors`` [n, d] with rule ``name`` tolerating ``f`` Byzantine rows."""
    rule = get(name)
    if rule.pre:
        raise ConfigError(f"{name!r} is a pre-aggregation rule: use pre_aggregate()")
    _validate(rule, vectors, f)
    return rule.fn(vectors, f, **params)


def pre_aggregate(name: str, vectors: torch.Tensor, f: int, **params) -> torch.Tensor:
    """Apply pre-aggregation rule ``name`` to ``vectors`` [n, d], returning [m, d]."""
    rule = get(name)
    if not rule.pre:
        raise ConfigError(f"{name!r} is an aggregation rule, not a pre-aggregation: use aggregate()")
    _validate(rule, vectors, f)
    return rule.fn(vectors, f, **params)
