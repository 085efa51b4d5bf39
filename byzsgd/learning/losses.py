"""The losses a run may name (``--loss``), by forgiving spellings."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from byzsgd.errors import UnknownNameError

__all__ = ["build_loss", "loss_names"]

_LOSSES: dict[str, Callable[[], nn.Module]] = {
    "nll": nn.NLLLoss,
    "cross-entropy": nn.CrossEntropyLoss,
}
_LOSS_ALIASES = {
    "nll": "nll", "nllloss": "nll", "nll-loss": "nll",
    "cross-entropy": "cross-entropy", "crossentropy": "cross-entropy",
    "crossentropyloss": "cross-entropy", "cross-entropy-loss": "cross-entropy", "ce": "cross-entropy",
}


def loss_names() -> list[str]:
    return sorted(_LOSSES)


def build_loss(name: str) -> nn.Module:
    """``nll`` (for log-probability outputs, e.g. ``convnet``) or ``cross-entropy`` (logits).

    Spellings are forgiving: case, ``_`` for ``-``, ``NLLLoss``, ``CrossEntropyLoss``, ``ce``."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in _LOSS_ALIASES:
        raise UnknownNameError("loss", str(name), loss_names())
    return _LOSSES[_LOSS_ALIASES[key]]()
