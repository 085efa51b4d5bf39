"""SGD on a model's one flat parameter vector: torch.optim.SGD's update, without torch.optim.

Why not ``torch.optim.SGD``: its first ``step()`` imports ``torch._dynamo`` (sympy, triton:
~80 MB of heap and 2-9 s of CPU in every process that steps, i.e. every PS).  A PS's
parameters and gradient are already one flat vector each (:class:`~byzsgd.learning.flat_state.FlatState`),
so the whole update is five element-wise ops on one tensor.

The update is torch.optim.SGD's single-tensor one, term for term (``maximize``, ``weight_decay``,
``momentum`` with ``dampening``, ``nesterov``; the buffer is the gradient itself at the first
step), and :meth:`FlatSGD.state_dict` / :meth:`FlatSGD.load_state_dict` read and write
torch.optim.SGD's format (one ``momentum_buffer`` per parameter): a checkpoint written with
either loads into the other.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from byzsgd.errors import ConfigError

#: torch.optim.SGD's hyper-parameters and their defaults (torch 2.x)
DEFAULTS: dict[str, Any] = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                            "nesterov": False, "maximize": False}
#: keys torch.optim.SGD's state_dict carries that a flat update has no use for
_TORCH_ONLY = {"foreach": None, "differentiable": False, "fused": None}


class FlatSGD:
    """SGD over ``flat`` (a :class:`~byzsgd.learning.flat_state.FlatState`): steps ``flat.params``
    with ``flat.grad``.  Keyword arguments and their checks are torch.optim.SGD's."""

    def __init__(self, flat, **hyper: Any):
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"optimizer 'sgd' does not accept {sorted(unknown)}; accepted keys: "
                              f"{', '.join(sorted(DEFAULTS))}")
        group = dict(DEFAULTS, **hyper)
        _check(group)
        self.flat = flat
        self.param_groups = [group]  # one group: what a learning-rate schedule edits
        self.momentum_buffer: torch.Tensor | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return dict(DEFAULTS)

    @torch.no_grad()
    def step(self) -> None:
        """``params -= lr * d``, ``d`` torch.optim.SGD's direction for ``flat.grad``."""
        g = self.param_groups[0]
        params, grad = self.flat.params, self.flat.grad
        if g["maximize"]:
            grad = -grad
        if g["weight_decay"] != 0:
            grad = grad.add(params, alpha=g["weight_decay"])
        if g["momentum"] != 0:
            buf = self.momentum_buffer
            if buf is None:
                buf = self.momentum_buffer = grad.clone()
            else:
                buf.mul_(g["momentum"]).add_(grad, alpha=1 - g["dampening"])
            grad = grad.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        params.add_(grad, alpha=-g["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - torch's signature
        """The next :meth:`~byzsgd.learning.flat_state.FlatState.load_grad` overwrites the gradient;
        zeroing keeps the views the model's ``.grad`` points at."""
        self.flat.grad.zero_()

    # -- torch.optim.SGD's state_dict format ---------------------------------------------
    def _param_slices(self):
        return [(off, n, shape) for kind, _, off, n, shape in self.flat.layout if kind == "param"]

    def state_dict(self) -> dict:
        """``{"state": {i: {"momentum_buffer": T}}, "param_groups": [{..., "params": [0..k-1]}]}``,
        as torch.optim.SGD writes it (no state before the first step with momentum)."""
        slices = self._param_slices()
        state = {}
        if self.momentum_buffer is not None:
            state = {i: {"momentum_buffer": self.momentum_buffer[off:off + n].clone().view(shape)}
                     for i, (off, n, shape) in enumerate(slices)}
        group = dict(self.param_groups[0], **_TORCH_ONLY, params=list(range(len(slices))))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a state_dict of torch.optim.SGD or of this class over the same model; raises
        ``ValueError`` (as torch does) when it does not fit."""
        groups = state_dict.get("param_groups")
        slices = self._param_slices()
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError(f"expected one parameter group, got {groups!r:.80}")
        saved = groups[0]
        if list(saved.get("params", ())) != list(range(len(slices))):
            raise ValueError(f"the state dict has {len(saved.get('params', ()))} parameters, "
                             f"this model {len(slices)}")
        group = {k: copy.deepcopy(saved.get(k, v)) for k, v in DEFAULTS.items()}
        try:
            _check(group)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        state = state_dict.get("state") or {}
        # torch writes {"momentum_buffer": None} per parameter where it kept no buffer
        if all(isinstance(e, Mapping) and e.get("momentum_buffer") is None for e in state.values()):
            state = {}
        buf = None
        if state:
            params = self.flat.params
            buf = torch.empty_like(params)
            for i, (off, n, shape) in enumerate(slices):
                entry = state.get(i, state.get(str(i)))
                t = None if entry is None else entry.get("momentum_buffer")
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"parameter {i}: momentum_buffer of shape "
                                     f"{getattr(t, 'shape', None)}, expected {tuple(shape)}")
                buf[off:off + n].copy_(t.reshape(-1))
        self.param_groups = [group]
        self.momentum_buffer = buf


def _check(group: Mapping[str, Any]) -> None:
    """torch.optim.SGD's own checks, as :class:`ConfigError` (also for a checkpoint's values that
    are not numbers, which torch would only trip over at the first step)."""
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        if isinstance(group[key], bool) or not isinstance(group[key], (int, float)):
            raise ConfigError(f"optimizer 'sgd': {key} must be a number, got {group[key]!r:.40}")
    for key in ("nesterov", "maximize"):
        if not isinstance(group[key], bool):
            raise ConfigError(f"optimizer 'sgd': {key} must be a boolean, got {group[key]!r:.40}")
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    if lr < 0:
        raise ConfigError(f"optimizer 'sgd': invalid learning rate: {lr}")
    if momentum < 0:
        raise ConfigError(f"optimizer 'sgd': invalid momentum value: {momentum}")
    if wd < 0:
        raise ConfigError(f"optimizer 'sgd': invalid weight_decay value: {wd}")
    if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
        raise ConfigError("optimizer 'sgd': nesterov momentum requires a momentum and zero dampening")
