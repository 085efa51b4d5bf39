"""Where a process joins the cluster: one ``Node`` per process, one connection per peer.

A node listens on its own address, dials every peer of *lower* rank whose role it exchanges
messages with (``peer_roles``; the higher rank dials, so a pair never ends up with two
connections), reconnects with exponential backoff for as long as it runs, authenticates every
connection's *rank*, refuses a second live connection for a rank, and dispatches received frames
to the handler registered for their kind.  Sending goes through a bounded per-peer outbox and
never blocks the caller.  This module holds the node's life (start, connections, close) and
its public API; each concept lives in its own module: :mod:`.options` (the arguments, validated
once), :mod:`.handshake` (both sides), :mod:`.dialer` (reconnecting), :mod:`.admission` (before
authentication, TLS accept), :mod:`.dispatch` (handlers; each :class:`~.protocol.Connection`
runs its own in arrival order), :mod:`.sending` (outboxes, staging, the send filters of
:meth:`Node.add_send_filter`: the one hook on the way out), :mod:`.rendezvous`.

Threading: everything runs on the loop that called :meth:`Node.start`; send from that loop.

Error contract: a misbehaving peer (malformed frame, unknown kind, bad HMAC, duplicate rank...)
only ever costs its own connection: it is closed with a reason logged on ``byzsgd.net`` and
counted in ``node.stats.rejected[reason]``.  A handler that raises never kills the node: it is
counted in ``stats.failures["handler:<kind>:<ExceptionType>"]`` (:mod:`.dispatch`), a close hook
that raises in ``stats.failures["close_hook:<ExceptionType>"]``.  Configuration mistakes raise
:class:`byzsgd.errors.ConfigError` in the constructor (:class:`~.options.NodeOptions`).

Logging: what peers cause (refused or closed connections, reconnects) goes through a
:class:`~.ratelog.RateLog` keyed by (peer or address, reason): a few lines per key and interval,
then one "suppressed N similar lines" count, so nobody can make a node's log grow without bound.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable, Iterable

import torch

from . import errors
from .admission import Admission, TLSListener
from .bufpool import BufferPool
from .dialer import dial_loop
from .dispatch import Dispatcher
from .frame import Message
from .options import NodeOptions
from .outbox import Outbox
from .peers import PeerDirectory, role_of
from .protocol import Connection
from .quorum import Mailbox
from .ratelog import RateLog
from .rendezvous import Rendezvous
from .sending import Sender, SendFilter
from .stats import NodeStats
from .staging import DeviceStaging, PinnedBytes

__all__ = ["Node", "NodeStats", "NodeOptions"]

log = logging.getLogger("byzsgd.net")


class Node:
    """A cluster member.  See the module docstring and docs/design.md §4.

    ``Node(rank, role, secret, **options)``: the keywords are :class:`NodeOptions`' (which
    documents each one and checks them all); ``Node.from_options(options)`` takes a checked
    object.  Give either ``directory`` or ``master=(host, port)`` with ``world_size`` and
    ``num_ps`` (rendezvous).  ``secret``: this rank's
    :class:`~byzsgd.net.credentials.RankCredentials`, or (legacy/dev) the operator secret.

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

    def __init__(self, rank: int, role: str, secret, **options):
        self._setup(NodeOptions(rank=rank, role=role, secret=secret, **options))

    @classmethod
    def from_options(cls, options: NodeOptions) -> "Node":
        if not isinstance(options, NodeOptions):
            raise errors.ConfigError(f"options must be a NodeOptions, got {type(options).__name__}")
        node = cls.__new__(cls)
        node._setup(options)
        return node

    def _setup(self, o: NodeOptions) -> None:
        self.options = o
        self.rank, self.role, self.world_size, self.num_ps = o.rank, o.role, o.world_size, o.num_ps
        self.credentials, self.legacy_secret = o.credentials, o.legacy_secret
        self.limits, self.master, self.bind_address = o.limits, o.master, o.bind_address
        self.listen_host, self.advertise_host, self.listen_port = o.listen_host, o.advertise_host, o.listen_port
        self.ssl_server, self.ssl_client = o.ssl_server, o.ssl_client
        self.connect_timeout, self.handshake_timeout = o.connect_timeout, o.handshake_timeout
        self.outbox_depth = o.outbox_depth
        # the roles this node exchanges messages with (None: all): it dials only lower ranks of
        # those roles and refuses dialers of the others -- two workers have nothing to say to
        # each other, so 100 workers need not hold 4,950 authenticated connections among them
        self.peer_roles = o.peer_roles
        # a node computing on CUDA sends device tensors through pinned staging buffers and
        # receives into pinned buffers (.staging); on the CPU nothing changes
        self.device = torch.device(o.device) if o.device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            self.staging = DeviceStaging(self.device)
            self.pool = BufferPool(o.pool_bytes, allocate=PinnedBytes.allocate)
        else:
            self.staging = None
            self.pool = BufferPool(o.pool_bytes)
        self.stats = NodeStats()
        self._directory = o.directory
        self._dispatcher = Dispatcher(self)
        self._handlers, self._senders = self._dispatcher.handlers, self._dispatcher.senders  # (its tables)
        self._sender = Sender(self)
        self._mailboxes: list[Mailbox] = []
        self._peers: dict[int, Outbox] = {}
        self._conns: dict[int, Connection] = {}
        self._connections: set[Connection] = set()
        self._dialers: dict[int, asyncio.Task] = {}
        self._conn_waiters: set[asyncio.Future] = set()
        self._close_hooks: list[Callable] = []
        self._server = None
        self._tls: TLSListener | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False
        # legitimate dialers from one host prove their rank at once: up to world_size - 1 of them
        self._admission = Admission(self, max_per_address=o.max_preauth_per_address,
                                    max_pending=64 + 4 * o.world_size,
                                    max_proving=max(o.max_preauth_per_address, o.world_size))
        self._rlog = RateLog(log, f"rank {o.rank}: ")  # what peers cause is logged rate-limited
        self._rdv: Rendezvous | None = None
        if o.directory is None:
            self._rdv = Rendezvous(self, set_directory=self._set_directory, rlog=self._rlog)
            for kind, handler in self._rdv.handlers().items():
                self._dispatcher.register(kind, handler, None, internal=True)

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
        if self._started:
            raise errors.ConfigError(f"register kind {kind!r} before start()")
        self._dispatcher.register(kind, handler, shapes, internal=False, senders=senders)

    def mailbox(self, kind: str, *, window: int = 8, shapes=None, senders=None,
                role: str | None = None) -> Mailbox:
        """Register a handler that files every ``kind`` message into a new :class:`Mailbox`
        (``senders``: the ranks it accepts; ``role``: only ranks of that role may send it, see
        :meth:`on`)."""
        mb = Mailbox(kind, window=window, senders=senders)
        self.on(kind, mb.deliver, shapes=shapes, senders=role if role is not None else senders)
        self._mailboxes.append(mb)
        return mb

    def add_send_filter(self, fn: SendFilter) -> Callable[..., asyncio.Future]:
        """Install ``fn(rank, kind, step, tensors, meta) -> Future | None`` on the way out: it
        sees every message this node sends (each recipient of a broadcast, the rendezvous'
        internal kinds included) and returns the caller's future, ``None`` for "not sent".
        Returns ``proceed``, with ``send``'s signature: the filters added after ``fn``, then
        the wire; ``fn`` calls it to pass a message on, and may call it to send others, at any
        time.  What ``fn`` raises reaches the caller of ``send``.  Contract: :mod:`.sending`."""
        return self._sender.add_filter(fn)

    def remove_send_filter(self, fn: SendFilter) -> None:
        self._sender.remove_filter(fn)

    def add_close_hook(self, hook: Callable[[], Awaitable | None]) -> None:
        """Run ``hook()`` (awaited if it returns an awaitable) when :meth:`close` begins, before
        the outboxes drain, while everything still works; hooks run once, in the order added.
        One that raises is contained (``stats.failures["close_hook:<Exc>"]``): close goes on."""
        if not callable(hook):
            raise errors.ConfigError("a close hook must be callable")
        self._close_hooks.append(hook)

    # ------------------------------------------------------------------ properties
    @property
    def dispatcher(self) -> Dispatcher:
        """The node's handler table and router (what ``on`` registers into; a benchmark times
        its ``route`` alone)."""
        return self._dispatcher

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

    def connection(self, rank: int) -> Connection | None:
        """The live authenticated connection to ``rank`` (its ``tls``, ``peername``,
        ``wait_closed()``...), or None."""
        c = self._conns.get(rank)
        return c if c is not None and not c.closed else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the node runs on (None before :meth:`start`)."""
        return self._loop

    @property
    def closing(self) -> bool:
        """True once :meth:`close` started tearing down."""
        return self._closing

    @property
    def pending_handshakes(self) -> int:
        """Connections counted before authentication now (:mod:`.admission`)."""
        return self._admission.pending

    @property
    def max_preauth_per_address(self) -> int:
        return self._admission.max_per_address

    @property
    def max_pending_handshakes(self) -> int:
        return self._admission.max_pending

    @max_pending_handshakes.setter
    def max_pending_handshakes(self, n: int) -> None:
        self._admission.max_pending = n

    @property
    def max_proving_per_address(self) -> int:
        return self._admission.max_proving

    # ------------------------------------------------------------------ sending
    def send(self, rank: int, kind: str, step: int, tensors=(), meta=None) -> asyncio.Future:
        """Queue a message for ``rank``; returns at once a future that resolves True once the
        kernel took every byte, False if it was dropped (outbox overflow, connection lost while
        writing, node closed, a send filter withheld it).  The tensors are sent from their own
        memory: do not modify them until the future resolves (send a snapshot, e.g.
        ``t.clone()``, if you must).  A send to a known peer that is not connected waits in its
        outbox.  ``rank == self.rank`` delivers a copy locally.  Raises
        :class:`errors.UnknownPeer` for a rank not in the directory,
        ``ValueError``/``TypeError``/:class:`errors.ProtocolError` for a message the limits
        refuse.  Call from the node's event loop."""
        return self._sender.send(rank, kind, step, tensors, meta)

    def broadcast(self, ranks: Iterable[int], kind: str, step: int, tensors=(), meta=None) -> list:
        """``send`` to each rank, framed once: every outbox shares the same header bytes and
        the same tensor memory (a small frame: the same joined bytes), so fanning a model out
        to n peers costs n kernel copies and no per-recipient serialisation.  Do not modify
        the tensors until all futures resolved.  Raises before sending anything for a rank
        that is not a known peer."""
        return self._sender.broadcast(ranks, kind, step, tensors, meta)

    def send_bytes(self, rank: int, data: bytes) -> asyncio.Future:
        """Queue ``data`` for ``rank`` as they are, as one message of its outbox (in order
        with the others; a future as :meth:`send`'s): bytes the caller framed itself, which
        no limit here checks and no send filter sees; the receiver's checks judge them.  For
        fault injection (a frame this encoder refuses to build) and tests."""
        return self._sender.send_bytes(rank, data)

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
            self._tls = TLSListener(self, self._admission, lambda slot: Connection(self, tls_slot=slot))
            self._port = await self._tls.open(self.listen_host, port, backlog)
        log.info("rank %d (%s) listening on %s:%d", self.rank, self.role, self.listen_host, self._port)
        if self._directory is not None:
            self._set_directory(self._directory)
        else:
            if self.rank != 0:
                self._keep_connected(0)  # the master first: it hands out the directory
            await self._rdv.run(timeout)

    def _set_directory(self, directory: PeerDirectory) -> None:
        self._directory = directory
        for r in directory:
            if r != self.rank and r not in self._peers:
                self._peers[r] = Outbox(r, self.outbox_depth, self.stats)
            if r < self.rank and not self._closing and self._talks_to(r):
                self._keep_connected(r)

    def _keep_connected(self, rank: int) -> None:
        """An outbox for ``rank`` and a dialer that keeps a connection to it."""
        if rank not in self._peers:
            self._peers[rank] = Outbox(rank, self.outbox_depth, self.stats)
        if rank not in self._dialers:
            self._dialers[rank] = self._loop.create_task(dial_loop(self, rank))

    def _talks_to(self, rank: int) -> bool:
        return self.peer_roles is None or role_of(rank, self.num_ps) in self.peer_roles

    def _address(self, rank: int) -> tuple[str, int]:
        if self._directory is not None and rank in self._directory:
            return self._directory[rank]
        if rank == 0 and self.master is not None:
            return self.master
        raise errors.UnknownPeer(f"no address for rank {rank}")

    async def close(self, *, drain_timeout: float = 0.0) -> None:
        """Close everything (idempotent): close hooks first, then dialers, listener,
        connections, outboxes (pending send futures resolve False), mailboxes (pending collects
        are cancelled).

        ``drain_timeout`` > 0: first let the outboxes of the connected peers flush what is
        queued (a final model, a ``done``), for at most that many seconds; messages to peers
        that are not connected are not waited for."""
        if self._closing:
            return
        hooks, self._close_hooks = self._close_hooks, []
        for hook in hooks:
            await self._run_close_hook(hook)
        if self._closing:  # closed by another call meanwhile
            return
        if drain_timeout and drain_timeout > 0 and self._loop is not None:
            await self._sender.drain(drain_timeout)
        self._closing = True
        tasks = list(self._dialers.values()) + list(self._dispatcher.tasks)
        for t in tasks:
            t.cancel()
        if self._rdv is not None:
            self._rdv.close()
        if self._server is not None:
            self._server.close()
        if self._tls is not None:
            self._tls.close()
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
        pending = [t for t in tasks if not t.done()]
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

    async def _run_close_hook(self, hook) -> None:
        try:
            r = hook()
            if r is not None and inspect.isawaitable(r):
                await r
        except Exception as e:
            self._dispatcher.failed(f"close_hook:{type(e).__name__}", e, None)

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------------ connections
    def _attach(self, conn: Connection, rank: int, role: str) -> None:
        """``conn`` proved ``rank`` (:mod:`.handshake`): it becomes that peer's connection."""
        self._admission.done(conn)
        if self.connection(rank) is not None:
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
        self._admission.done(conn)
        r = conn.rank
        if r is not None and self._conns.get(r) is conn:
            del self._conns[r]
            ob = self._peers.get(r)
            if ob is not None:
                ob.detach(conn)

    def _dispatch(self, conn: Connection, msg: Message) -> None:
        """A frame ``conn`` received (:meth:`.dispatch.Dispatcher.route`)."""
        self._dispatcher.route(conn, msg)

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
