"""Where receive buffers are recycled.

A freshly allocated 44 MB buffer costs page faults on first touch (1.2-2.3 GB/s against ~12 GB/s
for memcpy, docs/design.md §9), so a node that receives a model every step must not allocate a new one
each time.  Frame bodies are read straight into a buffer from this pool; the ``Message`` built on
it owns the buffer until ``release()`` puts it back.  A buffer that is never released is simply
garbage-collected: the pool only remembers *free* buffers, so forgetting ``release()`` costs
performance, never memory safety.

The pool is bounded (``max_cached_bytes``); buffers above the bound are dropped on release.
Sizes are bucketed (powers of two below 1 MiB, 64 KiB granularity above) so the same model size
always hits the same bucket without wasting much memory.
"""
from __future__ import annotations

import threading

__all__ = ["BufferPool"]

_SMALL = 1 << 20
_GRAIN = 1 << 16


def bucket(n: int) -> int:
    if n <= 4096:
        return 4096
    if n <= _SMALL:
        return 1 << (n - 1).bit_length()
    return (n + _GRAIN - 1) // _GRAIN * _GRAIN


class BufferPool:
    """Free lists of ``bytearray`` keyed by bucket size.

    ``acquire(n)`` returns a bytearray of at least ``n`` bytes (contents undefined);
    ``release(buf)`` returns it.  Thread-safe (a lock around the free lists) though the node only
    uses it from its event loop.
    """

    def __init__(self, max_cached_bytes: int = 1 << 30, *, max_request: int | None = None,
                 allocate=bytearray):
        """``allocate(size)``: a fresh writable buffer of ``size`` bytes (``bytearray``; a CUDA
        node passes :meth:`byzsgd.net.staging.PinnedBytes.allocate`: pinned host memory)."""
        self.max_cached_bytes = int(max_cached_bytes)
        self._allocate = allocate
        self.max_request = max_request
        self._free: dict[int, list[bytearray]] = {}
        self._cached = 0
        self._lock = threading.Lock()
        self.allocations = 0  # fresh allocations (a test/bench observable)
        self.largest_request = 0

    def acquire(self, n: int) -> bytearray:
        if n < 0 or (self.max_request is not None and n > self.max_request):
            raise ValueError(f"buffer request of {n} bytes outside [0, {self.max_request}]")
        self.largest_request = max(self.largest_request, n)
        size = bucket(n)
        with self._lock:
            lst = self._free.get(size)
            if lst:
                buf = lst.pop()
                self._cached -= size
                return buf
        self.allocations += 1
        return self._allocate(size)

    def release(self, buf) -> None:
        size = buf.nbytes if isinstance(buf, memoryview) else len(buf)
        if bucket(size) != size:
            return  # not one of ours: let it go
        with self._lock:
            if self._cached + size > self.max_cached_bytes:
                return
            self._free.setdefault(size, []).append(buf)
            self._cached += size

    @property
    def cached_bytes(self) -> int:
        return self._cached

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._cached = 0
