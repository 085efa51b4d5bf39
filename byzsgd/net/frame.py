"""Where a message is framed: limits, the ``Message`` type, encoding and header validation.

Wire layout of one frame (after the handshake)::

    prefix  : 12 bytes, little endian  <u32 header_len> <u64 body_len>
    header  : header_len bytes of msgpack: [kind, step, sender, [[dtype, [shape...], nbytes], ...], meta]
    body    : body_len bytes: the raw tensor bytes, each tensor starting at a multiple of 64

The prefix alone lets the receiver refuse an oversized header or body *before allocating
anything*; the header is decoded with msgpack's strict options (``raw=False``,
``strict_map_key=True``, small ``max_*_len``, no ext types) and then validated field by field
(type, dtype whitelist, ``prod(shape) * itemsize == nbytes``, layout adding up exactly to
``body_len``, registered kind and shapes, authenticated sender).  Only then is a body buffer taken
from the pool.  Nothing from a peer is ever pickled, evaluated or ``torch.load``-ed.

Sending never copies the tensor data of a large frame: ``encode`` returns the prefix+header bytes
and memoryviews over the tensors' own storage, for ``transport.writelines``; a small frame (at
most ``SMALL_FRAME`` bytes) is one joined ``bytes``.  The small-message hot path (docs/design.md
§9) adds, without changing a byte on the wire or skipping a check: header templates on the
sending side (``encode(templates=)``), the receiver's cache of validated headers
(:mod:`.hcache`, used by :class:`~.protocol.FrameReader`), and received messages that build
their tensors on first use (:class:`Message`).
"""
from __future__ import annotations

import ctypes
import math
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import msgpack
import torch

from . import errors
from .codec import ALIGN, DTYPE_TO_NAME, ITEMSIZE, MAX_NDIM, NAME_TO_DTYPE, align, from_buffer, tensor_view

__all__ = ["FrameLimits", "Message", "Header", "TensorSpec", "PREFIX", "encode", "parse_prefix",
           "decode_header", "SMALL_FRAME", "DEFAULT_DTYPES", "MAX_META_ITEMS", "MAX_STEP", "MAX_SEND_STEP"]

PREFIX = struct.Struct("<IQ")
MAX_META_ITEMS = 64
MAX_KIND_LEN = 64
# Steps: a received header's step must be in [0, MAX_STEP); a sent one in [0, MAX_SEND_STEP)
# (int64).  The gap of 2**62 is the headroom that lets a node do arithmetic on a received step
# (reply with step + 1, look k steps ahead) and always encode the result: no received frame can
# drive a correct node's send into an encoding error.  Windows around the receiver's own step are
# the roles' business.
MAX_STEP = 1 << 62
MAX_SEND_STEP = 1 << 63
_ZEROS = bytes(ALIGN)
_AMASK = ALIGN - 1
_PACK_PREFIX = PREFIX.pack
# ctypes.string_at is a Python wrapper around this foreign function; call it directly
_string_at = getattr(ctypes, "_string_at", ctypes.string_at)
_PSIZE = PREFIX.size
_TENSOR = torch.Tensor
#: frames up to this size are sent as one joined ``bytes`` and received into a fresh buffer
#: instead of a pooled one: for a few KB, a copy is cheaper than the bookkeeping it saves
SMALL_FRAME = 16 << 10
_TLS = threading.local()  # one reusable msgpack Packer per thread (Packer is not thread-safe)


def _packer() -> msgpack.Packer:
    try:
        return _TLS.packer
    except AttributeError:
        p = _TLS.packer = msgpack.Packer(use_bin_type=True)
        return p

DEFAULT_DTYPES = frozenset({
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.uint8, torch.bool,
})


@dataclass(frozen=True)
class FrameLimits:
    """Hard limits a node enforces on every frame it receives (and checks on frames it sends).

    ``max_frame_bytes`` bounds the body (the tensor bytes, alignment padding included);
    ``max_header_bytes`` bounds the msgpack header.  Derive the frame limit from the model with
    :meth:`for_model` so a Byzantine peer cannot make a node allocate more than a model's worth.
    """

    max_header_bytes: int = 65536
    max_frame_bytes: int = 64 << 20
    max_tensors: int = 8
    allowed_dtypes: frozenset = DEFAULT_DTYPES

    def __post_init__(self):
        if not (isinstance(self.max_header_bytes, int) and 64 <= self.max_header_bytes <= (1 << 24)):
            raise errors.ConfigError(f"max_header_bytes must be an int in [64, 16 MiB], got {self.max_header_bytes!r}")
        if not (isinstance(self.max_frame_bytes, int) and 0 <= self.max_frame_bytes < (1 << 48)):
            raise errors.ConfigError(f"max_frame_bytes must be a non-negative int, got {self.max_frame_bytes!r}")
        if not (isinstance(self.max_tensors, int) and 0 <= self.max_tensors <= 4096):
            raise errors.ConfigError(f"max_tensors must be an int in [0, 4096], got {self.max_tensors!r}")
        dts = frozenset(self.allowed_dtypes)
        unknown = [d for d in dts if d not in DTYPE_TO_NAME]
        if unknown:
            raise errors.ConfigError(f"dtypes not supported on the wire: {unknown}; supported: {list(DTYPE_TO_NAME)}")
        object.__setattr__(self, "allowed_dtypes", dts)

    @classmethod
    def for_model(cls, num_params: int, *, dtype: torch.dtype = torch.float32, max_tensors: int = 8,
                  slack: float = 0.25, max_header_bytes: int = 65536,
                  allowed_dtypes: frozenset = DEFAULT_DTYPES) -> "FrameLimits":
        """Limits for messages that carry at most about one model's worth of ``dtype`` values:
        ``num_params * itemsize * (1 + slack)`` plus alignment padding for ``max_tensors``."""
        if not isinstance(num_params, int) or num_params < 0:
            raise errors.ConfigError(f"num_params must be a non-negative int, got {num_params!r}")
        if dtype not in ITEMSIZE:
            raise errors.ConfigError(f"unsupported dtype {dtype}")
        if slack < 0:
            raise errors.ConfigError(f"slack must be >= 0, got {slack}")
        body = int(math.ceil(num_params * ITEMSIZE[dtype] * (1.0 + slack))) + ALIGN * (max_tensors + 1) + 4096
        return cls(max_header_bytes=max_header_bytes, max_frame_bytes=body, max_tensors=max_tensors,
                   allowed_dtypes=allowed_dtypes)


class Message:
    """One received (or locally delivered) message.

    ``sender`` is the *authenticated* rank of the connection it came on (the header's claim is
    checked against it).  For received messages ``tensors`` are zero-copy views into the
    frame's body: a pooled buffer for a large frame, a private copy for a small one.  A pooled
    buffer is owned by the message until :meth:`release` gives it back to the pool, after
    which the tensors may be overwritten by a later message at any time.  Clone what you keep
    (``t.clone()``) or keep the message unreleased while you use its tensors.  ``release`` is
    idempotent; a message never released is garbage-collected normally (its buffer is then
    simply not reused).

    A received message builds its tensors on the first read of ``tensors`` (every check of
    the header already passed; ``torch.frombuffer`` costs ~1-2 µs per tensor, the biggest
    single item of a small frame's receive path, and control messages are often never
    looked at); after ``release`` an unread message's ``tensors`` is ``[]``.
    """

    def __init__(self, kind: str, step: int, sender: int, tensors=None, meta=None, _buffer=None,
                 _release_to: Callable | None = None):
        self.kind, self.step, self.sender = kind, step, sender
        self._tensors = [] if tensors is None else tensors
        self.meta = {} if meta is None else meta
        self._specs = self._data = None
        self._buffer, self._release_to = _buffer, _release_to

    @property
    def tensors(self) -> list:
        t = self._tensors
        if t is None:  # a received message's first look: views over its body
            data, specs = self._data, self._specs
            t = self._tensors = [from_buffer(data, s.offset, s.dtype, s.shape, s.nbytes) for s in specs]
            self._data = self._specs = None
        return t

    @tensors.setter
    def tensors(self, value) -> None:
        self._tensors, self._data, self._specs = value, None, None

    def release(self) -> None:
        buf, fn = self._buffer, self._release_to
        self._buffer = self._release_to = None
        if buf is not None and fn is not None:
            self._tensors, self._data, self._specs = [], None, None
            fn(buf)

    @property
    def released(self) -> bool:
        return self._buffer is None

    @property
    def nbytes(self) -> int:
        if self._tensors is None:
            return sum(s.nbytes for s in self._specs)
        return sum(t.numel() * t.element_size() for t in self._tensors)

    def __repr__(self) -> str:
        n = len(self._specs) if self._tensors is None else len(self._tensors)
        return f"Message(kind={self.kind!r}, step={self.step}, sender={self.sender}, tensors={n}, meta={self.meta!r})"


class TensorSpec(NamedTuple):
    """Where one tensor of a validated header lies in the body (a tuple: cheap to build on the
    receive path, which builds one per tensor per frame)."""

    dtype: torch.dtype
    shape: tuple
    nbytes: int
    offset: int


class Header(NamedTuple):
    """A validated header (immutable)."""

    kind: str
    step: int
    sender: int
    specs: tuple
    meta: dict
    body_len: int


# ----------------------------------------------------------------------------------- encoding
def _check_meta(meta) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    if len(meta) > MAX_META_ITEMS:
        raise ValueError(f"meta has {len(meta)} items, at most {MAX_META_ITEMS}")
    for k, v in meta.items():
        if not isinstance(k, str):
            raise TypeError(f"meta keys must be str, got {k!r}")
        if not (v is None or isinstance(v, (bool, int, float, str, bytes))):
            raise TypeError(f"meta[{k!r}] must be a scalar, str or bytes, got {type(v).__name__}")
    return dict(meta)


def encode(kind: str, step: int, sender: int, tensors: Sequence[torch.Tensor] = (), meta=None,
           limits: FrameLimits | None = None, *, join_small: bool = True,
           templates: dict | None = None) -> tuple[list, int, list]:
    """Frame a message without copying tensor data (small frames excepted, below).

    Returns ``(buffers, total_bytes, keep)``: ``buffers`` is for ``transport.writelines`` (the
    prefix+header bytes, then memoryviews over the tensors' storage and padding), ``keep`` the
    tensors that must stay alive and unmodified until the write completes.  A frame of at most
    ``SMALL_FRAME`` bytes comes back as one ``bytes`` (a copy of a few KB costs less than a
    scatter-gather write of several pieces) and an empty ``keep``, unless ``join_small`` is
    False (tensors whose bytes are still being copied from a device: read at write time).  Raises ``TypeError``/
    ``ValueError``/:class:`errors.ProtocolError` for a message this node's limits would refuse.

    This runs once per message sent (twice per round trip), so the checks are written flat:
    no helper call per tensor.  ``templates``: a dict owned by the caller, always used with the
    same ``limits`` (a node's :class:`~.sending.Sender`): a small frame of one tensor and no
    meta whose (kind, sender, dtype, shape) was framed before reuses that header's bytes
    around a fresh step (the checks that depend on those four passed then; the step and the
    tensor's device, contiguity and negation bit are checked again), which skips the msgpack packing and
    most per-tensor checks; the bytes on the wire are identical.
    """
    if (templates is not None and meta is None and join_small and type(step) is int and type(kind) is str
            and 0 <= step < MAX_SEND_STEP and (type(tensors) is list or type(tensors) is tuple)
            and len(tensors) == 1):
        t = tensors[0]
        if type(t) is _TENSOR:
            tpl = templates.get((kind, sender, t.dtype, t.shape))
            if tpl is not None and t.is_cpu and t.is_contiguous() and not t.is_neg():
                kb, tail, nb = tpl
                sb = _packer().pack(step)
                hl = len(kb) + len(sb) + len(tail)
                return ([b"".join((_PACK_PREFIX(hl, nb), kb, sb, tail, _string_at(t.data_ptr(), nb)))],
                        _PSIZE + hl + nb, [])
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_LEN:
        raise ValueError(f"kind must be a non-empty str of at most {MAX_KIND_LEN} chars, got {kind!r}")
    if type(step) is not int or not 0 <= step < MAX_SEND_STEP:
        raise errors.BadStep(f"step must be an int in [0, 2**63), got {step!r}"[:120])
    meta_none = meta is None
    meta = {} if meta_none else _check_meta(meta)
    if type(tensors) is not list and type(tensors) is not tuple:
        tensors = list(tensors)
    if limits is not None:
        if len(tensors) > limits.max_tensors:
            raise errors.TooManyTensors(f"{len(tensors)} tensors, limit {limits.max_tensors}")
        allowed = limits.allowed_dtypes
    else:
        allowed = None
    specs = []
    keep = []
    off = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must be torch.Tensor, got {type(t).__name__}")
        if not t.is_cpu:
            raise ValueError(f"tensors must be on the CPU to be sent, got {t.device}; call .cpu()")
        dt = t.dtype
        name = DTYPE_TO_NAME.get(dt)
        if name is None:
            raise errors.BadDtype(f"dtype {dt} cannot be sent")
        if allowed is not None and dt not in allowed:
            raise errors.BadDtype(f"dtype {dt} not allowed")
        if not t.is_contiguous():
            t = t.contiguous()  # a copy, only for non-contiguous input
        if t.is_neg():  # a lazily negated view (a conjugate's .imag): its memory is not its value
            t = t.resolve_neg()
        keep.append(t)
        nb = t.numel() * ITEMSIZE[dt]
        specs.append([name, t.shape, nb])  # torch.Size packs as an array, like a list
        off = ((off + _AMASK) & ~_AMASK) + nb
    body_len = off
    if limits is not None and body_len > limits.max_frame_bytes:
        raise errors.FrameTooLarge(f"body of {body_len} bytes, limit {limits.max_frame_bytes}")
    header = _packer().pack([kind, step, sender, specs, meta])
    if limits is not None and len(header) > limits.max_header_bytes:
        raise errors.HeaderTooLarge(f"header of {len(header)} bytes, limit {limits.max_header_bytes}")
    head = _PACK_PREFIX(len(header), body_len) + header
    total = len(head) + body_len
    if not keep:
        return [head], total, []
    if total <= SMALL_FRAME and join_small:
        # one bytes object, the tensors' bytes copied straight from their (contiguous, CPU,
        # checked above) memory: ``ctypes.string_at`` costs a third of ``t.numpy()``'s
        # memoryview, which is the single biggest item of a small frame's encoding
        parts = [head]
        off = 0
        for t, sp in zip(keep, specs):
            nb = sp[2]
            start = (off + _AMASK) & ~_AMASK
            if start > off:
                parts.append(_ZEROS[: start - off])
            if nb:
                parts.append(_string_at(t.data_ptr(), nb))
            off = start + nb
        if templates is not None and meta_none and len(keep) == 1 and keep[0] is tensors[0]:
            _remember(templates, kind, step, sender, tensors[0], specs, header, limits, total - len(head))
        return [b"".join(parts)], total, []
    views = [head]
    off = 0
    for t, sp in zip(keep, specs):
        nb = sp[2]
        start = (off + _AMASK) & ~_AMASK
        if start > off:
            views.append(_ZEROS[: start - off])
        if nb:
            views.append(tensor_view(t))
        off = start + nb
    return views, total, keep


#: at most this many header templates per sender (a role sends a handful of (kind, shape)s)
TEMPLATES_MAX = 256


def _remember(templates: dict, kind, step, sender, t, specs, header: bytes, limits, nb: int) -> None:
    """Keep ``header``'s bytes around its step for :func:`encode`'s ``templates`` when any step
    would fit the header limit and the frame would stay small, and it splits as expected."""
    if type(t) is not _TENSOR or not nb or nb + _PSIZE + len(header) + 8 > SMALL_FRAME:
        return
    p = _packer()
    kb = b"\x95" + p.pack(kind)
    tail = p.pack(sender) + p.pack(specs) + b"\x80"
    if kb + p.pack(step) + tail != header:  # defensive: the layout is the encoder's own
        return
    if limits is not None and len(kb) + 9 + len(tail) > limits.max_header_bytes:
        return
    if len(templates) >= TEMPLATES_MAX:
        templates.clear()
    templates[(kind, sender, t.dtype, t.shape)] = (kb, tail, nb)


# ----------------------------------------------------------------------------------- decoding
def parse_prefix(data, limits: FrameLimits, offset: int = 0) -> tuple[int, int]:
    """(header_len, body_len) from the 12-byte prefix at ``offset``; refuses before anything
    is allocated."""
    hlen, blen = PREFIX.unpack_from(data, offset)
    if hlen == 0 or hlen > limits.max_header_bytes:
        raise errors.HeaderTooLarge(f"header length {hlen} outside [1, {limits.max_header_bytes}]")
    if blen > limits.max_frame_bytes:
        raise errors.FrameTooLarge(f"body length {blen} above limit {limits.max_frame_bytes}")
    return hlen, blen


def _unpack(data, limit: int):
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_str_len=limit,
            max_bin_len=limit, max_array_len=max(limit // 2, 16), max_map_len=max(limit // 4, 16),
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises a zoo (ExtraData, FormatError, StackError, ValueError, ...)
        raise errors.BadHeader(f"invalid msgpack: {type(e).__name__}: {e}"[:200]) from None


def decode_header(data, body_len: int, limits: FrameLimits, *,
                  kinds: Mapping[str, Any] | None = None, sender: int | None = None) -> Header:
    """Validate a header (bytes-like) against ``limits``.

    ``kinds`` maps each registered kind to its expected shapes (a list of shape tuples) or None
    (any shapes); a kind not in it is :class:`errors.UnknownKind`.  ``kinds=None`` accepts any
    kind.  ``sender`` is the authenticated rank; the header must claim exactly it.
    Raises only :class:`errors.ProtocolError` subclasses.
    """
    obj = _unpack(data, limits.max_header_bytes)
    if type(obj) is not list or len(obj) != 5:
        raise errors.BadHeader("header must be a 5-element array")
    kind, step, hsender, tspecs, meta = obj
    if type(kind) is not str or not kind or len(kind) > MAX_KIND_LEN:
        raise errors.BadHeader("kind must be a non-empty short str")
    if kinds is not None and kind not in kinds:
        raise errors.UnknownKind(f"kind {kind[:MAX_KIND_LEN]!r} is not registered")
    if type(step) is not int or not 0 <= step < MAX_STEP:
        raise errors.BadStep(f"step must be an int in [0, 2**62), got {type(step).__name__}"
                             f"{' ' + str(step)[:24] if type(step) is int else ''}")
    if type(hsender) is not int:
        raise errors.BadHeader("sender must be an int")
    if sender is not None and hsender != sender:
        raise errors.SenderMismatch(f"header claims sender {hsender}, connection is rank {sender}")
    if type(meta) is not dict:
        raise errors.BadHeader("meta must be a map")
    if len(meta) > MAX_META_ITEMS:
        raise errors.BadMeta(f"meta has {len(meta)} items, at most {MAX_META_ITEMS}")
    for k, v in meta.items():
        if type(k) is not str:
            raise errors.BadMeta("meta keys must be str")
        if not (v is None or type(v) in (bool, int, float, str, bytes)):
            raise errors.BadMeta(f"meta values must be scalars, got {type(v).__name__}")
    if type(tspecs) is not list:
        raise errors.BadHeader("tensor list must be an array")
    if len(tspecs) > limits.max_tensors:
        raise errors.TooManyTensors(f"{len(tspecs)} tensors, limit {limits.max_tensors}")
    expected = kinds.get(kind) if kinds is not None else None
    if expected is not None and len(expected) != len(tspecs):
        raise errors.ShapeMismatch(f"kind {kind!r} expects {len(expected)} tensors, got {len(tspecs)}")
    specs = []
    off = 0
    cap = limits.max_frame_bytes
    for i, ts in enumerate(tspecs):
        if type(ts) is not list or len(ts) != 3:
            raise errors.BadHeader("tensor spec must be [dtype, shape, nbytes]")
        dname, shape, nbytes = ts
        if type(dname) is not str:
            raise errors.BadHeader("dtype must be a str")
        dtype = NAME_TO_DTYPE.get(dname)
        if dtype is None or dtype not in limits.allowed_dtypes:
            raise errors.BadDtype(f"dtype {dname[:16]!r} not allowed")
        if type(shape) is not list or len(shape) > MAX_NDIM:
            raise errors.BadHeader("shape must be a list of at most 16 non-negative ints")
        for d in shape:
            if type(d) is not int or d < 0:
                raise errors.BadHeader("shape must be a list of at most 16 non-negative ints")
        if type(nbytes) is not int or nbytes < 0:
            raise errors.BadHeader("nbytes must be a non-negative int")
        isz = ITEMSIZE[dtype]
        n = isz
        for d in shape:  # early exit keeps the product small
            n *= d
            if n > cap:
                raise errors.ShapeMismatch("shape exceeds the frame limit")
        if n != nbytes:
            raise errors.ShapeMismatch(f"tensor {i}: prod(shape)*itemsize = {n} != nbytes {nbytes}")
        shape = tuple(shape)
        if expected is not None and tuple(expected[i]) != shape:
            raise errors.ShapeMismatch(f"tensor {i} of {kind!r}: shape {shape}, expected {tuple(expected[i])}")
        start = align(off)
        specs.append(TensorSpec(dtype, shape, nbytes, start))
        off = start + nbytes
    if off != body_len:
        raise errors.ShapeMismatch(f"tensors add up to {off} bytes, body is {body_len}")
    return Header(kind, step, hsender, tuple(specs), meta, body_len)


def received_message(kind: str, step: int, sender: int, specs: tuple, meta: dict, data,
                     release: Callable | None) -> Message:
    """A received message whose tensors are built over ``data`` on first use (``specs``:
    validated :class:`TensorSpec` s); ``release`` (pooled ``data``) or None (a private copy)."""
    m = _new(Message)
    m.kind, m.step, m.sender, m.meta = kind, step, sender, meta
    if specs:
        m._tensors, m._specs, m._data = None, specs, data
    else:
        m._tensors, m._specs, m._data = [], None, None
    m._buffer, m._release_to = (data, release) if release is not None else (None, None)
    return m


def build_message(h: Header, buf, release: Callable | None) -> Message:
    return received_message(h.kind, h.step, h.sender, h.specs, h.meta, buf, release)


_new = object.__new__
