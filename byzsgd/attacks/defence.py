"""Defence-aware search: the aggregation the target PS runs, simulated by the attacker.

Why: a factor-tuned attack is only as strong as the objective it maximises.  Searched against
the rule alone, ``optimal_alie``'s z ignores what the PS does before the rule (``--pre_agg``,
e.g. NNM mixes every row with its nearest neighbours, which drags a lone outlier back) and
the factor that best moves ``median(rows)`` may barely move ``median(nnm(rows))``.  Every
factor-tuned attack (``optimal_alie``, ``optimal_ipm``, ``minmax`` / ``minsum`` with
``search: "defence"``) therefore simulates the **deployed** aggregation::

    robust_aggregate(gar, rows, gar_f, pipeline)   # byzsgd.gars.pipeline: stages, then the rule

with ``rows`` the honest rows the attacker knows (cycled or truncated to ``n - f`` rows) plus
``f`` copies of the candidate, and maximises ``||aggregate - mu||``, ``mu`` the mean of the
honest rows.  With worker momentum at the PS the caller passes the honest **momentum** rows
(:class:`byzsgd.attacks.momentum_aware.MomentumAwareAttacker`): the search then runs on what
the rule really sees.  ``pipeline`` is a ``--pre_agg`` spec (``None`` / ``"none"``: the rule
alone, exactly the previous behaviour).  A ``bucketing`` stage is simulated with the
permutation of ``seed`` 0, step 0 (the attacker does not know the PS's per-step draw).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from byzsgd.errors import ConfigError

__all__ = ["simulator"]


def simulator(honest: torch.Tensor, f: int, *, gar: str | None, gar_f: int | None = None,
              n: int | None = None, gar_params: dict | None = None, pipeline=None,
              name: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], float]]:
    """``(mu, distance)``: ``distance(candidate)`` is ``||aggregate - mu||`` (float64) when the
    f Byzantine inputs all send ``candidate`` [d]; ``inf`` for a non-finite aggregate (an
    infinitely successful attack).  The configuration is refused first, as the PS would
    refuse it (ResilienceError below a stage's or the rule's bound)."""
    if not isinstance(gar, str):
        raise ConfigError(f"attack {name!r} needs gar=<aggregation rule name>, got {gar!r}")
    from byzsgd import gars  # imported lazily: attacks stay importable on their own
    from byzsgd.gars.pipeline import Pipeline

    k = honest.shape[0]
    total = k + f if n is None else n
    if isinstance(total, bool) or not isinstance(total, int) or total < f + 1:
        raise ConfigError(f"attack {name!r}: n must be an int >= f + 1 = {f + 1}, got {n!r}")
    rule_f = f if gar_f is None else gar_f
    pipe = Pipeline.parse(pipeline)
    if pipe:
        pipe.check(gar, total, rule_f)  # every stage, then the rule at what the stages output
        rule_f_out = pipe.output(total, rule_f)[1]
    else:
        gars.check(gar, total, rule_f)  # refuse a configuration the target itself would refuse
    reps = torch.arange(total - f, device=honest.device) % k
    base = honest[reps]
    mu = honest.mean(dim=0)
    params = dict(gar_params or {})

    def distance(candidate: torch.Tensor) -> float:
        inputs = torch.cat([base, candidate.to(base.dtype).unsqueeze(0).expand(f, -1)], dim=0)
        if pipe:
            out = gars.aggregate(gar, pipe(inputs, rule_f, step=0, seed=0), rule_f_out, **params)
        else:
            out = gars.aggregate(gar, inputs, rule_f, **params)
        v = float((out.double() - mu.double()).norm())
        return v if math.isfinite(v) else math.inf

    return mu, distance
