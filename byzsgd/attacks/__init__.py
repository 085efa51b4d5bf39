"""Worker-side attacks: pure functions of what a Byzantine node can see.

Public API::

    forge(name, honest, f, **params) -> Tensor[f, d]   # honest: Tensor[k, d]

``honest`` is what the Byzantine node knows: its own gradient(s) when acting alone, or the
step's honest gradients when colluding (the omniscient adversary).  Modules: simple,
statistical (ALIE, IPM), optimal (factor searched against the defence), adaptive (Min-Max,
Min-Sum), fang (Fang et al.'s trimmed-mean/median attack), defence (the simulated PS
aggregation the searches maximise against), momentum_aware (the gradient that puts a forged
row into the PS's per-worker momentum).
"""
from __future__ import annotations

import torch

from byzsgd.attacks import registry
from byzsgd.attacks.registry import Attack, get, names
from byzsgd.errors import ConfigError

from byzsgd.attacks import simple, statistical, optimal  # noqa: F401,E402
from byzsgd.attacks import defence, adaptive, fang, momentum_aware  # noqa: F401,E402

__all__ = ["forge", "get", "names", "Attack"]


def forge(name: str, honest: torch.Tensor, f: int, **params) -> torch.Tensor:
    """Return the ``f`` vectors [f, d] that attack ``name`` sends, given ``honest`` [k, d]."""
    attack = get(name)
    if not isinstance(honest, torch.Tensor) or honest.dim() != 2 or honest.shape[0] < 1:
        raise ConfigError(f"attack {name!r}: honest must be a 2-D tensor [k>=1, d], got "
                          f"{getattr(honest, 'shape', type(honest))}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise ConfigError(f"attack {name!r}: f must be an int >= 1, got {f!r}")
    return attack.fn(honest, f, **params)
