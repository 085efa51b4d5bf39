"""Where sends wait: one bounded outbox per peer, so a send never blocks its caller.

``Node.send`` appends to the peer's outbox and returns a future at once.  The outbox writes
whenever the peer's connection is up and the previous message has been fully taken by the
kernel (backpressure: the transport's high-water mark is 0, so ``pause_writing`` /
``resume_writing`` play the role of ``drain()`` without a task hop per message, which keeps the
64-byte round trip close to a raw socket's).  The future resolves

* ``True`` once every byte of the message was handed to the kernel (the tensors may be reused);
* ``False`` if the message was dropped: the outbox overflowed (the *oldest* queued message is
  dropped), the connection died while it was being written, or the node closed.

Messages to a peer that is not connected (yet, or any more) wait in its outbox until it
(re)connects.  A peer that never reads therefore costs at most ``depth`` queued messages plus the
one in flight; it never stalls the caller or any other peer.
"""
from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Outbox"]


def _resolve(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class _Item:
    __slots__ = ("buffers", "nbytes", "future", "keep", "ready")

    def __init__(self, buffers, nbytes, future, keep, ready=True):
        self.buffers, self.nbytes, self.future, self.keep = buffers, nbytes, future, keep
        self.ready = ready  # False: its bytes are still being copied from a device


class Outbox:
    def __init__(self, rank: int, depth: int, stats):
        self.rank = rank
        self.depth = depth
        self.stats = stats
        self._q: deque[_Item] = deque()
        self._conn = None
        self._inflight: _Item | None = None

    def __len__(self) -> int:
        return len(self._q)

    @property
    def busy(self) -> bool:
        """A message is being written (not all of it taken by the kernel yet)."""
        return self._inflight is not None

    def put(self, buffers, nbytes, future, keep, ready: bool = True):
        """Queue a message; ``ready=False``: its bytes are not there yet (a device -> host
        copy in flight, :mod:`.staging`): it keeps its place in the queue and is written
        after :meth:`mark_ready`, the messages behind it waiting (per-peer order).  Returns
        the queued item (the handle of :meth:`mark_ready`)."""
        while len(self._q) >= self.depth:
            old = self._q.popleft()
            self.stats.dropped += 1
            _resolve(old.future, False)
        item = _Item(buffers, nbytes, future, keep, ready)
        self._q.append(item)
        self._pump()
        return item

    def mark_ready(self, item) -> None:
        item.ready = True
        self._pump()

    def attach(self, conn) -> None:
        self._conn = conn
        conn.outbox = self
        self._pump()

    def detach(self, conn) -> None:
        if self._conn is conn:
            self._conn = None
            if self._inflight is not None:
                _resolve(self._inflight.future, False)
                self._inflight = None

    def on_resume(self, conn) -> None:
        if conn is self._conn and self._inflight is not None:
            item, self._inflight = self._inflight, None
            _resolve(item.future, True)
        self._pump()

    def _pump(self) -> None:
        c = self._conn
        q = self._q
        while q and c is not None and self._inflight is None and not c.write_paused and not c.closed:
            if not q[0].ready:
                if q[0].future.done():  # dropped or cancelled while its copy ran
                    q.popleft()
                    continue
                break  # its device -> host copy is still running: keep the order
            item = q.popleft()
            if item.future.done():  # cancelled by the caller
                continue
            tr = c.transport
            try:
                if c.tls:
                    tr.write(b"".join(item.buffers))  # a copy: see Connection.connection_made
                else:
                    tr.writelines(item.buffers)
            except Exception:  # transport closing under us
                _resolve(item.future, False)
                continue
            self.stats.frames_sent += 1
            self.stats.bytes_sent += item.nbytes
            if not c.tls and (c.write_paused or tr.get_write_buffer_size()):
                self._inflight = item
            else:
                _resolve(item.future, True)

    def close(self) -> None:
        if self._inflight is not None:
            _resolve(self._inflight.future, False)
            self._inflight = None
        while self._q:
            _resolve(self._q.popleft().future, False)
        self._conn = None
