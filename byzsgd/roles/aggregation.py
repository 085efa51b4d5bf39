"""How a role applies a rule to what a quorum delivered, NaN/Inf rows included.

A correct node never sends NaN or Inf while its model is finite, so such a row is
Byzantine: it is left out and the rule tolerates that many fewer Byzantine rows among the
rest (``f - k`` of ``n - k``; every registered bound grows by at least one input per
tolerated Byzantine one, and the bound is checked anyway).  Left in, a NaN sits at an
extreme of every coordinate and still biases a median by one order statistic.  When every
row is non-finite (the model itself diverged) the rule gets them all, so the run goes on and
shows the divergence instead of waiting for a finite input that will never come.

With a pre-aggregation ``pipeline`` (``--pre_agg``) the rows left after that go through
``prepare`` (the PS's per-worker momentum: it sees which input rows they are), then the
pipeline's stages in order, then the rule: :func:`byzsgd.gars.pipeline.robust_aggregate`;
the bound checked before dropping is then the whole pipeline's.
"""
from __future__ import annotations

from typing import Callable

import torch

import logging

from byzsgd.errors import ByzSGDError, ResilienceError
from byzsgd.gars.pipeline import Pipeline, robust_aggregate

log = logging.getLogger("byzsgd.aggregation")


def aggregate_finite(rule: str, rows: torch.Tensor, f: int, *, drop_nonfinite: bool = True,
                     pipeline: "str | Pipeline | None" = None, step: int = 0, seed: int = 0,
                     prepare: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
                     **params) -> tuple[torch.Tensor, list[int]]:
    """(aggregate, indices of the non-finite rows left out).

    ``prepare(kept, rows)``, if given, maps the rows that stay (``kept``: their indices in
    ``rows``) to what the pipeline and the rule receive (same shape)."""
    pipe = Pipeline.parse(pipeline)
    n = rows.shape[0]
    kept, f_used, dropped = list(range(n)), f, []
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
                dropped = [i for i, ok in enumerate(finite.tolist()) if not ok]
                kept = [i for i, ok in enumerate(finite.tolist()) if ok]
                rows, f_used = rows[finite], f_left
    if prepare is not None:
        rows = prepare(kept, rows)
    if rows.device.type != "cpu" and rule in _CPU_FALLBACK:
        return _on_cpu(rule, rows, f_used, pipe, step, seed, params), dropped
    try:
        return robust_aggregate(rule, rows, f_used, pipe, step=step, seed=seed, **params), dropped
    except (RuntimeError, NotImplementedError) as exc:
        if rows.device.type == "cpu" or isinstance(exc, ByzSGDError):
            raise
        # a rule (or stage) that cannot run on this device: the CPU from now on, said once
        _CPU_FALLBACK.add(rule)
        log.warning("rule %s failed on %s (%s: %s); it aggregates on the CPU from now on (a "
                    "device -> host -> device round trip per aggregation)", rule, rows.device,
                    type(exc).__name__, str(exc)[:200])
        return _on_cpu(rule, rows, f_used, pipe, step, seed, params), dropped


#: rules that failed on a device in this process: they run on the CPU (see aggregate_finite)
_CPU_FALLBACK: set[str] = set()


def _on_cpu(rule, rows, f, pipe, step, seed, params) -> torch.Tensor:
    out = robust_aggregate(rule, rows.cpu(), f, pipe, step=step, seed=seed, **params)
    return out.to(rows.device)
