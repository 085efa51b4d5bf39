"""Where an outsider's connection waits before it proved a rank, and how many may.

Connections that have not authenticated yet (TLS handshakes included: with TLS the node accepts
plain TCP itself, :class:`TLSListener`, and upgrades it with ``loop.start_tls`` inside the
handshake timeout, so a TLS handshake in progress is counted like any other) are at most
``max_per_address`` per source IP and ``max_pending`` in total.  A new connection is never
refused for it: an old one makes room instead, from the address with the most (the one from
this address when its own limit is hit), oldest first, but never one whose hello for this
deployment already arrived (parsed, or still in the kernel:
:meth:`~.protocol.Connection.pending_hello`) while an idle one is left.  A connection whose
hello passed the checks leaves that budget for a second one, ``max_proving`` per address (at
least the world size: every rank may dial at once from one host) while it proves its rank.  So
a flood of idle or garbage sockets, even from a legitimate rank's own address, only evicts
itself, and a rank that dials in and answers promptly is not starved (issue 24: >= 99.9% of
handshakes under ~2,000 connections/s from one address).  An evicted connection is closed with
reason ``preauth_evicted`` (counted in ``stats.rejected``).
"""
from __future__ import annotations

import asyncio
import socket as _socket

from . import errors
from .handshake import PROTOCOL_VERSION, norm_addr

__all__ = ["Admission", "TLSListener"]


class Admission:
    """The unauthenticated connections of one node, by source address (module docstring)."""

    def __init__(self, node, *, max_per_address: int, max_pending: int, max_proving: int):
        self.node = node
        self.max_per_address = max_per_address
        self.max_pending = max_pending
        self.max_proving = max_proving
        self._idle: dict[str, dict] = {}     # source IP -> {accepted, hello not passed yet: None}
        self._proving: dict[str, dict] = {}  # source IP -> {Connection whose hello passed: None}
        self.pending = 0                     # both, in all

    def admit(self, conn) -> None:
        """Count an accepted connection (or a TLS handshake in progress: a :class:`TLSSlot`)
        as unauthenticated, evicting others to stay in bounds."""
        src = conn.source = conn.source or norm_addr(conn.peername)[0]
        group = self._idle.get(src)
        if group is not None and len(group) >= self.max_per_address:
            self._evict(group, "its address")
        if self.pending >= self.max_pending:
            if self._idle:  # the address holding the most slots pays
                self._evict(max(self._idle.values(), key=len), "in total")
            else:
                self._drop(next(iter(max(self._proving.values(), key=len))), "in total")
        self._idle.setdefault(src, {})[conn] = None  # (the eviction may have removed the group)
        self.pending += 1

    def promote(self, conn, rank: int) -> None:
        """``conn``'s hello passed every check: move it from its address's idle budget to the
        proving one (bounded by ``max_proving``; a full one drops its oldest connection
        claiming the same rank, else its oldest)."""
        group = self._idle.get(conn.source)
        if group is None or conn not in group:
            return
        del group[conn]
        if not group:
            del self._idle[conn.source]
        conn.claim = rank
        proving = self._proving.setdefault(conn.source, {})
        if len(proving) >= self.max_proving:
            victim = next((c for c in proving if c.claim == rank), None) or next(iter(proving))
            self._drop(victim, "its address (proving)")
            proving = self._proving.setdefault(conn.source, {})
        proving[conn] = None

    def done(self, conn) -> None:
        """``conn`` authenticated, failed or closed: it no longer counts."""
        for groups in (self._idle, self._proving):
            group = groups.get(conn.source)
            if group is not None and conn in group:
                del group[conn]
                self.pending -= 1
                if not group:
                    del groups[conn.source]
                return

    def _evict(self, group: dict, where: str) -> None:
        """Make room in one address's group: its oldest idle connection; one whose hello is
        here (read or still in the kernel: this loop has not got to it) only when none is idle,
        since a dialer sends its hello at once and a flood cannot fake one for this deployment."""
        victim = None
        for c in group:
            if not c.progressed and not self._hello_waiting(c):
                victim = c
                break
        if victim is None:
            victim = next((c for c in group if not c.progressed), None) or next(iter(group), None)
        if victim is not None:
            self._drop(victim, where)

    def _hello_waiting(self, conn) -> bool:
        if isinstance(conn, TLSSlot):
            return False  # a TLS handshake in progress: its bytes are encrypted
        h = conn.pending_hello()
        return h is not None and h.get("v") == PROTOCOL_VERSION and h.get("dep") == self.node.credentials.deployment

    def _drop(self, victim, where: str) -> None:
        self.done(victim)
        victim.abort(errors.PreauthEvicted(f"too many connections before authentication from {where}"))


class TLSSlot:
    """A TLS handshake in progress on the accepted side: counted before authentication."""

    progressed = False

    def __init__(self, node, peername):
        self.node, self.peername = node, peername
        self.source: str | None = None
        self.task: asyncio.Task | None = None

    def abort(self, err) -> None:
        if self.task is not None and not self.task.done():
            self.node.stats.rejected[err.reason] += 1
            self.node._rlog.warning(self.source, f"closing connection: {err.reason}",
                                    "rank %d: closing TLS handshake from %s: %s: %s",
                                    self.node.rank, self.peername, err.reason, err)
            self.task.cancel()


class TLSListener:
    """The TLS side's own accept loop: ``loop.create_server(ssl=)`` would hide the TLS
    handshakes in progress from :class:`Admission`.  ``connection(slot)``: a new
    :class:`~.protocol.Connection` for the socket that ``slot`` counted."""

    def __init__(self, node, admission: Admission, connection):
        self.node, self.admission, self._connection = node, admission, connection
        self._sock = None
        self._task: asyncio.Task | None = None
        self._slots: set[TLSSlot] = set()

    async def open(self, host: str, port: int, backlog: int) -> int:
        """Listen and start accepting; the port listened on."""
        loop = self.node.loop
        self._sock = await _listen_socket(loop, host, port, backlog)
        self._task = loop.create_task(self._accept())
        return self._sock.getsockname()[1]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for slot in list(self._slots):
            slot.task.cancel()
        if self._sock is not None:
            self._sock.close()

    async def _accept(self) -> None:
        node = self.node
        loop = node.loop
        while not node.closing:
            try:
                sock, addr = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                node._rlog.warning("accept", f"accept failed: {type(e).__name__}",
                                   "rank %d: accept failed: %r", node.rank, e)
                await asyncio.sleep(0.1)
                continue
            slot = TLSSlot(node, addr)
            self._slots.add(slot)
            self.admission.admit(slot)
            slot.task = loop.create_task(self._accept_one(slot, sock))

    async def _accept_one(self, slot: TLSSlot, sock) -> None:
        node = self.node
        try:
            await node.loop.connect_accepted_socket(
                lambda: self._connection(slot), sock, ssl=node.ssl_server,
                ssl_handshake_timeout=node.handshake_timeout)
        except asyncio.CancelledError:
            pass  # evicted or closing; the loop closed the socket
        except Exception as e:
            err = errors.TLSHandshakeError(f"TLS handshake failed: {type(e).__name__}: {e}"[:200])
            node.stats.rejected[err.reason] += 1
            node._rlog.warning(slot.source, f"closing connection: {err.reason}",
                               "rank %d: closing connection from %s: %s: %s", node.rank, slot.peername, err.reason, err)
        finally:
            self.admission.done(slot)
            self._slots.discard(slot)


async def _listen_socket(loop, host: str, port: int, backlog: int):
    infos = await loop.getaddrinfo(host or None, port, type=_socket.SOCK_STREAM, flags=_socket.AI_PASSIVE)
    if not infos:
        raise errors.ConfigError(f"cannot listen on {host}:{port}")
    family, _, _, _, addr = infos[0]
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
