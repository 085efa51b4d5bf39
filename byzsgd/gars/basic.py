"""The plain average: the non-robust baseline."""
from __future__ import annotations

import torch

from byzsgd.gars.registry import register


@register("average", min_inputs=lambda f: 1,
          condition="n >= 1 (no resilience: accepted for any f as the undefended baseline)",
          reference="Arithmetic mean (plain synchronous SGD; Blanchard et al. 2017 show one input controls it)")
def average(vectors: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise arithmetic mean of the n inputs.

    Not robust: one Byzantine input moves it anywhere (Blanchard et al., NeurIPS 2017,
    Lemma 1).  The registry still accepts it for any f, so that runs can show what an
    attack does to an undefended system; its bound is n >= 1.  NaN/Inf propagate: a NaN in
    any input makes that coordinate NaN; +inf and -inf together give NaN.
    """
    return vectors.mean(dim=0)
