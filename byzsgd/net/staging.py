"""Where device tensors become wire bytes: pooled pinned host buffers for CUDA tensors.

The frame format is unchanged (docs/design.md §4): the body is still the raw bytes of host
memory written with ``writelines``.  A node computing on CUDA sends its tensors through a
:class:`DeviceStaging`:

* each tensor is copied device -> host into a **pinned** buffer taken from a
  :class:`PinnedPool` (reused: no allocation per message once the pool is warm);
* the copy runs on a dedicated copy stream, ordered after the work that produced the tensor
  (``wait_stream``), with ``non_blocking=True``, and ends with a CUDA event;
* the frame is encoded at once over the pinned buffers and queued in the peer's outbox, but
  is marked *ready* only when the event has completed (awaited in a helper thread, never by
  polling): meanwhile the outbox goes on writing the previous message, so the device->host
  copy of the next message overlaps the send of the previous one, and per-peer order is kept;
* the pinned buffers return to the pool when every send of the message has resolved.

On the CPU path nothing happens at all: :meth:`DeviceStaging.stage` (and the node's send)
hands a CPU tensor's own memory to the wire, as before (:class:`CpuStaging` is the explicit
pass-through, same storage, no copy).

Receiving: the receive pool of a CUDA node allocates pinned buffers too
(:meth:`PinnedBytes.allocate`), so the checks run on host bytes exactly as on the CPU
(prefix, header, dtypes, shapes, sizes — before any copy to the device), and the role's
host -> device copy reads pinned memory (DMA speed).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from .bufpool import BufferPool

__all__ = ["PinnedPool", "CpuStaging", "DeviceStaging", "Staged", "needs_staging"]


def needs_staging(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` lives outside host memory."""
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors)


class PinnedPool(BufferPool):
    """A :class:`~byzsgd.net.bufpool.BufferPool` of pinned ``uint8`` host tensors (the same
    buckets, free lists and cap; only the allocation differs)."""

    def __init__(self, max_cached_bytes: int = 1 << 30, *, pin: bool = True):
        self.pin = bool(pin)
        super().__init__(max_cached_bytes, allocate=self._new)

    def _new(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)


class PinnedBytes:
    """A receive buffer over pinned memory, for :class:`~byzsgd.net.bufpool.BufferPool`:
    ``acquire`` returns a writable memoryview whose numpy base keeps the tensor alive."""

    @staticmethod
    def allocate(size: int):
        t = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return memoryview(t.numpy())


class Staged:
    """The host tensors of one message and what releases their pinned buffers.

    ``ready`` is None when the host tensors can be written now, else a
    ``concurrent.futures.Future`` completed when the device -> host copy has finished.
    ``release()`` is idempotent; call it when every send of the message resolved."""

    __slots__ = ("tensors", "ready", "_release", "_refs", "_lock")

    def __init__(self, tensors: list[torch.Tensor], ready=None, release: Callable[[], None] | None = None):
        self.tensors, self.ready, self._release = tensors, ready, release
        self._refs = 0
        self._lock = threading.Lock()

    def hold(self, count: int = 1) -> None:
        """``count`` more sends share these buffers (each calls :meth:`drop` once)."""
        with self._lock:
            self._refs += count

    def drop(self, *_ignored) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs <= 0
        if last:
            self.release()

    def release(self) -> None:
        fn, self._release = self._release, None
        if fn is not None:
            fn()


class CpuStaging:
    """The CPU path: host tensors go to the wire from their own memory (no copy, no pool)."""

    device = torch.device("cpu")

    def stage(self, tensors: Sequence[torch.Tensor]) -> Staged:
        return Staged(list(tensors))

    def close(self) -> None:
        pass


class DeviceStaging:
    """Device tensors -> pinned host tensors, asynchronously (see the module docstring).

    Host tensors among the message's tensors pass through untouched."""

    def __init__(self, device, *, max_cached_bytes: int = 1 << 30):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"DeviceStaging is for CUDA devices, got {self.device}")
        self.pool = PinnedPool(max_cached_bytes)
        self._stream = None
        self._waiter: ThreadPoolExecutor | None = None
        self.copies = 0

    @property
    def stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    def _wait(self, event):
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="byzsgd-d2h")
        return self._waiter.submit(event.synchronize)

    def stage(self, tensors: Sequence[torch.Tensor]) -> Staged:
        if not needs_staging(tensors):
            return Staged(list(tensors))
        out: list[torch.Tensor] = []
        taken: list[torch.Tensor] = []
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the copy sees the data
        with torch.cuda.stream(stream):
            for t in tensors:
                if t.device.type == "cpu":
                    out.append(t)
                    continue
                src = t.detach()
                if not src.is_contiguous():
                    src = src.contiguous()
                nbytes = src.numel() * src.element_size()
                buf = self.pool.acquire(nbytes)
                taken.append(buf)
                host = buf[:nbytes].view(src.dtype).view(src.shape) if nbytes else \
                    torch.empty(src.shape, dtype=src.dtype)
                if nbytes:
                    host.copy_(src, non_blocking=True)
                    src.record_stream(stream)  # its memory is not reused before the copy ends
                out.append(host)
            event = torch.cuda.Event()
            event.record(stream)
        self.copies += 1
        ready = None if event.query() else self._wait(event)
        pool = self.pool

        def release() -> None:
            for b in taken:
                pool.release(b)
        return Staged(out, ready, release)

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.shutdown(wait=False)
            self._waiter = None
        self.pool.clear()
