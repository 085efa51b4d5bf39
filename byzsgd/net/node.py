"""Where a process joins the cluster: one ``Node`` per process, one connection per peer.

A node listens on its own address, dials every peer of *lower* rank whose role it exchanges
messages with (``peer_roles``; the higher rank dials, so a pair never ends up with two connections), reconnects with exponential backoff for as long as it
runs, authenticates every connection's *rank* (:mod:`.handshake`, :mod:`.credentials`), refuses a
second live connection for a rank, and dispatches received frames to the handler registered for
their kind.  Sending goes
through a bounded per-peer outbox (:mod:`.outbox`) and never blocks the caller.

Threading: everything runs on the event loop that called :meth:`Node.start`; call ``send`` /
``broadcast`` from that loop.

Error contract: a misbehaving peer (malformed frame, unknown kind, bad HMAC, duplicate rank...)
only ever costs its own connection: it is closed with a reason logged on ``byzsgd.net`` and
counted in ``node.stats.rejected[reason]``.  A handler that raises never kills the node: it is
counted in ``stats.failures["handler:<kind>:<ExceptionType>"]`` (and the total in
``stats.handler_errors``) and logged once per such reason; the same holds for any failure of the
dispatch path itself (``"dispatch:<ExceptionType>"``).  Configuration mistakes raise
:class:`byzsgd.errors.ConfigError` in the constructor.

Outsiders: connections that have not authenticated yet (TLS handshakes included: the listener
accepts plain TCP and upgrades it with ``loop.start_tls`` inside the handshake timeout) are at
most ``max_preauth_per_address`` per source IP and ``max_pending_handshakes`` in total.  A new
connection is never refused for it: an old one makes room instead, from the address with the most
(the one from this address when its own limit is hit), oldest first, but never one whose hello
for this deployment already arrived (parsed, or still in the kernel: :meth:`Connection.pending_hello`)
while an idle one is left.  A connection whose hello passed the checks leaves that budget for a
second one, ``max_proving_per_address`` (at least the world size: every rank may dial at once
from one host) while it proves its rank.  So a flood of idle or garbage sockets, even from a
legitimate rank's own address, only evicts itself, and a rank that dials in and answers promptly
is not starved (issue 24: >= 99.9% of handshakes under ~2,000 connections/s from one address).
A refusal sent before the dialer's proof passed is a bare reason code (:func:`.handshake.refusal`).

Logging: what peers cause (refused or closed connections, reconnects) goes through a
:class:`~.ratelog.RateLog` keyed by (peer or address, reason): a few lines per key and interval,
then one "suppressed N similar lines" count, so nobody can make a node's log grow without bound.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random
import socket as _socket
import ssl as _ssl
from dataclasses import dataclass, field
from typing import Callable, Iterable


import torch

from . import errors
from .bufpool import BufferPool
from .frame import FrameLimits, Message, encode
from .credentials import RankCredentials
from .handshake import (PROTOCOL_VERSION, channel_binding, check_hello_fields, mac, new_nonce, norm_addr,
                        refusal, transcript, verify)
from .outbox import Outbox
from .peers import PeerDirectory, role_of
from .protocol import Connection
from .quorum import Mailbox
from .ratelog import RateLog
from .rendezvous import Rendezvous
from .staging import DeviceStaging, PinnedBytes, Staged, needs_staging

__all__ = ["Node", "NodeStats"]

log = logging.getLogger("byzsgd.net")

ROLES = ("ps", "worker")


@dataclass
class NodeStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    dropped: int = 0          # sends dropped by an outbox overflow
    handler_errors: int = 0
    connects: int = 0         # authenticated connections made (both directions)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    # contained local failures by stable reason: "handler:<kind>:<Exc>", "dispatch:<Exc>"
    failures: collections.Counter = field(default_factory=collections.Counter)
    # what a member sent that was refused, the connection kept: by "<reason>:<kind>" in
    # ``refused`` and by "<reason>:<kind>:<sender>" in ``refused_from`` (``refuse``)
    refused: collections.Counter = field(default_factory=collections.Counter)
    refused_from: collections.Counter = field(default_factory=collections.Counter)

    def refuse(self, reason: str, kind: str, sender: int) -> None:
        """Count one refusal: reason ``"sender"`` (a kind the sender may not send, see
        Node.on(senders=...)) or a role's (``"meta.<field>"``: a field it refused).  The keys
        are bounded: registered kinds, authenticated ranks.  The run summary's ``rejections``
        show ``refused_from`` (roles/base.py, deploy/rundir.py)."""
        self.refused[f"{reason}:{kind}"] += 1
        self.refused_from[f"{reason}:{kind}:{sender}"] += 1


class Node:
    """A cluster member.  See the module docstring and docs/design.md §4.

    Give either ``directory`` (every rank's address is known: the node listens on its own
    directory port) or ``master=(host, port)`` with ``world_size`` and ``num_ps`` (rendezvous:
    rank 0 listens on the master port, the others on ``listen_port``, 0 = ephemeral, and
    register ``advertise_host`` or, by default, the address they reach the master from).
    ``secret`` is this rank's :class:`~byzsgd.net.credentials.RankCredentials` (the pair keys
    that prove its rank), or, legacy/dev mode, ``bytes`` taken as the operator secret from which
    this node derives its own credentials (every node then holds every key: membership, not rank,
    is proven; see :mod:`.credentials`).
    ``ssl_server``/``ssl_client`` add TLS under the HMAC handshake (which binds the TLS channel).
    ``bind_address`` (plain TCP): refuse a dialer that reached this node through another address
    (a relay); turn off behind NAT/port mapping, and use TLS there.  ``max_preauth_per_address``
    bounds unauthenticated connections per source IP that have not sent a hello for this deployment
    (see the module docstring; at ~2,000 connections/s from one address, 32 give a dialer sharing
    that address 16 ms to get its hello out, which 8 (4 ms) did not always).  ``outbox_depth`` bounds the
    messages queued per peer (overflow drops the oldest).  ``pool_bytes`` bounds the receive
    buffers kept for reuse (default: 4 frames of the maximum size).

    Typical use::

        node = Node(rank, role, resolve_secret(args.secret), directory=d,
                    limits=FrameLimits.for_model(num_params))
        grads = node.mailbox("grad", shapes=[(num_params,)])
        await node.start()
        node.broadcast(d.worker_ranks, "model", t, [model_vec.clone()])
        got = await grads.collect(t, q_w)          # {sender: Message}
        ...; [m.release() for m in got.values()]
        await node.close()
    """

    BACKOFF_MIN = 0.05
    BACKOFF_MAX = 2.0

    def __init__(self, rank: int, role: str, secret: bytes, *, directory: PeerDirectory | None = None,
                 master: tuple[str, int] | None = None, world_size: int | None = None,
                 num_ps: int | None = None, limits: FrameLimits, listen_host: str = "0.0.0.0",
                 advertise_host: str | None = None, listen_port: int = 0,
                 ssl_server: _ssl.SSLContext | None = None, ssl_client: _ssl.SSLContext | None = None,
                 connect_timeout: float = 5.0, handshake_timeout: float = 5.0, outbox_depth: int = 16,
                 pool_bytes: int | None = None, bind_address: bool = True, max_preauth_per_address: int = 32,
                 device=None, peer_roles: Iterable[str] | None = None):
        C = errors.ConfigError
        if type(rank) is not int or rank < 0:
            raise C(f"rank must be a non-negative int, got {rank!r}")
        if role not in ROLES:
            raise C(f"role must be one of {ROLES}, got {role!r}")
        if isinstance(secret, str):
            raise C("secret must be bytes (encode the --secret / BYZSGD_SECRET string first)")
        if isinstance(secret, RankCredentials):
            if secret.rank != rank:
                raise C(f"the credentials are rank {secret.rank}'s, this node is rank {rank}")
        elif not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
            raise C("credentials (RankCredentials) or a non-empty cluster secret (bytes) are required: "
                    "pass --secret or set BYZSGD_SECRET")
        if type(max_preauth_per_address) is not int or max_preauth_per_address < 1:
            raise C(f"max_preauth_per_address must be an int >= 1, got {max_preauth_per_address!r}")
        if not isinstance(limits, FrameLimits):
            raise C(f"limits must be a FrameLimits, got {type(limits).__name__}")
        if (directory is None) == (master is None):
            raise C("give exactly one of directory= (static peer list) or master= (rendezvous)")
        for name, v in (("connect_timeout", connect_timeout), ("handshake_timeout", handshake_timeout)):
            if not isinstance(v, (int, float)) or not v > 0:
                raise C(f"{name} must be a positive number of seconds, got {v!r}")
        if type(outbox_depth) is not int or outbox_depth < 1:
            raise C(f"outbox_depth must be an int >= 1, got {outbox_depth!r}")
        if ssl_server is not None and not isinstance(ssl_server, _ssl.SSLContext):
            raise C("ssl_server must be an ssl.SSLContext")
        if ssl_client is not None and not isinstance(ssl_client, _ssl.SSLContext):
            raise C("ssl_client must be an ssl.SSLContext")
        if type(listen_port) is not int or not 0 <= listen_port <= 65535:
            raise C(f"listen_port must be in [0, 65535], got {listen_port!r}")
        if directory is not None:
            if not isinstance(directory, PeerDirectory):
                raise C("directory must be a PeerDirectory")
            if rank not in directory:
                raise C(f"rank {rank} is not in the directory (world size {directory.world_size})")
            if world_size is not None and world_size != directory.world_size:
                raise C(f"world_size={world_size} but the directory has {directory.world_size} ranks")
            if num_ps is not None and num_ps != directory.num_ps:
                raise C(f"num_ps={num_ps} but the directory has {directory.num_ps} servers")
            world_size, num_ps = directory.world_size, directory.num_ps
        else:
            try:
                mhost, mport = master
            except (TypeError, ValueError):
                raise C(f"master must be (host, port), got {master!r}") from None
            if not isinstance(mhost, str) or not mhost or type(mport) is not int or not 1 <= mport <= 65535:
                raise C(f"master must be (host, port 1..65535), got {master!r}")
            if type(world_size) is not int or world_size < 1:
                raise C("rendezvous through a master needs world_size (an int >= 1)")
            if type(num_ps) is not int or not 0 <= num_ps <= world_size:
                raise C(f"rendezvous needs num_ps in [0, world_size], got {num_ps!r}")
            if rank >= world_size:
                raise C(f"rank {rank} >= world_size {world_size}")
        if role != role_of(rank, num_ps):
            raise C(f"rank {rank} is a {role_of(rank, num_ps)} (ranks < num_ps={num_ps} are PS), not a {role}")
        self.rank, self.role = rank, role
        if isinstance(secret, RankCredentials):
            if secret.world_size != world_size:
                raise C(f"the credentials are for a world of {secret.world_size}, this one has {world_size}")
            self.credentials, self.legacy_secret = secret, False
        else:
            if len(secret) < 16:
                log.warning("rank %d: the cluster secret is only %d bytes; use 16+ random bytes", rank, len(secret))
            self.credentials, self.legacy_secret = RankCredentials.derive(bytes(secret), rank, world_size), True
        self.bind_address = bool(bind_address)
        self.max_preauth_per_address = max_preauth_per_address
        self.world_size, self.num_ps = world_size, num_ps
        self.limits = limits
        self.listen_host, self.advertise_host, self.listen_port = listen_host, advertise_host, listen_port
        self.master = master
        self.ssl_server, self.ssl_client = ssl_server, ssl_client
        self.connect_timeout, self.handshake_timeout = float(connect_timeout), float(handshake_timeout)
        self.outbox_depth = outbox_depth
        # the roles this node exchanges messages with (None: all): it dials only lower ranks of
        # those roles and refuses dialers of the others -- two workers have nothing to say to
        # each other, so 100 workers need not hold 4,950 authenticated connections among them
        self.peer_roles = None if peer_roles is None else frozenset(peer_roles)
        if self.peer_roles is not None and not self.peer_roles <= {"ps", "worker"}:
            raise C(f"peer_roles must be a subset of {{'ps', 'worker'}}, got {sorted(self.peer_roles)}")
        pool_bytes = pool_bytes if pool_bytes is not None else max(4 * limits.max_frame_bytes, 64 << 20)
        # a node computing on CUDA sends device tensors through pinned staging buffers and
        # receives into pinned buffers (.staging); on the CPU nothing changes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            self.staging = DeviceStaging(self.device)
            self.pool = BufferPool(pool_bytes, allocate=PinnedBytes.allocate)
        else:
            self.staging = None
            self.pool = BufferPool(pool_bytes)
        self.stats = NodeStats()
        self._directory = directory
        self._kinds: dict[str, list | None] = {}
        self._handlers: dict[str, tuple[Callable, bool]] = {}
        self._senders: dict[str, str | frozenset] = {}
        self._mailboxes: list[Mailbox] = []
        self._peers: dict[int, Outbox] = {}
        self._conns: dict[int, Connection] = {}
        self._connections: set[Connection] = set()
        self._dialers: dict[int, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._conn_waiters: set[asyncio.Future] = set()
        self._server = None
        self._lsock = None           # TLS listener socket (our own accept loop)
        self._accept_task: asyncio.Task | None = None
        self._tls_slots: set = set()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False
        self.max_pending_handshakes = 64 + 4 * world_size
        # legitimate dialers from one host prove their rank at once: up to world_size - 1 of them
        self.max_proving_per_address = max(max_preauth_per_address, world_size)
        self._preauth: dict[str, dict] = {}  # source IP -> {unauthenticated accepted Connection: None}
        self._proving: dict[str, dict] = {}  # source IP -> {Connection whose hello passed: None}
        self._npreauth = 0                   # both, in all
        self._rlog = RateLog(log, f"rank {rank}: ")  # what peers cause is logged rate-limited
        self._logged_failures: set[str] = set()
        self._rdv: Rendezvous | None = Rendezvous(self) if directory is None else None
        if self._rdv is not None:
            self._rdv.register_kinds()

    # ------------------------------------------------------------------ registration
    def on(self, kind: str, handler: Callable, *, shapes: list[tuple[int, ...]] | None = None,
           senders: str | Iterable[int] | None = None) -> None:
        """Route frames of ``kind`` to ``handler(msg)`` (sync or ``async def``).  Handlers run on
        the loop in arrival order per connection; the handler owns ``msg`` (``msg.release()``
        when done with its tensors).  ``shapes``: the exact shapes every frame of this kind must
        carry (else the frame is a violation).  ``senders``: who may send this kind, a role
        (``"ps"``/``"worker"``: the ranks of that role) or a collection of ranks; a frame from
        anyone else never reaches the handler: it is released and counted in
        ``stats.refused["sender:<kind>"]`` (the connection stays: the sender is a member that
        may legitimately send other kinds).  Register before :meth:`start`."""
        self._register(kind, handler, shapes, internal=False, senders=senders)

    def _register(self, kind, handler, shapes, *, internal: bool, senders=None) -> None:
        if self._started:
            raise errors.ConfigError(f"register kind {kind!r} before start()")
        if not isinstance(kind, str) or not kind or len(kind) > 64:
            raise errors.ConfigError(f"kind must be a non-empty str of at most 64 chars, got {kind!r}")
        if kind.startswith("__") and not internal:
            raise errors.ConfigError(f"kinds starting with '__' are reserved, got {kind!r}")
        if kind in self._handlers:
            raise errors.ConfigError(f"a handler for kind {kind!r} is already registered")
        if not callable(handler):
            raise errors.ConfigError("handler must be callable")
        if shapes is not None:
            try:
                shapes = [tuple(int(d) for d in s) for s in shapes]
            except (TypeError, ValueError):
                raise errors.ConfigError(f"shapes must be a list of int tuples, got {shapes!r}") from None
            if len(shapes) > self.limits.max_tensors:
                raise errors.ConfigError(f"{len(shapes)} shapes > limits.max_tensors={self.limits.max_tensors}")
        if senders is not None:
            if isinstance(senders, str):
                if senders not in ROLES:
                    raise errors.ConfigError(f"senders must be one of {ROLES} or ranks, got {senders!r}")
            else:
                try:
                    senders = frozenset(int(r) for r in senders)
                except (TypeError, ValueError):
                    raise errors.ConfigError(f"senders must be a role or ranks, got {senders!r}") from None
            self._senders[kind] = senders
        self._kinds[kind] = shapes
        self._handlers[kind] = (handler, inspect.iscoroutinefunction(handler))

    def _may_send(self, kind: str, sender: int) -> bool:
        """Whether ``sender`` may send ``kind`` (see :meth:`on`); counts a refusal."""
        allowed = self._senders.get(kind)
        if allowed is None:
            return True
        if isinstance(allowed, str):
            ok = type(sender) is int and 0 <= sender < self.world_size and role_of(sender, self.num_ps) == allowed
        else:
            ok = sender in allowed
        if not ok:
            self.stats.refuse("sender", kind, sender)
        return ok

    def mailbox(self, kind: str, *, window: int = 8, shapes=None, senders=None,
                role: str | None = None) -> Mailbox:
        """Register a handler that files every ``kind`` message into a new :class:`Mailbox`
        (``senders``: the ranks it accepts; ``role``: only ranks of that role may send it, see
        :meth:`on`)."""
        mb = Mailbox(kind, window=window, senders=senders)
        self.on(kind, mb.deliver, shapes=shapes, senders=role if role is not None else senders)
        self._mailboxes.append(mb)
        return mb

    # ------------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the node is not listening yet: await start() first")
        return self._port

    @property
    def directory(self) -> PeerDirectory:
        if self._directory is None:
            raise RuntimeError("the directory is not known yet (rendezvous not complete)")
        return self._directory

    @property
    def connected(self) -> set[int]:
        return {r for r, c in self._conns.items() if not c.closed}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, *, timeout: float | None = None) -> None:
        """Listen, start the dialers, and (rendezvous mode) return once the directory is complete.
        ``timeout`` bounds the rendezvous wait (:class:`errors.RendezvousError`)."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        self._loop = asyncio.get_running_loop()
        if self._directory is not None:
            port = self._directory[self.rank][1]
        elif self.rank == 0:
            port = self.master[1]
        else:
            port = self.listen_port
        backlog = max(128, 4 * self.world_size)
        if self.ssl_server is None:
            self._server = await self._loop.create_server(
                lambda: Connection(self), host=self.listen_host, port=port, reuse_address=True, backlog=backlog)
            self._port = self._server.sockets[0].getsockname()[1]
        else:
            # TLS: our own accept loop, so that a TLS handshake in progress is counted and evicted
            # like any unauthenticated connection (create_server(ssl=) hides them from us).
            self._lsock = await _listen_socket(self._loop, self.listen_host, port, backlog)
            self._port = self._lsock.getsockname()[1]
            self._accept_task = self._loop.create_task(self._accept_tls())
        log.info("rank %d (%s) listening on %s:%d", self.rank, self.role, self.listen_host, self._port)
        if self._directory is not None:
            self._set_directory(self._directory)
        else:
            await self._rdv.run(timeout)

    def _set_directory(self, directory: PeerDirectory) -> None:
        self._directory = directory
        for r in directory:
            if r != self.rank and r not in self._peers:
                self._peers[r] = Outbox(r, self.outbox_depth, self.stats)
            if r < self.rank and r not in self._dialers and not self._closing and self._talks_to(r):
                self._dialers[r] = self._loop.create_task(self._dial_loop(r))

    def _talks_to(self, rank: int) -> bool:
        return self.peer_roles is None or role_of(rank, self.num_ps) in self.peer_roles

    def _address(self, rank: int) -> tuple[str, int]:
        if self._directory is not None and rank in self._directory:
            return self._directory[rank]
        if rank == 0 and self.master is not None:
            return self.master
        raise errors.UnknownPeer(f"no address for rank {rank}")

    async def close(self, *, drain_timeout: float = 0.0) -> None:
        """Close everything (idempotent): dialers, listener, connections, outboxes (pending send
        futures resolve False), mailboxes (pending collects are cancelled).

        ``drain_timeout`` > 0: first let the outboxes of the connected peers flush what is
        queued (a final model, a ``done``), for at most that many seconds; messages to peers
        that are not connected are not waited for."""
        if self._closing:
            return
        if drain_timeout and drain_timeout > 0 and self._loop is not None:
            await self._drain(drain_timeout)
        self._closing = True
        for t in list(self._dialers.values()) + list(self._tasks):
            t.cancel()
        if self._rdv is not None:
            self._rdv.close()
        if self._server is not None:
            self._server.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
        for slot in list(self._tls_slots):
            slot.task.cancel()
        if self._lsock is not None:
            self._lsock.close()
        conns = list(self._connections)
        for c in conns:
            c.close()
        for ob in self._peers.values():
            ob.close()
        for mb in self._mailboxes:
            mb.cancel()
        for f in self._conn_waiters:
            if not f.done():
                f.set_result(None)
        pending = [t for t in list(self._dialers.values()) + list(self._tasks) if not t.done()]
        waits = [c.wait_closed() for c in conns if c.transport is not None]
        if pending or waits:
            await asyncio.wait([*pending, *[asyncio.ensure_future(w) for w in waits]], timeout=2.0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass
        self.pool.clear()
        if self.staging is not None:
            self.staging.close()
        self._rlog.flush()

    def _undrained(self) -> list[int]:
        """The connected peers whose outbox still holds (or is writing) a message."""
        out = []
        for r, ob in self._peers.items():
            c = self._conns.get(r)
            if c is None or c.closed or c.transport is None:
                continue
            if len(ob) or ob.busy or c.transport.get_write_buffer_size():
                out.append(r)
        return out

    async def _drain(self, timeout: float) -> None:
        loop = self._loop
        deadline = loop.time() + timeout
        while self._undrained() and loop.time() < deadline:
            await asyncio.sleep(0.005)  # bounded: at most ``timeout``, only at shutdown
        if not self._undrained():
            # what the transports hold went to the kernel; give it a moment on the wire
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ connecting
    async def _dial_loop(self, rank: int) -> None:
        backoff = self.BACKOFF_MIN
        loop = self._loop
        while not self._closing:
            conn = None
            try:
                host, port = self._address(rank)
                _, conn = await asyncio.wait_for(loop.create_connection(
                    lambda: Connection(self, expect_rank=rank), host, port, ssl=self.ssl_client,
                    server_hostname=host if self.ssl_client is not None else None,
                    ssl_handshake_timeout=self.handshake_timeout if self.ssl_client else None),
                    self.connect_timeout)
                await asyncio.wait_for(self._dial_handshake(conn), self.handshake_timeout)
            except asyncio.CancelledError:
                if conn is not None:
                    conn.close()
                raise
            except errors.HandshakeError as e:
                if conn is not None and not conn.closed:
                    conn.abort(e)
                else:  # the listener closed first: still count the refusal here
                    self.stats.rejected[e.reason] += 1
                self._rlog.info(f"rank {rank}", f"handshake failed: {e.reason}",
                                "rank %d: handshake with rank %d failed: %s", self.rank, rank, e)
            except (OSError, asyncio.TimeoutError, errors.NetError, _ssl.SSLError) as e:
                if conn is not None:
                    conn.close()
                log.debug("rank %d: cannot reach rank %d yet: %r", self.rank, rank, e)
            except Exception as e:  # never let a dialer die
                if conn is not None:
                    conn.close()
                self._rlog.log(logging.ERROR, f"rank {rank}", f"dial error: {type(e).__name__}",
                               "rank %d: unexpected error dialing rank %d: %r", self.rank, rank, e, exc_info=e)
            else:
                backoff = self.BACKOFF_MIN
                await conn.wait_closed()
                if not self._closing:
                    self._rlog.info(f"rank {rank}", "reconnecting",
                                    "rank %d: connection to rank %d lost; reconnecting", self.rank, rank)
                continue
            if self._closing:
                break
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.BACKOFF_MAX)

    async def _dial_handshake(self, conn: Connection) -> None:
        want = conn.expect_rank
        cred = self.credentials
        key = cred.key(want)
        nonce_d = new_nonce()
        to = norm_addr(conn.transport.get_extra_info("peername"))
        binding = channel_binding(conn.transport)
        conn.send_hs({"v": PROTOCOL_VERSION, "dep": cred.deployment, "role": self.role, "rank": self.rank,
                      "want": want, "nonce": nonce_d, "to": to})
        reply = await conn.recv_hs()
        h = check_hello_fields(reply, dialer=False)
        if h.dep != cred.deployment:
            raise errors.DeploymentMismatch(f"rank {want} is in deployment {h.dep[:16]!r}, this is {cred.deployment!r}")
        if h.rank != want or h.role != role_of(want, self.num_ps):
            raise errors.BadRank(f"dialed rank {want} but reached rank {h.rank} ({h.role})")
        tr = transcript(cred.deployment, self.role, self.rank, nonce_d, h.role, h.rank, h.nonce, to, binding)
        verify(key, True, tr, reply.get("mac"))
        conn.send_hs({"mac": mac(key, False, tr)})
        ok = await conn.recv_hs()
        if ok.get("ok") is not True:
            check_hello_fields(ok, dialer=False)  # raises the peer's refusal
            raise errors.HandshakeError("no ok from the listener")
        self._attach(conn, h.rank, h.role)

    async def _serve_handshake(self, conn: Connection) -> None:
        cred = self.credentials
        try:
            async with asyncio.timeout(self.handshake_timeout):
                hello = await conn.recv_hs()
                conn.progressed = True
                try:
                    h = check_hello_fields(hello, dialer=True)
                    if h.dep != cred.deployment:
                        raise errors.DeploymentMismatch(
                            f"the dialer is in deployment {h.dep[:16]!r}, this is {cred.deployment!r}")
                    self._check_inbound(h.rank, h.role, h.want)
                    if not conn.tls and self.bind_address:
                        here = norm_addr(conn.transport.get_extra_info("sockname"))
                        if h.to != here:
                            raise errors.AddressMismatch(
                                f"the dialer reached {h.to[0][:64]}:{h.to[1]}, this socket is {here[0]}:{here[1]}")
                except (errors.VersionMismatch, errors.BadRank, errors.DeploymentMismatch,
                        errors.AddressMismatch) as e:
                    conn.send_hs(refusal(e))  # a code: the details (ids, ranks) stay in our log
                    raise e
                self._promote(conn, h.rank)
                key = cred.key(h.rank)
                nonce_l = new_nonce()
                tr = transcript(cred.deployment, h.role, h.rank, h.nonce, self.role, self.rank, nonce_l, h.to,
                                channel_binding(conn.transport))
                conn.send_hs({"v": PROTOCOL_VERSION, "dep": cred.deployment, "role": self.role, "rank": self.rank,
                              "nonce": nonce_l, "mac": mac(key, True, tr)})
                reply = await conn.recv_hs()
                verify(key, False, tr, reply.get("mac"))
                old = self._conns.get(h.rank)
                if old is not None and not old.closed:
                    err = errors.DuplicateRank(f"rank {h.rank} already has a live connection")
                    conn.send_hs(refusal(err))
                    raise err
                conn.send_hs({"ok": True})
                self._attach(conn, h.rank, h.role)
        except (TimeoutError, asyncio.TimeoutError):
            conn.abort(errors.HandshakeTimeout(f"no complete handshake within {self.handshake_timeout}s"))
        except errors.HandshakeError as e:
            conn.abort(e)
        except errors.PeerClosed:
            pass
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:
            self._rlog.log(logging.ERROR, conn.source, f"handshake error: {type(e).__name__}",
                           "rank %d: unexpected handshake error: %r", self.rank, e, exc_info=e)
            conn.abort(errors.HandshakeError(repr(e)))
        finally:
            if conn.rank is None:
                self._preauth_done(conn)

    # ------------------------------------------------------------------ before authentication
    def _admit(self, conn) -> None:
        """Count an accepted connection (or a TLS handshake in progress: a :class:`_TLSSlot`)
        as unauthenticated, evicting others to stay in bounds."""
        src = conn.source = conn.source or norm_addr(conn.peername)[0]
        group = self._preauth.get(src)
        if group is not None and len(group) >= self.max_preauth_per_address:
            self._evict(group, "its address")
        if self._npreauth >= self.max_pending_handshakes:
            if self._preauth:  # the address holding the most slots pays
                self._evict(max(self._preauth.values(), key=len), "in total")
            else:
                self._drop(next(iter(max(self._proving.values(), key=len))), "in total")
        self._preauth.setdefault(src, {})[conn] = None  # (the eviction may have removed the group)
        self._npreauth += 1

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
        if not isinstance(conn, Connection):
            return False  # a TLS handshake in progress: its bytes are encrypted
        h = conn.pending_hello()
        return h is not None and h.get("v") == PROTOCOL_VERSION and h.get("dep") == self.credentials.deployment

    def _drop(self, victim, where: str) -> None:
        self._preauth_done(victim)
        victim.abort(errors.PreauthEvicted(f"too many connections before authentication from {where}"))

    def _promote(self, conn: Connection, rank: int) -> None:
        """``conn``'s hello passed every check: move it from its address's idle budget to the
        proving one (bounded by ``max_proving_per_address``; a full one drops its oldest
        connection claiming the same rank, else its oldest)."""
        group = self._preauth.get(conn.source)
        if group is None or conn not in group:
            return
        del group[conn]
        if not group:
            del self._preauth[conn.source]
        conn.claim = rank
        proving = self._proving.setdefault(conn.source, {})
        if len(proving) >= self.max_proving_per_address:
            victim = next((c for c in proving if c.claim == rank), None) or next(iter(proving))
            self._drop(victim, "its address (proving)")
            proving = self._proving.setdefault(conn.source, {})
        proving[conn] = None

    def _preauth_done(self, conn) -> None:
        for groups in (self._preauth, self._proving):
            group = groups.get(conn.source)
            if group is not None and conn in group:
                del group[conn]
                self._npreauth -= 1
                if not group:
                    del groups[conn.source]
                return

    def _pending_handshakes(self) -> int:
        return self._npreauth

    async def _accept_tls(self) -> None:
        loop = self._loop
        while not self._closing:
            try:
                sock, addr = await loop.sock_accept(self._lsock)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                self._rlog.warning("accept", f"accept failed: {type(e).__name__}",
                                   "rank %d: accept failed: %r", self.rank, e)
                await asyncio.sleep(0.1)
                continue
            slot = _TLSSlot(self, addr)
            self._tls_slots.add(slot)
            self._admit(slot)
            slot.task = loop.create_task(self._tls_accept_one(slot, sock))

    async def _tls_accept_one(self, slot: "_TLSSlot", sock) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: Connection(self, tls_slot=slot), sock, ssl=self.ssl_server,
                ssl_handshake_timeout=self.handshake_timeout)
        except asyncio.CancelledError:
            pass  # evicted or closing; the loop closed the socket
        except Exception as e:
            err = errors.TLSHandshakeError(f"TLS handshake failed: {type(e).__name__}: {e}"[:200])
            self.stats.rejected[err.reason] += 1
            self._rlog.warning(slot.source, f"closing connection: {err.reason}",
                               "rank %d: closing connection from %s: %s: %s", self.rank, slot.peername, err.reason, err)
        finally:
            self._preauth_done(slot)
            self._tls_slots.discard(slot)

    def _check_inbound(self, rank: int, role: str, want) -> None:
        if want != self.rank:
            raise errors.BadRank(f"the dialer wants rank {want!r}, this is rank {self.rank}")
        if rank >= self.world_size:
            raise errors.BadRank(f"rank {rank} outside the world of {self.world_size}")
        if role != role_of(rank, self.num_ps):
            raise errors.BadRank(f"rank {rank} claims role {role}, but is a {role_of(rank, self.num_ps)}")
        if rank <= self.rank:
            raise errors.BadRank(f"rank {rank} dialed rank {self.rank}: only higher ranks dial lower ones")
        if not self._talks_to(rank):
            raise errors.BadRank(f"rank {rank} ({role}) dialed rank {self.rank} ({self.role}), which exchanges "
                                 f"messages only with {'/'.join(sorted(self.peer_roles))} nodes")

    def _attach(self, conn: Connection, rank: int, role: str) -> None:
        self._preauth_done(conn)
        old = self._conns.get(rank)
        if old is not None and not old.closed:
            raise errors.DuplicateRank(f"rank {rank} already has a live connection")
        if self._closing:
            raise errors.PeerClosed("node closing")
        conn.role = role
        self._conns[rank] = conn
        self.stats.connects += 1
        ob = self._peers.get(rank)
        if ob is None:
            ob = self._peers[rank] = Outbox(rank, self.outbox_depth, self.stats)
        conn.start_frames(rank)
        if conn.closed:
            return
        ob.attach(conn)
        self._rlog.info(f"rank {rank}", "connected", "rank %d: connected to rank %d (%s) at %s",
                        self.rank, rank, role, conn.peername)
        for f in self._conn_waiters:
            if not f.done():
                f.set_result(None)
        if self._rdv is not None:
            self._rdv.on_connect(conn)

    def _connection_lost(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self._preauth_done(conn)
        r = conn.rank
        if r is not None and self._conns.get(r) is conn:
            del self._conns[r]
            ob = self._peers.get(r)
            if ob is not None:
                ob.detach(conn)
        if conn._dispatch_task is not None and not conn._dispatch_task.done() and self._closing:
            conn._dispatch_task.cancel()

    async def wait_connected(self, ranks: Iterable[int], timeout: float) -> set[int]:
        """Wait until every rank in ``ranks`` is connected or ``timeout`` passes; returns the
        connected subset (never raises on timeout)."""
        want = set(ranks)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closing:
            have = want & self.connected
            left = deadline - loop.time()
            if have == want or left <= 0:
                return have
            f = loop.create_future()
            self._conn_waiters.add(f)
            try:
                await asyncio.wait([f], timeout=left)
            finally:
                self._conn_waiters.discard(f)
        return want & self.connected

    # ------------------------------------------------------------------ receiving
    def _dispatch(self, conn: Connection, msg: Message) -> None:
        try:
            self._dispatch_one(conn, msg)
        except Exception as e:  # the dispatch path itself must never take the node down
            msg.release()
            self._failed(f"dispatch:{type(e).__name__}", e, msg)

    def _dispatch_one(self, conn: Connection, msg: Message) -> None:
        self.stats.frames_received += 1
        entry = self._handlers.get(msg.kind)
        if entry is None:  # cannot happen for frames (the decoder checks kinds); local sends
            msg.release()
            return
        handler, is_async = entry
        if not self._may_send(msg.kind, msg.sender):
            msg.release()
            return
        if is_async or conn._dispatch_q:
            if conn._dispatch_q is None:
                conn._dispatch_q = collections.deque()
            conn._dispatch_q.append((handler, msg))
            if conn._dispatch_task is None or conn._dispatch_task.done():
                conn._dispatch_task = self._loop.create_task(self._drain_dispatch(conn))
            if len(conn._dispatch_q) >= 8 and conn.transport is not None and not conn.closed:
                conn.transport.pause_reading()  # slow async handlers push back on the sender
                conn._dispatch_paused = True
            return
        self._call(handler, msg)

    def _failed(self, reason: str, exc: BaseException, msg: Message | None) -> None:
        """Count a contained failure under ``reason``; log it in full once per reason."""
        self.stats.failures[reason] += 1
        if reason.startswith("handler:"):
            self.stats.handler_errors += 1
        where = f" (message {msg.kind!r} from rank {msg.sender}, step {msg.step})" if msg is not None else ""
        if reason not in self._logged_failures:
            self._logged_failures.add(reason)
            log.error("rank %d: %s%s; contained, counted in stats.failures[%r] (logged once)",
                      self.rank, reason, where, reason, exc_info=exc)
        else:
            log.debug("rank %d: %s%s: %r", self.rank, reason, where, exc)

    def _call(self, handler, msg) -> None:
        try:
            r = handler(msg)
            if r is not None and inspect.isawaitable(r):
                t = self._loop.create_task(self._guard(r, msg))
                self._tasks.add(t)
                t.add_done_callback(self._task_done)
        except Exception as e:
            self._failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)

    async def _guard(self, awaitable, msg) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:  # _guard contains all but BaseException
            self._failed(f"task:{type(t.exception()).__name__}", t.exception(), None)

    async def _drain_dispatch(self, conn: Connection) -> None:
        q = conn._dispatch_q
        while q:
            handler, msg = q[0]
            try:
                r = handler(msg)
                if r is not None and inspect.isawaitable(r):
                    await r
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)
            q.popleft()
            if getattr(conn, "_dispatch_paused", False) and len(q) < 4 and not conn.closed:
                conn._dispatch_paused = False
                conn.transport.resume_reading()

    # ------------------------------------------------------------------ sending
    def send(self, rank: int, kind: str, step: int, tensors=(), meta=None) -> asyncio.Future:
        """Queue a message for ``rank``; returns at once a future that resolves True once the
        kernel took every byte, False if it was dropped (outbox overflow, connection lost while
        writing, node closed).  The tensors are sent from their own memory: do not modify them
        until the future resolves (send a snapshot, e.g. ``t.clone()``, if you must).  A send
        to a known peer that is not connected waits in its outbox.  ``rank == self.rank``
        delivers a copy locally.  Raises :class:`errors.UnknownPeer` for a rank not in the
        directory, ``ValueError``/``TypeError``/:class:`errors.ProtocolError` for a message the
        limits refuse.  Call from the node's event loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("start() the node before sending")
        if self.staging is not None and needs_staging(tensors):
            return self._send_staged([rank], kind, step, tensors, meta)[0]
        return self._send(rank, kind, step, tensors, meta)

    def _send(self, rank: int, kind: str, step: int, tensors, meta, staged: Staged | None = None,
              framed: tuple | None = None):
        """One send; ``framed``: the ``encode`` result shared by every recipient of a
        broadcast (framed once, not once per recipient)."""
        fut = self._loop.create_future()
        if self._closing:
            encode(kind, step, self.rank, tensors, meta, self.limits)  # same errors as when open
            fut.set_result(False)
            return fut
        if rank == self.rank:
            return self._send_local(kind, step, tensors, meta, fut, staged)
        ob = self._peers.get(rank)
        if ob is None:
            raise errors.UnknownPeer(f"rank {rank!r} is not a known peer of rank {self.rank}")
        buffers, nbytes, keep = framed if framed is not None else encode(
            kind, step, self.rank, tensors, meta, self.limits)
        if staged is None or staged.ready is None or staged.ready.done():
            ob.put(buffers, nbytes, fut, keep)
        else:  # its place in the queue now, its bytes once the device -> host copy ended
            item = ob.put(buffers, nbytes, fut, (keep, staged), ready=False)
            loop = self._loop
            staged.ready.add_done_callback(
                lambda _f: loop.call_soon_threadsafe(ob.mark_ready, item) if not loop.is_closed() else None)
        return fut

    def _check_ranks(self, ranks: list) -> None:
        for r in ranks:
            if r != self.rank and r not in self._peers:
                raise errors.UnknownPeer(f"rank {r!r} is not a known peer of rank {self.rank}")

    def _send_staged(self, ranks: list[int], kind: str, step: int, tensors, meta) -> list:
        """Send device tensors: one device -> host copy into pinned buffers shared by every
        send to ``ranks``, framed once; the buffers go back to the pool once every send
        resolved."""
        ranks = list(ranks)
        self._check_ranks(ranks)
        staged = self.staging.stage(tensors)
        staged.hold(len(ranks))
        futs = []
        try:
            # a copy still running fills these buffers later: send them as views, never joined
            framed = encode(kind, step, self.rank, staged.tensors, meta, self.limits,
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
        if staged is not None and staged.ready is not None:
            staged.ready.result()  # rare path (a node sending to itself): wait for the copy
        encode(kind, step, self.rank, tensors, meta, self.limits)  # same checks as the wire
        if kind not in self._handlers:
            fut.set_result(False)
            return fut
        msg = Message(kind, step, self.rank, [t.detach().clone() for t in tensors], dict(meta or {}))
        self._loop.call_soon(self._dispatch_local, msg)
        fut.set_result(True)
        return fut

    def _dispatch_local(self, msg: Message) -> None:
        if self._closing:
            return
        self.stats.frames_received += 1
        entry = self._handlers.get(msg.kind)
        if entry is not None and self._may_send(msg.kind, msg.sender):
            self._call(entry[0], msg)

    def broadcast(self, ranks: Iterable[int], kind: str, step: int, tensors=(), meta=None) -> list:
        """``send`` to each rank, framed once: every outbox shares the same header bytes and
        the same tensor memory (a small frame: the same joined bytes), so fanning a model out
        to n peers costs n kernel copies and no per-recipient serialisation.  Do not modify
        the tensors until all futures resolved.  Raises before sending anything for a rank
        that is not a known peer."""
        ranks = list(ranks)
        if not ranks:
            return []
        if "send" in self.__dict__:  # something wraps our send (a protocol attack's
            return [self.send(r, kind, step, tensors, meta) for r in ranks]  # interception)
        if self._loop is None:
            raise RuntimeError("start() the node before sending")
        if self.staging is not None and needs_staging(tensors):
            return self._send_staged(ranks, kind, step, tensors, meta)
        self._check_ranks(ranks)
        framed = encode(kind, step, self.rank, tensors, meta, self.limits)
        return [self._send(r, kind, step, tensors, meta, None, framed) for r in ranks]


class _TLSSlot:
    """A TLS handshake in progress on the accepted side: counted before authentication."""

    progressed = False

    def __init__(self, node: Node, peername):
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
