"""Where bytes become messages: the receive state machine and the asyncio protocol around it.

:class:`FrameReader` is sans-IO (no sockets, no loop) so it can be fuzzed directly: it owns a
small staging buffer for prefixes, headers and small bodies, and for each frame takes a body
buffer from the :class:`~byzsgd.net.bufpool.BufferPool` *after* the prefix and the header passed
every check.  While a body is being received, ``get_buffer()`` hands out a view of exactly the
missing part of that body, so the kernel copies large tensors straight into their final place
(``asyncio.BufferedProtocol``; ``StreamReader.readexactly`` is 6-9x slower, docs/design.md §9).
All the frames of one read are parsed in place in the staging buffer; a header that is
byte-identical, step aside, to one already validated on this connection is taken from a small
cache (:mod:`.hcache`: the full decode and its checks are the cost of a small
frame; only the step is new, and it is range-checked).

:class:`Connection` is the ``asyncio.BufferedProtocol``: it runs the handshake (through tiny
length-prefixed msgpack messages, at most ``HS_MAX`` bytes, parsed by the same reader in its
handshake mode: the state machine is :func:`.handshake.dial` / :func:`.handshake.serve`), then
feeds frames to the node, which hands each one back with its handler (:meth:`Connection.deliver`):
the connection owns the order its handlers run in (:class:`.dispatch.HandlerQueue`).  Error contract: any
:class:`~byzsgd.net.errors.ProtocolError` or :class:`~byzsgd.net.errors.HandshakeError` raised
while reading closes *this* connection (``abort``) with a logged, counted reason; nothing
propagates to the event loop.  Writes are driven by the peer's outbox (:mod:`.outbox`): the
transport's high-water mark is 0 so ``pause_writing``/``resume_writing`` tell exactly when the
kernel has taken all the bytes of a message (the moment its send future resolves True).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Mapping

import msgpack

from . import errors, handshake
from .bufpool import BufferPool
from .dispatch import HandlerQueue
from .frame import MAX_STEP, PREFIX, SMALL_FRAME, FrameLimits, Header, decode_header, parse_prefix, received_message
from .hcache import HCACHE_ENTRIES, header_key

__all__ = ["FrameReader", "Connection", "HS_MAX", "HS_PREFIX"]

log = logging.getLogger("byzsgd.net")

HS_PREFIX = struct.Struct("<H")
HS_MAX = 1024
HS_STAGE = 4096
_HEAD, _BODY = 0, 1
_PSIZE = PREFIX.size
_UNPACK_PREFIX = PREFIX.unpack_from


class FrameReader:
    """Incremental frame decoder.  Usage: ``mv = r.get_buffer()``; write ``n`` bytes into
    ``mv[:n]``; ``msgs = r.feed(n)``.  In handshake mode (the initial mode) ``feed`` returns
    nothing and complete handshake messages are taken with :meth:`pop_handshake`; after
    :meth:`start_frames` it returns complete :class:`Message` objects.  Raises only
    :class:`errors.ProtocolError` / :class:`errors.HandshakeError`; after one the reader is dead.
    """

    def __init__(self, limits: FrameLimits, pool: BufferPool, *, kinds: Mapping[str, Any] | None = None,
                 sender: int | None = None, handshake: bool = True, stage_bytes: int = 256 * 1024):
        self.limits, self.pool, self.kinds, self.sender = limits, pool, kinds, sender
        self.handshake = handshake
        # Until authenticated, a connection only gets a small staging buffer: an outsider
        # opening many connections costs 4 KiB each, not a frame-sized buffer.
        self._stage_bytes = max(stage_bytes, PREFIX.size + limits.max_header_bytes + 4096)
        self._stage = bytearray(HS_STAGE if handshake else self._stage_bytes)
        self._smv = memoryview(self._stage)
        self._start = self._end = 0
        self._state = _HEAD
        self._hdr: Header | None = None
        self._body: bytearray | None = None
        self._bmv: memoryview | None = None
        self._filled = 0
        self.bytes_in = 0
        self._hcache: dict = {}  # see .hcache

    # ------------------------------------------------------------------ buffer hand-out
    def get_buffer(self) -> memoryview:
        if self._state == _BODY:
            return self._bmv[self._filled:self._hdr.body_len]
        if self._end >= len(self._stage) - 1024:  # little room left: compact
            n = self._end - self._start
            self._smv[:n] = self._smv[self._start:self._end]
            self._start, self._end = 0, n
        return self._smv[self._end:]

    def feed(self, n: int) -> list:
        self.bytes_in += n
        if self._state == _BODY:
            self._filled += n
            if self._filled < self._hdr.body_len:
                return []
            out = [self._finish_body()]
            if self._end > self._start and not self.handshake:
                out.extend(self._parse())
            return out
        self._end += n
        if self.handshake:
            return []
        return self._parse()

    # ------------------------------------------------------------------ handshake mode
    def free_space(self) -> int:
        """Room left in the staging buffer (after compaction) while not inside a body."""
        return len(self._stage) - (self._end - self._start)

    def unread(self) -> bytes:
        """Handshake mode: the bytes received and not yet taken by :meth:`pop_handshake`."""
        return bytes(self._smv[self._start:self._end]) if self.handshake else b""

    def pop_handshake(self) -> bytes | None:
        avail = self._end - self._start
        if avail < HS_PREFIX.size:
            return None
        (ln,) = HS_PREFIX.unpack_from(self._stage, self._start)
        if ln == 0 or ln > HS_MAX:
            raise errors.HandshakeError(f"handshake message of {ln} bytes (limit {HS_MAX})")
        if avail < HS_PREFIX.size + ln:
            return None
        s = self._start + HS_PREFIX.size
        data = bytes(self._smv[s:s + ln])
        self._start = s + ln
        return data

    def start_frames(self, sender: int | None) -> list:
        """Leave handshake mode; parse whatever frames already arrived."""
        self.handshake = False
        self.sender = sender
        self._hcache.clear()  # validated for another sender (none cached before: defensive)
        n = self._end - self._start
        stage = bytearray(self._stage_bytes)
        stage[:n] = self._smv[self._start:self._end]
        self._smv.release()
        self._stage, self._smv = stage, memoryview(stage)
        self._start, self._end = 0, n
        return self._parse()

    # ------------------------------------------------------------------ frames
    def _parse(self) -> list:
        out = []
        lim = self.limits
        max_h, max_b = lim.max_header_bytes, lim.max_frame_bytes
        psize = _PSIZE
        stage, smv = self._stage, self._smv
        cache = self._hcache
        while True:
            start = self._start
            avail = self._end - start
            if avail < psize:
                break
            hlen, blen = _UNPACK_PREFIX(stage, start)  # parse_prefix's checks, inline
            if hlen == 0 or hlen > max_h or blen > max_b:
                parse_prefix(stage, lim, start)  # raises the exact error
            if avail < psize + hlen:
                break  # the staging buffer always has room for prefix + max header
            hs = start + psize
            he = hs + hlen
            # The header cache (.hcache): a header byte-identical, step aside, to one
            # that passed decode_header on this connection passes again; only the step is new.
            key = header_key(stage, smv, hs, he, blen) if stage[he - 1] == 0x80 else None
            hit = cache.get(key[0]) if key is not None else None
            if hit is not None and key[1] < MAX_STEP:
                kind, sender, specs = hit
                step, meta = key[1], {}
            else:
                hdr = decode_header(smv[hs:he], blen, lim, kinds=self.kinds, sender=self.sender)
                kind, step, sender, specs, meta = hdr.kind, hdr.step, hdr.sender, hdr.specs, hdr.meta
                if key is not None and step == key[1] and not meta:
                    if len(cache) >= HCACHE_ENTRIES:
                        cache.clear()
                    cache[key[0]] = (kind, sender, specs)
            start = self._start = he
            if blen == 0:
                out.append(received_message(kind, step, sender, specs, meta, None, None))
                continue
            k = min(blen, self._end - start)
            if k == blen and blen <= SMALL_FRAME:
                # a small body already here: a fresh copy, no pool round trip
                self._start = start + blen
                out.append(received_message(kind, step, sender, specs, meta, stage[start:start + blen], None))
                continue
            self._hdr = Header(kind, step, sender, specs, meta, blen)
            body = self.pool.acquire(blen)
            self._body, self._bmv = body, memoryview(body)
            if k:
                self._bmv[:k] = smv[start:start + k]
                self._start = start + k
            self._filled = k
            if k == blen:
                out.append(self._finish_body())
                continue
            self._state = _BODY
            break
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def _finish_body(self):
        hdr, body = self._hdr, self._body
        self._hdr = self._body = self._bmv = None
        self._state = _HEAD
        self._filled = 0
        return received_message(hdr.kind, hdr.step, hdr.sender, hdr.specs, hdr.meta, body, self.pool.release)

    def close(self) -> None:
        """Return a half-received body to the pool."""
        if self._body is not None:
            self._bmv = None
            self.pool.release(self._body)
            self._body = None
        self._state = _HEAD


def hs_pack(obj) -> bytes:
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > HS_MAX:
        raise ValueError("handshake message too large")
    return HS_PREFIX.pack(len(data)) + data


def hs_unpack(data: bytes) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=HS_MAX,
                              max_bin_len=HS_MAX, max_array_len=16, max_map_len=16, max_ext_len=0)
    except Exception as e:
        raise errors.HandshakeError(f"invalid handshake message: {type(e).__name__}") from None
    if type(obj) is not dict:
        raise errors.HandshakeError("handshake message must be a map")
    return obj


def _peek(transport, n: int) -> bytes:
    """Up to ``n`` bytes waiting in the kernel for ``transport``'s socket, left there."""
    sock = transport.get_extra_info("socket")
    if sock is None or n <= 0:
        return b""
    try:
        s = socket.socket(fileno=sock.fileno())
    except (OSError, ValueError):
        return b""
    try:
        return s.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""
    finally:
        s.detach()  # the transport owns the descriptor


def _keepalive(sock) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Connection(asyncio.BufferedProtocol):
    """One TCP connection to one peer.  ``rank`` is None until the handshake authenticated it.

    Frames go to ``node._dispatch(conn, msg)``, which routes them back to :meth:`deliver`;
    ``node._connection_lost(conn)`` on close.  What else it uses of the node: ``limits``,
    ``pool``, ``loop``, ``closing``, ``stats``, ``_rlog``, its kinds, its admission (an accepted
    connection counts as unauthenticated until the handshake ends) and ``_connections``.
    """

    def __init__(self, node, *, expect_rank: int | None = None, tls_slot=None):
        self.node = node
        self.expect_rank = expect_rank  # set on the dialing side
        self.tls_slot = tls_slot        # accepted TLS: the slot that counted its TLS handshake
        self.rank: int | None = None
        self.role: str | None = None
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(node.limits, node.pool, kinds=node._dispatcher.kinds)
        self.closed = False
        self.close_reason: str | None = None
        self.write_paused = False
        self.tls = False
        self.outbox = None  # the peer's Outbox once attached
        self.peername = None
        self._hs_waiter: asyncio.Future | None = None
        self._lost = node.loop.create_future()
        self.queue: HandlerQueue | None = None  # messages waiting for (or behind) an async handler
        self.handshake_task: asyncio.Task | None = None
        self._read_paused = False
        self.source: str | None = None  # source IP, for the per-address limit (accepted side)
        self.progressed = False          # a complete hello arrived (eviction spares these first)
        self.claim: int | None = None    # the rank its hello claimed, once that hello passed
        self._lost_called = False

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        # TLS: the SSL layer may keep references to what we write while it encrypts, and its
        # flow control only reports crossings of the usual watermarks, so TLS connections write
        # a copy (TLS costs far more than the copy) under the default watermarks.  Plain TCP
        # writes the tensors' memory and uses a high-water mark of 0: resume_writing then means
        # "the kernel took every byte".
        self.tls = transport.get_extra_info("ssl_object") is not None
        accepted = self.expect_rank is None
        if not self.tls:
            try:
                transport.set_write_buffer_limits(high=0, low=0)
            except Exception:  # pragma: no cover - every transport we use supports it
                pass
        node = self.node
        if self.tls_slot is not None:
            node._admission.done(self.tls_slot)
        if node.closing:
            self.abort(None)
            return
        node._connections.add(self)
        if accepted:  # the server runs its half of the handshake, counted as unauthenticated
            node._admission.admit(self)
            self.handshake_task = node.loop.create_task(handshake.serve(node, self))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        try:
            msgs = self.reader.feed(nbytes)
        except (errors.ProtocolError, errors.HandshakeError) as e:
            self.abort(e)
            return
        if self.reader.handshake:
            if self.reader.free_space() < 2 * (HS_MAX + HS_PREFIX.size) and not self.closed:
                self.transport.pause_reading()  # resumed by start_frames; else the handshake times out
                self._read_paused = True
            self._wake_hs()
            return
        node = self.node
        node.stats.bytes_received += nbytes
        ob = self.outbox
        if ob is not None:
            ob._hot = False  # Outbox.on_read, inline: an answer re-arms the direct write
        if msgs:
            dispatch = node._dispatch
            for m in msgs:
                dispatch(self, m)

    def eof_received(self):
        return False  # close the transport

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.outbox is not None:
            self.outbox.on_resume(self)

    def connection_lost(self, exc) -> None:
        if self._lost_called:
            return
        self._lost_called = True
        self.closed = True
        self.reader.close()
        if self._hs_waiter is not None and not self._hs_waiter.done():
            self._hs_waiter.set_exception(errors.PeerClosed("connection closed during handshake"))
        if not self._lost.done():
            self._lost.set_result(None)
        self.node._connection_lost(self)
        if self.queue is not None and self.node.closing:
            self.queue.cancel()

    # ------------------------------------------------------------------ dispatch
    def deliver(self, handler, msg, is_async: bool) -> None:
        """Run ``handler(msg)`` for a frame of this connection: at once (a sync handler with
        nothing queued), else behind the messages queued before it, so one connection's
        handlers always run in arrival order."""
        q = self.queue
        if is_async or (q is not None and len(q)):
            if q is None:
                q = self.queue = HandlerQueue(self, self.node._dispatcher.failed)
            q.put(handler, msg, self.node.loop)
        else:
            self.node._dispatcher.call(handler, msg)

    # ------------------------------------------------------------------ handshake I/O
    def _wake_hs(self) -> None:
        w = self._hs_waiter
        if w is not None and not w.done():
            try:
                data = self.reader.pop_handshake()
            except errors.HandshakeError as e:
                self.abort(e)
                return
            if data is not None:
                self._hs_waiter = None
                self.progressed = True
                w.set_result(data)

    async def recv_hs(self) -> dict:
        if self.closed:
            raise errors.PeerClosed("connection closed during handshake")
        data = self.reader.pop_handshake()
        if data is None:
            self._hs_waiter = self.node.loop.create_future()
            data = await self._hs_waiter
        self.progressed = True
        return hs_unpack(data)

    def pending_hello(self) -> dict | None:
        """The first handshake message if it arrived complete but the handshake has not taken
        it yet (from the reader's buffer, else peeked from the kernel without consuming it);
        None otherwise, and for TLS bytes still in the kernel (encrypted).  Lets admission
        tell a dialer this loop has not read yet from an idle socket."""
        if self.closed or self.transport is None or not self.reader.handshake or self.progressed:
            return None
        data = self.reader.unread()
        need = HS_PREFIX.size + HS_MAX
        if len(data) < need and not self.tls:
            data += _peek(self.transport, need - len(data))
        if len(data) < HS_PREFIX.size:
            return None
        (ln,) = HS_PREFIX.unpack_from(data)
        if not 0 < ln <= HS_MAX or len(data) < HS_PREFIX.size + ln:
            return None
        try:
            return hs_unpack(data[HS_PREFIX.size:HS_PREFIX.size + ln])
        except errors.HandshakeError:
            return None

    def send_hs(self, obj) -> None:
        if not self.closed:
            self.transport.write(hs_pack(obj))

    def start_frames(self, rank: int) -> None:
        """Authenticated: switch the reader to frames and process what is already buffered."""
        self.rank = rank
        try:
            msgs = self.reader.start_frames(rank)
        except errors.ProtocolError as e:
            self.abort(e)
            return
        for m in msgs:
            self.node._dispatch(self, m)
        if self._read_paused and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ closing
    def abort(self, err: BaseException | None) -> None:
        """Close now (drop unsent data) with a logged and counted reason."""
        if self.closed:
            return
        self.closed = True
        if err is not None:
            reason = getattr(err, "reason", type(err).__name__)
            self.close_reason = reason
            self.node.stats.rejected[reason] += 1
            rank = self.rank if self.rank is not None else self.expect_rank  # (dialing side: the one we want)
            who = f"rank {rank}" if rank is not None else self.source or str(self.peername)
            self.node._rlog.warning(who, f"closing connection: {reason}",
                                    "rank %s: closing connection from %s (rank %s): %s: %s",
                                    self.node.rank, self.peername, self.rank, reason, err)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)
