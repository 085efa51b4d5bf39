"""How a role applies a rule to what a quorum delivered, NaN/Inf rows included.

A correct node never sends NaN or Inf while its model is finite, so such a row is
Byzantine: it is left out and the rule tolerates that many fewer Byzantine rows among the
rest (``f - k`` of ``n - k``; every registered bound grows by at least one input per
tolerated Byzantine one, and the bound is checked anyway).  Left in, a NaN sits at an
extreme of every coordinate and still biases a median by one order statistic.  When every
row is non-finite (the model itself diverged) the rule gets them all, so the run goes on and
shows the divergence instead of waiting for a finite input that will never come.
"""
from __future__ import annotations

import torch

from byzsgd import gars
from byzsgd.errors import ResilienceError


def aggregate_finite(rule: str, rows: torch.Tensor, f: int, *, drop_nonfinite: bool = True,
                     **params) -> tuple[torch.Tensor, list[int]]:
    """(aggregate, indices of the non-finite rows left out)."""
    if drop_nonfinite:
        finite = torch.isfinite(rows).all(dim=1)
        k = int(rows.shape[0] - int(finite.sum()))
        if 0 < k < rows.shape[0]:
            kept = rows[finite]
            f_left = max(0, f - k)
            try:
                gars.check(rule, kept.shape[0], f_left)
            except ResilienceError:
                pass  # too few rows left for the rule: give it everything
            else:
                dropped = [i for i, ok in enumerate(finite.tolist()) if not ok]
                return gars.aggregate(rule, kept, f_left, **params), dropped
    return gars.aggregate(rule, rows, f, **params), []
