"""The optimizers a run may name (``--optimizer``, ``--opt_args``): their hyper-parameters parsed
and checked against the constructor's, and the optimizer a PS steps its flat state with
(:class:`~byzsgd.learning.flat_sgd.FlatSGD` for ``sgd``).
"""
from __future__ import annotations

import ast
import inspect
import json
import math
from typing import Any, Iterable, Mapping, Union

import torch
import torch.nn as nn

from byzsgd.errors import ConfigError, UnknownNameError
from byzsgd.learning.flat_state import FlatState

__all__ = ["build_optimizer", "build_flat_optimizer", "steps_flat", "optimizer_names", "parse_opt_args"]

_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
# keys of the constructors that are not numeric/boolean hyper-parameters a CLI should set
_INTERNAL_KEYS = {"params", "foreach", "fused", "differentiable", "capturable"}


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def _optimizer_keys(cls) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self",) and k not in _INTERNAL_KEYS
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_number(key: str, value: Any, opt: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"optimizer {opt!r}: {key} must be a number, got {value!r}")
    try:
        out = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"optimizer {opt!r}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"optimizer {opt!r}: {key} must be finite, got {value!r}")
    return out


def _convert(opt: str, key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"optimizer {opt!r}: {key} must be a boolean (true/false), got {value!r}")
    if isinstance(default, tuple):
        seq = value
        if isinstance(value, str):
            text = value.strip()
            try:
                seq = ast.literal_eval(text if text[:1] in "([" else f"({text},)")
            except (ValueError, SyntaxError):
                raise ConfigError(f"optimizer {opt!r}: {key} must be a pair like "
                                  f"'0.9,0.999', got {value!r}") from None
        if not isinstance(seq, (list, tuple)) or len(seq) != len(default):
            raise ConfigError(f"optimizer {opt!r}: {key} must have {len(default)} numbers, "
                              f"got {value!r}")
        return tuple(_to_number(key, v, opt) for v in seq)
    # numeric defaults are often written as ints (SGD's momentum=0): every numeric key is a float
    if default is None and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE - {"0", "1"}:
        return value.strip().lower() in _TRUE
    return _to_number(key, value, opt)  # float (lr may also be a Tensor in torch; we use floats)


def parse_opt_args(name: str, opt_args: Union[None, str, Mapping[str, Any]]) -> dict[str, Any]:
    """Validated keyword arguments for optimizer ``name``.

    ``opt_args``: a dict or a JSON object string (Garfield's ``--opt_args
    '{"lr":"0.1","momentum":"0.9"}'``); values may be strings ("0.1", "1e-3", "true", "0.9,0.999").
    Unknown keys raise a :class:`ConfigError` listing the accepted ones."""
    key = str(name).strip().lower()
    if key not in _OPTIMIZERS:
        raise UnknownNameError("optimizer", str(name), optimizer_names())
    if opt_args is None:
        return {}
    if isinstance(opt_args, str):
        text = opt_args.strip()
        if not text:
            return {}
        try:
            opt_args = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"opt_args is not a JSON object: {exc}: {text!r}") from None
    if not isinstance(opt_args, Mapping):
        raise ConfigError(f"opt_args must be a JSON object / dict, got {type(opt_args).__name__}")
    accepted = _optimizer_keys(_OPTIMIZERS[key])
    out = {}
    for k, v in opt_args.items():
        k = str(k).strip()
        if k not in accepted:
            raise ConfigError(f"optimizer {key!r} does not accept {k!r}; accepted keys: "
                              f"{', '.join(sorted(accepted))}")
        out[k] = _convert(key, k, v, accepted[k])
    return out


def build_optimizer(name: str, params: Iterable, opt_args=None) -> torch.optim.Optimizer:
    """``sgd``, ``adam``, ``adamw``, ``rmsprop`` or ``adagrad`` over ``params`` (parameters or a
    module), with :func:`parse_opt_args`-checked arguments."""
    kwargs = parse_opt_args(name, opt_args)
    if isinstance(params, nn.Module):
        params = params.parameters()
    try:
        return _OPTIMIZERS[str(name).strip().lower()](params, **kwargs)
    except ValueError as exc:  # torch's own range checks ("Invalid learning rate: -1")
        raise ConfigError(f"optimizer {name!r} with {kwargs}: {exc}") from None


def steps_flat(name: str) -> bool:
    """Whether a PS steps optimizer ``name`` as :class:`~byzsgd.learning.flat_sgd.FlatSGD`
    (``sgd``) rather than with torch.optim (whose first step imports torch._dynamo)."""
    return str(name).strip().lower() == "sgd"


def check_optimizer_args(name: str, opt_args=None) -> None:
    """Refuse (:class:`ConfigError`) what :func:`build_flat_optimizer` would refuse, without a
    model.  For ``sgd`` no torch.optim object is built: its constructor imports torch._dynamo
    (~80 MB of heap), which a launcher that forks its nodes would hand to every one of them."""
    if steps_flat(name):
        from byzsgd.learning.flat_sgd import FlatSGD

        FlatSGD(None, **parse_opt_args(name, opt_args))
        return
    build_optimizer(name, [nn.Parameter(torch.zeros(1))], opt_args)


def build_flat_optimizer(name: str, flat: FlatState, opt_args=None):
    """The optimizer a PS steps ``flat`` with: ``sgd`` is :class:`~byzsgd.learning.flat_sgd.FlatSGD`
    (torch.optim.SGD's update on the flat vector, without importing torch._dynamo); the others
    are :func:`build_optimizer`'s torch.optim ones over ``flat.model``."""
    kwargs = parse_opt_args(name, opt_args)
    if steps_flat(name):
        from byzsgd.learning.flat_sgd import FlatSGD

        return FlatSGD(flat, **kwargs)
    return build_optimizer(name, flat.model, opt_args)
