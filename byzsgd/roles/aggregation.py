"""How a role applies a rule to what a quorum delivered, NaN/Inf rows included.

A correct node never sends NaN or Inf while its model is finite, so such a row is
Byzantine: it is left out and the rule tolerates that many fewer Byzantine rows among the
rest (``f - k`` of ``n - k``; every registered bound grows by at least one input per
tolerated Byzantine one, and the bound is checked anyway).  Left in, a NaN sits at an
extreme of every coordinate and still biases a median by one order statistic.  When every
row is non-finite (the model itself diverged) the rule gets them all, so the run goes on and
shows the divergence instead of waiting for a finite input that will never come.

Two stages, so that a caller can put its own between them (the PS's per-worker momentum,
:class:`byzsgd.roles.gradient_aggregation.GradientAggregation`): :func:`finite_rows` (which rows
stay, and the f the rule then tolerates) and :func:`apply_rule` (a pre-aggregation ``pipeline``,
``--pre_agg``, in order, then the rule: :func:`byzsgd.gars.pipeline.robust_aggregate`; on the
CPU when the rule cannot run on the rows' device).  The bound checked before dropping is the
whole pipeline's.  :func:`aggregate_finite` is the two in a row (models, BatchNorm buffers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from byzsgd.errors import ByzSGDError, ResilienceError
from byzsgd.gars.pipeline import Pipeline, robust_aggregate

log = logging.getLogger("byzsgd.aggregation")


@dataclass
class FiniteRows:
    """What :func:`finite_rows` keeps: ``rows`` (those of ``rows[kept]``), the Byzantine rows
    ``f`` the rule must then tolerate, and the indices of the rows ``dropped``."""
    rows: torch.Tensor
    kept: list[int]
    f: int
    dropped: list[int]


def finite_rows(rule: str, rows: torch.Tensor, f: int, pipeline: "str | Pipeline | None" = None,
                *, drop_nonfinite: bool = True) -> FiniteRows:
    """The first stage: the non-finite rows left out when the pipeline and rule still hold
    with ``f - k`` of ``n - k``; every row kept otherwise (see the module docstring)."""
    pipe = Pipeline.parse(pipeline)
    n = rows.shape[0]
    out = FiniteRows(rows, list(range(n)), f, [])
    if drop_nonfinite:
        finite = torch.isfinite(rows).all(dim=1)
        k = int(n - int(finite.sum()))
        if 0 < k < n:
            f_left = max(0, f - k)
            try:
                pipe.check(rule, n - k, f_left)
            except ResilienceError:
                pass  # too few rows left for the pipeline and rule: give them everything
            else:
                flags = finite.tolist()
                out = FiniteRows(rows[finite], [i for i, ok in enumerate(flags) if ok], f_left,
                                 [i for i, ok in enumerate(flags) if not ok])
    return out


def apply_rule(rule: str, rows: torch.Tensor, f: int, *, pipeline: "str | Pipeline | None" = None,
               step: int = 0, seed: int = 0, **params) -> torch.Tensor:
    """The last stage: the pipeline's stages, then the rule, on ``rows`` with ``f``."""
    pipe = Pipeline.parse(pipeline)
    if rows.device.type != "cpu" and rule in _CPU_FALLBACK:
        return _on_cpu(rule, rows, f, pipe, step, seed, params)
    try:
        return robust_aggregate(rule, rows, f, pipe, step=step, seed=seed, **params)
    except (RuntimeError, NotImplementedError) as exc:
        if rows.device.type == "cpu" or isinstance(exc, ByzSGDError):
            raise
        # a rule (or stage) that cannot run on this device: the CPU from now on, said once
        _CPU_FALLBACK.add(rule)
        log.warning("rule %s failed on %s (%s: %s); it aggregates on the CPU from now on (a "
                    "device -> host -> device round trip per aggregation)", rule, rows.device,
                    type(exc).__name__, str(exc)[:200])
        return _on_cpu(rule, rows, f, pipe, step, seed, params)


def aggregate_finite(rule: str, rows: torch.Tensor, f: int, *, drop_nonfinite: bool = True,
                     pipeline: "str | Pipeline | None" = None, step: int = 0, seed: int = 0,
                     **params) -> tuple[torch.Tensor, list[int]]:
    """(aggregate, indices of the non-finite rows left out): :func:`finite_rows`, then
    :func:`apply_rule`."""
    kept = finite_rows(rule, rows, f, pipeline, drop_nonfinite=drop_nonfinite)
    return apply_rule(rule, kept.rows, kept.f, pipeline=pipeline, step=step, seed=seed,
                      **params), kept.dropped


#: rules that failed on a device in this process: they run on the CPU (see aggregate_finite)
_CPU_FALLBACK: set[str] = set()


def _on_cpu(rule, rows, f, pipe, step, seed, params) -> torch.Tensor:
    out = robust_aggregate(rule, rows.cpu(), f, pipe, step=step, seed=seed, **params)
    return out.to(rows.device)
