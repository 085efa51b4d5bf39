"""Where a message leaves: framing, the per-peer outboxes, device staging, and send filters.

:class:`Sender` is what ``Node.send`` / ``Node.broadcast`` / ``Node.send_bytes`` run.  A send
frames the message (limits checked, :func:`~.frame.encode`) and queues it in the peer's
:class:`~.outbox.Outbox`; it never blocks.  A broadcast frames once for every recipient.  A
node computing on CUDA copies device tensors once into pinned buffers (:mod:`.staging`) shared
by every recipient.

Send filters (:meth:`Sender.add_filter`, public as ``Node.add_send_filter``) are the one hook
on the way out: a role's own code (a Byzantine one's protocol attack, a test's counter) sees
every message the node sends and decides what goes out instead.  Their contract:

* a filter is called as ``fn(rank, kind, step, tensors, meta)`` on the node's loop, for every
  ``send`` and for each recipient of a ``broadcast`` (a broadcast through filters is then framed
  per recipient), internal ``__`` kinds (the rendezvous) and sends to the node itself included;
* it returns the future the caller gets: what ``proceed`` (returned by ``add_filter``: the
  filters added after it, then the wire) returned for the message it passed on, or one it
  resolved itself; ``None`` means "not sent" (the caller gets a future resolved False);
* it may call ``proceed`` any number of times, later too (a timer, a close hook), with any
  message: this is how it adds, delays or rewrites frames;
* what it raises propagates to the caller of ``send``/``broadcast``, like the errors ``proceed``
  raises for a message the limits refuse (a filter is the sender's own code, not peer input:
  nothing is contained here).  Returning anything but a future or None is a ``TypeError``.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from . import errors
from .frame import Message, encode
from .staging import Staged, needs_staging

__all__ = ["Sender", "SendFilter"]

#: ``fn(rank, kind, step, tensors, meta) -> asyncio.Future | None`` (module docstring)
SendFilter = Callable[..., "asyncio.Future | None"]


class Sender:
    """The sending side of ``node`` (its ``loop``, ``closing``, ``rank``, ``limits``,
    ``staging``, the outboxes ``_peers`` and its ``_dispatcher`` for sends to itself)."""

    def __init__(self, node):
        self.node = node
        self.filters: list[SendFilter] = []
        self._templates: dict = {}  # encode's header templates (always with node.limits)

    # ------------------------------------------------------------------ filters
    def add_filter(self, fn: SendFilter) -> Callable[..., asyncio.Future]:
        """Install ``fn`` after the filters already there; returns its ``proceed``."""
        if not callable(fn):
            raise errors.ConfigError("a send filter must be callable")
        if any(f is fn for f in self.filters):
            raise errors.ConfigError("this send filter is already installed")
        self.filters.append(fn)

        def proceed(rank: int, kind: str, step: int, tensors=(), meta=None) -> asyncio.Future:
            i = next((i for i, f in enumerate(self.filters) if f is fn), len(self.filters))
            return self._through(i + 1, rank, kind, step, tensors, meta)
        return proceed

    def remove_filter(self, fn: SendFilter) -> None:
        """Uninstall ``fn``; its ``proceed`` then sends straight to the wire."""
        self.filters = [f for f in self.filters if f is not fn]

    def _through(self, i: int, rank, kind, step, tensors, meta) -> asyncio.Future:
        if i >= len(self.filters):
            return self.send_now(rank, kind, step, tensors, meta)
        fn = self.filters[i]
        fut = fn(rank, kind, step, tensors, meta)
        if fut is None:
            return self._resolved(False)
        if not isinstance(fut, asyncio.Future):
            raise TypeError(f"send filter {fn!r} returned a {type(fut).__name__}, not a future or None")
        return fut

    # ------------------------------------------------------------------ sending
    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.node.loop
        if loop is None:
            raise RuntimeError("start() the node before sending")
        return loop

    def _resolved(self, value: bool) -> asyncio.Future:
        fut = self._loop().create_future()
        fut.set_result(value)
        return fut

    def send(self, rank: int, kind: str, step: int, tensors=(), meta=None) -> asyncio.Future:
        """See :meth:`Node.send`: through the filters, then the wire."""
        if self.filters:
            self._loop()
            return self._through(0, rank, kind, step, tensors, meta)
        node = self.node
        loop = node._loop
        if loop is None:
            self._loop()  # raises
        if node.staging is not None and needs_staging(tensors):
            return self._send_staged([rank], kind, step, tensors, meta)[0]
        ob = node._peers.get(rank)
        if ob is None or node._closing or rank == node.rank:  # itself, unknown, closing: _send
            return self._send(rank, kind, step, tensors, meta)
        # _send's common case, inline (this runs once per message)
        fut = loop.create_future()
        buffers, nbytes, keep = encode(kind, step, node.rank, tensors, meta, node.limits,
                                       templates=self._templates)
        ob.put(buffers, nbytes, fut, keep)
        return fut

    def send_now(self, rank: int, kind: str, step: int, tensors=(), meta=None) -> asyncio.Future:
        """A send past every filter."""
        self._loop()
        if self.node.staging is not None and needs_staging(tensors):
            return self._send_staged([rank], kind, step, tensors, meta)[0]
        return self._send(rank, kind, step, tensors, meta)

    def broadcast(self, ranks: Iterable[int], kind: str, step: int, tensors=(), meta=None) -> list:
        """See :meth:`Node.broadcast`."""
        ranks = list(ranks)
        if not ranks:
            return []
        self._loop()
        if self.filters:  # each recipient's message passes the filters on its own
            self._check_ranks(ranks)
            return [self.send(r, kind, step, tensors, meta) for r in ranks]
        if self.node.staging is not None and needs_staging(tensors):
            return self._send_staged(ranks, kind, step, tensors, meta)
        self._check_ranks(ranks)
        framed = encode(kind, step, self.node.rank, tensors, meta, self.node.limits)
        return [self._send(r, kind, step, tensors, meta, None, framed) for r in ranks]

    def send_bytes(self, rank: int, data: bytes) -> asyncio.Future:
        """See :meth:`Node.send_bytes`."""
        loop = self._loop()
        fut = loop.create_future()
        if self.node.closing:
            fut.set_result(False)
            return fut
        ob = self._outbox(rank)
        data = bytes(data)
        ob.put([data], len(data), fut, None)
        return fut

    async def drain(self, timeout: float) -> None:
        """Let the outboxes of the connected peers flush what they hold, for at most
        ``timeout`` seconds (``Node.close(drain_timeout=)``)."""
        loop = self._loop()
        deadline = loop.time() + timeout
        while self._undrained() and loop.time() < deadline:
            await asyncio.sleep(0.005)  # bounded: at most ``timeout``, only at shutdown
        if not self._undrained():
            # what the transports hold went to the kernel; give it a moment on the wire
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    def _undrained(self) -> list[int]:
        """The connected peers whose outbox still holds (or is writing) a message."""
        out = []
        for r, ob in self.node._peers.items():
            c = self.node.connection(r)
            if c is None or c.transport is None:
                continue
            if len(ob) or ob.busy or c.transport.get_write_buffer_size():
                out.append(r)
        return out

    def _outbox(self, rank: int):
        ob = self.node._peers.get(rank)
        if ob is None:
            raise errors.UnknownPeer(f"rank {rank!r} is not a known peer of rank {self.node.rank}")
        return ob

    def _send(self, rank: int, kind: str, step: int, tensors, meta, staged: Staged | None = None,
              framed: tuple | None = None):
        """One send; ``framed``: the ``encode`` result shared by every recipient of a
        broadcast (framed once, not once per recipient)."""
        node = self.node
        loop = node._loop
        fut = loop.create_future()
        if node._closing:
            encode(kind, step, node.rank, tensors, meta, node.limits)  # same errors as when open
            fut.set_result(False)
            return fut
        if rank == node.rank:
            return self._send_local(kind, step, tensors, meta, fut, staged)
        ob = node._peers.get(rank)
        if ob is None:
            raise errors.UnknownPeer(f"rank {rank!r} is not a known peer of rank {node.rank}")
        buffers, nbytes, keep = framed if framed is not None else encode(
            kind, step, node.rank, tensors, meta, node.limits, templates=self._templates)
        if staged is None or staged.ready is None or staged.ready.done():
            ob.put(buffers, nbytes, fut, keep)
        else:  # its place in the queue now, its bytes once the device -> host copy ended
            item = ob.put(buffers, nbytes, fut, (keep, staged), ready=False)
            staged.ready.add_done_callback(
                lambda _f: loop.call_soon_threadsafe(ob.mark_ready, item) if not loop.is_closed() else None)
        return fut

    def _check_ranks(self, ranks: list) -> None:
        node = self.node
        for r in ranks:
            if r != node.rank and r not in node._peers:
                raise errors.UnknownPeer(f"rank {r!r} is not a known peer of rank {node.rank}")

    def _send_staged(self, ranks: list[int], kind: str, step: int, tensors, meta) -> list:
        """Send device tensors: one device -> host copy into pinned buffers shared by every
        send to ``ranks``, framed once; the buffers go back to the pool once every send
        resolved."""
        ranks = list(ranks)
        self._check_ranks(ranks)
        staged = self.node.staging.stage(tensors)
        staged.hold(len(ranks))
        futs = []
        try:
            # a copy still running fills these buffers later: send them as views, never joined
            framed = encode(kind, step, self.node.rank, staged.tensors, meta, self.node.limits,
                            join_small=staged.ready is None or staged.ready.done())
            for r in ranks:
                fut = self._send(r, kind, step, staged.tensors, meta, staged, framed)
                fut.add_done_callback(staged.drop)
                futs.append(fut)
        finally:
            for _ in range(len(ranks) - len(futs)):  # a refused send: its share is dropped too
                staged.drop()
        return futs

    def _send_local(self, kind, step, tensors, meta, fut, staged: Staged | None = None):
        node = self.node
        if staged is not None and staged.ready is not None:
            staged.ready.result()  # rare path (a node sending to itself): wait for the copy
        encode(kind, step, node.rank, tensors, meta, node.limits)  # same checks as the wire
        if kind not in node._dispatcher.handlers:
            fut.set_result(False)
            return fut
        msg = Message(kind, step, node.rank, [t.detach().clone() for t in tensors], dict(meta or {}))
        node.loop.call_soon(self._deliver_local, msg)
        fut.set_result(True)
        return fut

    def _deliver_local(self, msg: Message) -> None:
        if not self.node.closing:
            self.node._dispatcher.route_local(msg)
