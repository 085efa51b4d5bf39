"""Where tensors meet bytes: the dtype table and tensor <-> (dtype, shape, nbytes) metadata.

The wire names dtypes by a short, fixed string (never by ``str(torch.dtype)`` round trips, never
by anything a peer can make us import or evaluate).  Sending exposes the tensor's *own* memory as
a ``memoryview`` (no ``tobytes()``, no copy); receiving builds a tensor over a pooled buffer with
``torch.frombuffer`` (no copy).
"""
from __future__ import annotations

import math

import torch

__all__ = ["DTYPE_TO_NAME", "NAME_TO_DTYPE", "ALIGN", "align", "tensor_view", "tensor_bytes",
           "from_buffer", "MAX_NDIM"]

#: wire name <-> torch dtype.  Adding a dtype here does not allow it: FrameLimits does that.
DTYPE_TO_NAME: dict[torch.dtype, str] = {
    torch.float32: "f4",
    torch.float64: "f8",
    torch.float16: "f2",
    torch.bfloat16: "bf2",
    torch.int64: "i8",
    torch.int32: "i4",
    torch.int16: "i2",
    torch.int8: "i1",
    torch.uint8: "u1",
    torch.bool: "b1",
}
NAME_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_NAME.items()}
_NUMPY_OK = frozenset(DTYPE_TO_NAME) - {torch.bfloat16}
ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty(0, dtype=d).element_size() for d in DTYPE_TO_NAME}

#: tensors start at multiples of ALIGN inside a frame body, so every received view is aligned
#: for its dtype (and for vectorised kernels).
ALIGN = 64
MAX_NDIM = 16


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * ITEMSIZE[t.dtype]


def tensor_view(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's own storage (zero-copy).

    The caller keeps ``t`` alive and unmodified while the view is in use."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype in _NUMPY_OK and t.dim() == 1:
        return memoryview(t.numpy()).cast("B")  # fast path: no torch view ops
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def from_buffer(buf, offset: int, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """A tensor over ``buf[offset:offset+nbytes]`` (zero-copy; shares memory with ``buf``)."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    count = nbytes // ITEMSIZE[dtype]
    t = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    if len(shape) == 1:
        return t
    return t.view(shape)


def numel(shape) -> int:
    return math.prod(shape)
