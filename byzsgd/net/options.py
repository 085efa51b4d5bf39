"""What a :class:`~byzsgd.net.node.Node` is built from, checked once, where it is built.

:class:`NodeOptions` validates every constructor argument of a node in ``__post_init__`` (as
torch elastic's ``RendezvousParameters`` does): a mistake raises
:class:`byzsgd.errors.ConfigError` with what was wrong, before any socket exists, and the node
itself only reads checked, normalised values (``world_size``/``num_ps`` taken from the
directory, ``peer_roles`` a frozenset, timeouts floats, the pool size defaulted).

The cluster secret is not kept: a ``bytes`` operator secret (legacy/dev mode) is turned into
this rank's :class:`~.credentials.RankCredentials` here and dropped, so an options object holds
no more key material than the node does (tests/test_fork_keys.py scans for it).
"""
from __future__ import annotations

import logging
import ssl as _ssl
from dataclasses import InitVar, dataclass, field
from typing import Any, Iterable

from . import errors
from .credentials import RankCredentials
from .frame import FrameLimits
from .peers import PeerDirectory, role_of

__all__ = ["NodeOptions", "ROLES"]

log = logging.getLogger("byzsgd.net")

ROLES = ("ps", "worker")


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """A node's parameters, validated at construction.

    Give either ``directory`` (every rank's address is known: the node listens on its own
    directory port) or ``master=(host, port)`` with ``world_size`` and ``num_ps`` (rendezvous:
    rank 0 listens on the master port, the others on ``listen_port``, 0 = ephemeral, and
    register ``advertise_host`` or, by default, the address they reach the master from).
    ``secret`` is this rank's :class:`~byzsgd.net.credentials.RankCredentials` (the pair keys
    that prove its rank), or, legacy/dev mode, ``bytes`` taken as the operator secret from which
    this node derives its own credentials (every node then holds every key: membership, not rank,
    is proven; see :mod:`.credentials`); only the resulting ``credentials`` are kept.
    ``ssl_server``/``ssl_client`` add TLS under the HMAC handshake (which binds the TLS channel).
    ``bind_address`` (plain TCP): refuse a dialer that reached this node through another address
    (a relay); turn off behind NAT/port mapping, and use TLS there.  ``max_preauth_per_address``
    bounds unauthenticated connections per source IP that have not sent a hello for this
    deployment (:mod:`.admission`; at ~2,000 connections/s from one address, 32 give a dialer
    sharing that address 16 ms to get its hello out, which 8 (4 ms) did not always).
    ``outbox_depth`` bounds the messages queued per peer (overflow drops the oldest).
    ``pool_bytes`` bounds the receive buffers kept for reuse (default: 4 frames of the maximum
    size).  ``device``: where the node's tensors live (CUDA: sends and receives go through
    pinned buffers).  ``peer_roles``: the roles it exchanges messages with (None: both).
    """

    rank: int
    role: str
    secret: InitVar[Any]
    limits: FrameLimits
    directory: PeerDirectory | None = None
    master: tuple[str, int] | None = None
    world_size: int | None = None
    num_ps: int | None = None
    listen_host: str = "0.0.0.0"
    advertise_host: str | None = None
    listen_port: int = 0
    ssl_server: _ssl.SSLContext | None = None
    ssl_client: _ssl.SSLContext | None = None
    connect_timeout: float = 5.0
    handshake_timeout: float = 5.0
    outbox_depth: int = 16
    pool_bytes: int | None = None
    bind_address: bool = True
    max_preauth_per_address: int = 32
    device: Any = None
    peer_roles: Iterable[str] | None = None
    credentials: RankCredentials = field(init=False, repr=False)
    legacy_secret: bool = field(init=False)

    def __post_init__(self, secret) -> None:
        rank, role, limits = self.rank, self.role, self.limits
        if type(rank) is not int or rank < 0:
            raise errors.ConfigError(f"rank must be a non-negative int, got {rank!r}")
        if role not in ROLES:
            raise errors.ConfigError(f"role must be one of {ROLES}, got {role!r}")
        if isinstance(secret, str):
            raise errors.ConfigError("secret must be bytes (encode the --secret / BYZSGD_SECRET string first)")
        if isinstance(secret, RankCredentials):
            if secret.rank != rank:
                raise errors.ConfigError(f"the credentials are rank {secret.rank}'s, this node is rank {rank}")
        elif not isinstance(secret, (bytes, bytearray)) or len(secret) == 0:
            raise errors.ConfigError("credentials (RankCredentials) or a non-empty cluster secret (bytes) are required: "
                    "pass --secret or set BYZSGD_SECRET")
        mpa = self.max_preauth_per_address
        if type(mpa) is not int or mpa < 1:
            raise errors.ConfigError(f"max_preauth_per_address must be an int >= 1, got {mpa!r}")
        if not isinstance(limits, FrameLimits):
            raise errors.ConfigError(f"limits must be a FrameLimits, got {type(limits).__name__}")
        if (self.directory is None) == (self.master is None):
            raise errors.ConfigError("give exactly one of directory= (static peer list) or master= (rendezvous)")
        for name in ("connect_timeout", "handshake_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise errors.ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
            self._set(name, float(v))
        if type(self.outbox_depth) is not int or self.outbox_depth < 1:
            raise errors.ConfigError(f"outbox_depth must be an int >= 1, got {self.outbox_depth!r}")
        if self.ssl_server is not None and not isinstance(self.ssl_server, _ssl.SSLContext):
            raise errors.ConfigError("ssl_server must be an ssl.SSLContext")
        if self.ssl_client is not None and not isinstance(self.ssl_client, _ssl.SSLContext):
            raise errors.ConfigError("ssl_client must be an ssl.SSLContext")
        if type(self.listen_port) is not int or not 0 <= self.listen_port <= 65535:
            raise errors.ConfigError(f"listen_port must be in [0, 65535], got {self.listen_port!r}")
        world_size, num_ps = self._world()
        if role != role_of(rank, num_ps):
            raise errors.ConfigError(f"rank {rank} is a {role_of(rank, num_ps)} (ranks < num_ps={num_ps} are PS), not a {role}")
        if isinstance(secret, RankCredentials):
            if secret.world_size != world_size:
                raise errors.ConfigError(f"the credentials are for a world of {secret.world_size}, this one has {world_size}")
            self._set("credentials", secret)
            self._set("legacy_secret", False)
        else:
            if len(secret) < 16:
                log.warning("rank %d: the cluster secret is only %d bytes; use 16+ random bytes", rank, len(secret))
            self._set("credentials", RankCredentials.derive(bytes(secret), rank, world_size))
            self._set("legacy_secret", True)
        self._set("bind_address", bool(self.bind_address))
        if self.peer_roles is not None:
            peer_roles = frozenset(self.peer_roles)
            if not peer_roles <= set(ROLES):
                raise errors.ConfigError(f"peer_roles must be a subset of {{'ps', 'worker'}}, got {sorted(peer_roles)}")
            self._set("peer_roles", peer_roles)
        if self.pool_bytes is None:
            self._set("pool_bytes", max(4 * limits.max_frame_bytes, 64 << 20))

    def _world(self) -> tuple[int, int]:
        """Check the directory or the master and the world they describe; set and return
        ``(world_size, num_ps)``."""
        rank, directory, world_size, num_ps = self.rank, self.directory, self.world_size, self.num_ps
        if directory is not None:
            if not isinstance(directory, PeerDirectory):
                raise errors.ConfigError("directory must be a PeerDirectory")
            if rank not in directory:
                raise errors.ConfigError(f"rank {rank} is not in the directory (world size {directory.world_size})")
            if world_size is not None and world_size != directory.world_size:
                raise errors.ConfigError(f"world_size={world_size} but the directory has {directory.world_size} ranks")
            if num_ps is not None and num_ps != directory.num_ps:
                raise errors.ConfigError(f"num_ps={num_ps} but the directory has {directory.num_ps} servers")
            world_size, num_ps = directory.world_size, directory.num_ps
        else:
            try:
                mhost, mport = self.master
            except (TypeError, ValueError):
                raise errors.ConfigError(f"master must be (host, port), got {self.master!r}") from None
            if not isinstance(mhost, str) or not mhost or type(mport) is not int or not 1 <= mport <= 65535:
                raise errors.ConfigError(f"master must be (host, port 1..65535), got {self.master!r}")
            if type(world_size) is not int or world_size < 1:
                raise errors.ConfigError("rendezvous through a master needs world_size (an int >= 1)")
            if type(num_ps) is not int or not 0 <= num_ps <= world_size:
                raise errors.ConfigError(f"rendezvous needs num_ps in [0, world_size], got {num_ps!r}")
            if rank >= world_size:
                raise errors.ConfigError(f"rank {rank} >= world_size {world_size}")
        self._set("world_size", world_size)
        self._set("num_ps", num_ps)
        return world_size, num_ps

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass in __post_init__
