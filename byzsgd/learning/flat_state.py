"""The flat-vector view of a model that PSes and workers exchange (``FlatState``).

One preallocated float32 buffer ``flat`` of length ``state_size = num_params + num_buffers``::

    flat = [ p_0 | p_1 | ... | p_{k-1} | b_0 | ... | b_{m-1} ]
             \\______ num_params ______/ \\____ num_buffers ___/

* ``p_i``: every parameter, in ``model.named_parameters()`` order, flattened (row-major);
* ``b_j``: every *floating-point* buffer (BatchNorm ``running_mean`` / ``running_var``), in
  ``model.named_buffers()`` order.  Integer buffers (BatchNorm ``num_batches_tracked``) are
  left out: they only count steps (used only when BatchNorm's momentum is None).

The parameters' ``.data`` and the floating buffers *are views into* ``flat``: loading a whole
model is one ``flat.copy_(vec)``, and reading it costs nothing.  Gradients use a second buffer
``grad`` of length ``num_params`` whose layout is the *prefix* of ``flat``'s (parameters only):
``p.grad`` are views into it, so ``backward()`` accumulates straight into it and an optimizer
stepping on the model reads an aggregated gradient loaded with one ``grad.copy_(g)``.

So a PS aggregates *models* over ``state_vector`` (length ``state_size``, BN statistics
included) and *gradients* over ``grad_vector`` (length ``num_params``).  Buffers get no gradient:
a model without BatchNorm has ``state_size == num_params``.  BatchNorm statistics are only
updated by forward passes in training mode, i.e. on workers: a worker that wants its PS to track
them can send ``flat_state(model).buffers`` (``flat[num_params:]``) after ``compute_gradient``.

Caveats: build the ``FlatState`` *after* moving the model to its device / dtype
(``model.to(...)`` replaces ``.data`` and detaches the views; ``flat_state(model)`` notices and
rebuilds).  ``optimizer.zero_grad()`` (set_to_none) drops the grad views: ``compute_gradient`` and
``load_grad_vector`` reattach them, so use those.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from byzsgd.errors import ConfigError

__all__ = [
    "FlatState", "flat_state", "state_vector", "load_state_vector", "grad_vector",
    "load_grad_vector", "num_parameters", "state_size", "compute_gradient",
]


class FlatState:
    """Parameters and floating buffers of ``model`` as views into one flat buffer.

    Attributes: ``flat`` (state vector, ``state_size``), ``params`` (``flat[:num_params]``),
    ``buffers`` (``flat[num_params:]``), ``grad`` (``num_params``), ``layout`` (list of
    ``(kind, name, offset, numel, shape)``, kind ``"param"`` or ``"buffer"``)."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = [(n, p) for n, p in model.named_parameters()]
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        tensors = [t for _, t in params] + [t for _, t in buffers]
        if not tensors:
            raise ConfigError("model has no parameters")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ConfigError(f"FlatState needs one dtype and one device, got {dtypes} / {devices}")
        dtype, device = dtypes.pop(), devices.pop()
        self.num_params = sum(p.numel() for _, p in params)
        self.num_buffers = sum(b.numel() for _, b in buffers)
        self.state_size = self.num_params + self.num_buffers
        self.flat = torch.empty(self.state_size, dtype=dtype, device=device)
        self.grad = torch.zeros(self.num_params, dtype=dtype, device=device)
        self.params = self.flat[:self.num_params]
        self.buffers = self.flat[self.num_params:]
        self.layout: list[tuple[str, str, int, int, tuple]] = []
        self._param_objs: list[nn.Parameter] = []
        self._param_ptrs: list[int] = []
        self._buffer_slots: list[tuple[dict, str]] = []
        self._buffer_ptrs: list[int] = []
        self._grad_views: list[Tensor] = []
        off = 0
        with torch.no_grad():
            for name, p in params:
                n = p.numel()
                view = self.flat[off:off + n].view_as(p)
                view.copy_(p.data)
                p.data = view
                self._param_objs.append(p)
                self._param_ptrs.append(view.data_ptr())
                self._grad_views.append(self.grad[off:off + n].view_as(p))
                self.layout.append(("param", name, off, n, tuple(p.shape)))
                off += n
            for name, b in buffers:
                n = b.numel()
                view = self.flat[off:off + n].view_as(b)
                view.copy_(b)
                mod_name, _, attr = name.rpartition(".")
                module = model.get_submodule(mod_name) if mod_name else model
                module._buffers[attr] = view
                self._buffer_slots.append((module._buffers, attr))
                self._buffer_ptrs.append(view.data_ptr())
                self.layout.append(("buffer", name, off, n, tuple(b.shape)))
                off += n
        self.attach_grads()

    # -- consistency
    def is_attached(self) -> bool:
        """Whether the model's parameters and floating buffers are still views of ``flat``
        (cheap: compares the recorded data pointers; ``model.to(...)`` breaks them)."""
        for p, ptr in zip(self._param_objs, self._param_ptrs):
            if p.data_ptr() != ptr:
                return False
        for (bufs, attr), ptr in zip(self._buffer_slots, self._buffer_ptrs):
            b = bufs.get(attr)
            if b is None or b.data_ptr() != ptr:
                return False
        return True

    def attach_grads(self) -> None:
        """Make every ``p.grad`` the view of ``grad`` (after ``zero_grad(set_to_none=True)``)."""
        for p, g in zip(self._param_objs, self._grad_views):
            if p.grad is not g:
                p.grad = g

    # -- vectors
    def load(self, vec: Tensor) -> None:
        """Load a state vector (params + floating buffers) into the model: one copy."""
        _check_vec(vec, self.state_size, "state vector")
        with torch.no_grad():
            self.flat.copy_(vec)

    def load_grad(self, vec: Tensor) -> None:
        """Load a gradient (params only) into every ``p.grad``: one copy."""
        _check_vec(vec, self.num_params, "gradient vector")
        self.attach_grads()
        with torch.no_grad():
            self.grad.copy_(vec)

    def sync_grads(self) -> Tensor:
        """Make ``grad`` hold every ``p.grad`` (copies any that autograd did not write in place;
        a parameter without gradient counts as zero) and return it."""
        with torch.no_grad():
            for p, g in zip(self._param_objs, self._grad_views):
                if p.grad is None:
                    g.zero_()
                    p.grad = g
                elif p.grad is not g and p.grad.data_ptr() != g.data_ptr():
                    g.copy_(p.grad)
                    p.grad = g
        return self.grad


def _check_vec(vec: Tensor, size: int, what: str) -> None:
    if not isinstance(vec, Tensor):
        raise TypeError(f"{what} must be a Tensor, got {type(vec).__name__}")
    if vec.dim() != 1 or vec.numel() != size:
        raise ValueError(f"{what} must have shape [{size}], got {list(vec.shape)}")


def flat_state(model: nn.Module) -> FlatState:
    """The model's :class:`FlatState`, created on first use (and rebuilt if the model was moved)."""
    fs = model.__dict__.get("_byzsgd_flat")
    if fs is None or not fs.is_attached():
        fs = FlatState(model)
        model.__dict__["_byzsgd_flat"] = fs  # plain attribute: not a submodule, not in state_dict
    return fs


def state_vector(model: nn.Module, *, copy: bool = False) -> Tensor:
    """The model as one vector [params | floating buffers].  Live view unless ``copy``."""
    v = flat_state(model).flat
    return v.clone() if copy else v


def load_state_vector(model: nn.Module, vec: Tensor) -> None:
    flat_state(model).load(vec)


def grad_vector(model: nn.Module, *, copy: bool = False) -> Tensor:
    """The parameters' gradients as one vector (layout = prefix of the state vector)."""
    v = flat_state(model).sync_grads()
    return v.clone() if copy else v


def load_grad_vector(model: nn.Module, vec: Tensor) -> None:
    flat_state(model).load_grad(vec)


def num_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (the gradient vector's length)."""
    return sum(p.numel() for p in model.parameters())


def state_size(model: nn.Module) -> int:
    """Length of the state vector: parameters + floating buffers."""
    return num_parameters(model) + sum(b.numel() for b in model.buffers() if b.is_floating_point())


def compute_gradient(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                     x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Zero the gradients, forward ``x``, ``loss_fn(out, y)``, backward; returns the model's
    reusable gradient buffer (overwritten by the next call: send or copy it before) and the
    loss as a float.  The model's mode (train/eval) is left as it is."""
    fs = flat_state(model)
    fs.attach_grads()
    fs.grad.zero_()
    loss = loss_fn(model(x), y)
    loss.backward()
    return fs.sync_grads(), float(loss.detach())
