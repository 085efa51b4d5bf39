"""Where sends wait: one bounded outbox per peer, so a send never blocks its caller.

``Node.send`` appends to the peer's outbox and returns a future at once.  The outbox writes
whenever the peer's connection is up and the previous message has been fully taken by the
kernel (backpressure: the transport's high-water mark is 0, so ``pause_writing`` /
``resume_writing`` play the role of ``drain()`` without a task hop per message, which keeps the
64-byte round trip close to a raw socket's).  Bursts are *corked*: a message is written at once
unless another was since the peer last sent data (a burst); those go out together when the loop
iteration ends (one joined write, :meth:`Outbox._take_batch`), or as soon as half the outbox is
queued, so corking never makes a burst overflow it.  The future resolves

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


#: queued small frames are written together, up to this many bytes in one write
BATCH_BYTES = 64 << 10


class Outbox:
    def __init__(self, rank: int, depth: int, stats):
        self.rank = rank
        self.depth = depth
        self.stats = stats
        self._q: deque[_Item] = deque()
        self._conn = None
        self._inflight: list[_Item] = []  # written, not all taken by the kernel yet
        # Corking: a message put when nothing waits is written at once, unless one already was
        # since this peer's connection last delivered data (``on_read``) or since the last
        # flush: such a message (a burst: several sends in a row without an answer in between)
        # is queued, and the queue goes out in joined writes (one syscall for many small
        # frames: the 4 KB message rate) when the loop iteration ends (one callback per
        # burst), or as soon as half the outbox is queued: corking never drops a message.  A
        # request/answer exchange never waits for the callback: each answer re-arms the direct
        # write.
        self._hot = False
        self._flush_scheduled = False
        self._flush_at = max(1, min(depth // 2, 32))

    def __len__(self) -> int:
        return len(self._q)

    @property
    def busy(self) -> bool:
        """A message is being written (not all of it taken by the kernel yet)."""
        return bool(self._inflight)

    def on_read(self) -> None:
        """The peer's connection delivered data: the next message is written at once."""
        self._hot = False

    def put(self, buffers, nbytes, future, keep, ready: bool = True):
        """Queue a message; ``ready=False``: its bytes are not there yet (a device -> host
        copy in flight, :mod:`.staging`): it keeps its place in the queue and is written
        after :meth:`mark_ready`, the messages behind it waiting (per-peer order).  Returns
        the queued item (the handle of :meth:`mark_ready`), None for a message written at
        once."""
        q = self._q
        c = self._conn
        if (not q and ready and not self._hot and c is not None and not self._inflight
                and not c.write_paused and not c.closed):
            self._hot = True  # the common case: nothing waits, write now
            self._write_one(c, buffers, nbytes, future, keep)
            return None
        item = _Item(buffers, nbytes, future, keep, ready)
        while len(q) >= self.depth:
            old = q.popleft()
            self.stats.dropped += 1
            _resolve(old.future, False)
        q.append(item)
        if not self._hot or len(q) >= self._flush_at:
            self._pump()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            future.get_loop().call_soon(self._flush)
        return item

    def _flush(self) -> None:
        """The loop iteration of a burst ended: write what it queued."""
        self._flush_scheduled = False
        self._hot = False
        if self._q:
            self._pump()

    def _write_one(self, c, buffers, nbytes, future, keep) -> None:
        """:meth:`_write` for one message, without building its queue item unless the
        kernel did not take all of it."""
        tr = c.transport
        try:
            if len(buffers) == 1:
                tr.write(buffers[0])
            elif c.tls:
                tr.write(b"".join(buffers))  # a copy: see Connection.connection_made
            else:
                tr.writelines(buffers)
        except Exception:  # transport closing under us
            _resolve(future, False)
            return
        stats = self.stats
        stats.frames_sent += 1
        stats.bytes_sent += nbytes
        if not c.tls and (c.write_paused or tr.get_write_buffer_size()):
            self._inflight = [_Item(buffers, nbytes, future, keep)]
        elif not future.done():
            future.set_result(True)

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
            self._settle(False)

    def on_resume(self, conn) -> None:
        if conn is self._conn:
            self._settle(True)
        self._pump()

    def _settle(self, value: bool) -> None:
        done, self._inflight = self._inflight, []
        for item in done:
            _resolve(item.future, value)

    def _take_batch(self) -> list[_Item]:
        """The next item, plus the small ready items right behind it (each one joined
        ``bytes``, see :data:`~byzsgd.net.frame.SMALL_FRAME`), up to :data:`BATCH_BYTES`:
        a peer with several small frames queued gets them in one write."""
        q = self._q
        batch = [q.popleft()]
        if len(batch[0].buffers) != 1:
            return batch
        size = batch[0].nbytes
        while q and q[0].ready and len(q[0].buffers) == 1 and size + q[0].nbytes <= BATCH_BYTES:
            item = q.popleft()
            if not item.future.done():  # else cancelled by the caller
                batch.append(item)
                size += item.nbytes
        return batch

    def _writable(self, c) -> bool:
        return c is not None and not self._inflight and not c.write_paused and not c.closed

    def _pump(self) -> None:
        q = self._q
        while q and self._writable(self._conn):
            if not q[0].ready:
                if q[0].future.done():  # dropped or cancelled while its copy ran
                    q.popleft()
                    continue
                break  # its device -> host copy is still running: keep the order
            if q[0].future.done():  # cancelled by the caller
                q.popleft()
                continue
            self._write(self._conn, self._take_batch())

    def _write(self, c, batch: list[_Item]) -> None:
        """Write ``batch`` (one item, or small frames joined); its futures resolve True once
        the kernel took every byte (now, or at :meth:`on_resume`), False if the write failed."""
        tr = c.transport
        try:
            if len(batch) > 1:
                tr.write(b"".join([it.buffers[0] for it in batch]))
            elif c.tls:
                tr.write(b"".join(batch[0].buffers))  # a copy: see Connection.connection_made
            elif len(batch[0].buffers) == 1:
                tr.write(batch[0].buffers[0])
            else:
                tr.writelines(batch[0].buffers)
        except Exception:  # transport closing under us
            for it in batch:
                _resolve(it.future, False)
            return
        self.stats.frames_sent += len(batch)
        self.stats.bytes_sent += sum(it.nbytes for it in batch)
        if not c.tls and (c.write_paused or tr.get_write_buffer_size()):
            self._inflight = batch
        else:
            for it in batch:
                _resolve(it.future, True)

    def close(self) -> None:
        self._settle(False)
        while self._q:
            _resolve(self._q.popleft().future, False)
        self._conn = None
