"""Where ranks are mapped to addresses and roles: the peer directory.

Ranks ``0 .. num_ps-1`` are parameter servers, the rest workers (as in Garfield).  A directory is
immutable; ``with_address`` returns an updated copy (used when a node re-registers through the
rendezvous after a restart).  Build one from a dict, from Garfield-style ``servers``/``workers``
host files (rank r listens on ``base_port + r`` unless the line says ``host:port``), or with
:meth:`PeerDirectory.local` for a one-machine deployment on loopback.
"""
from __future__ import annotations

import random
import socket
from typing import Iterator, Mapping

from . import errors

__all__ = ["PeerDirectory", "role_of", "free_ports", "ephemeral_port_range"]


def role_of(rank: int, num_ps: int) -> str:
    return "ps" if rank < num_ps else "worker"


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = (int(x) for x in fh.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now, drawn at random *below* the ephemeral range.

    Racy by nature (a port is checked, released, and bound later by a node), but a port drawn
    by the kernel (bind to port 0) comes from the ephemeral range, where every outgoing
    connection on the machine also takes its local port: under load one of them grabbed a
    node's port between the check and the bind.  Below that range only another listener can
    collide.  Falls back to the kernel's choice when that range is too small."""
    lo, _ = ephemeral_port_range()
    pool_lo, pool_hi = 10000, lo - 1
    rng = random.SystemRandom()
    socks: list[socket.socket] = []
    ports: list[int] = []

    def probe(port: int) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            return False
        socks.append(s)
        ports.append(s.getsockname()[1])
        return True

    try:
        if pool_hi - pool_lo >= 8 * n:
            for _ in range(20 * n + 100):
                if len(ports) >= n:
                    break
                port = rng.randint(pool_lo, pool_hi)
                if port not in ports:
                    probe(port)
        while len(ports) < n:
            if not probe(0):
                raise OSError(f"no free port on {host}")
    finally:
        for s in socks:
            s.close()
    return ports


class PeerDirectory:
    def __init__(self, addresses: Mapping[int, tuple[str, int]], num_ps: int):
        if not isinstance(addresses, Mapping) or not addresses:
            raise errors.ConfigError("a peer directory needs a non-empty {rank: (host, port)} mapping")
        ranks = sorted(addresses)
        if any(type(r) is not int for r in ranks) or ranks != list(range(len(ranks))):
            raise errors.ConfigError(f"directory ranks must be exactly 0..{len(ranks) - 1}, got {ranks}")
        if type(num_ps) is not int or not 0 <= num_ps <= len(ranks):
            raise errors.ConfigError(f"num_ps must be an int in [0, {len(ranks)}], got {num_ps!r}")
        addrs = {}
        for r in ranks:
            a = addresses[r]
            try:
                host, port = a
            except (TypeError, ValueError):
                raise errors.ConfigError(f"address of rank {r} must be (host, port), got {a!r}") from None
            if not isinstance(host, str) or not host or type(port) is not int or not 0 <= port <= 65535:
                raise errors.ConfigError(f"address of rank {r} must be (non-empty host, port 0..65535), got {a!r}")
            addrs[r] = (host, port)
        self._addrs = addrs
        self.num_ps = num_ps

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_host_files(cls, servers_path, workers_path, base_port: int) -> "PeerDirectory":
        """Ranks in file order: servers first (the first server is rank 0, the master)."""
        if type(base_port) is not int or not 1 <= base_port <= 65535:
            raise errors.ConfigError(f"base_port must be in [1, 65535], got {base_port!r}")
        hosts = []
        for path in (servers_path, workers_path):
            try:
                with open(path, encoding="utf-8") as f:
                    lines = [ln.split("#", 1)[0].strip() for ln in f]
            except OSError as e:
                raise errors.ConfigError(f"cannot read host file {path}: {e}") from None
            hosts.append([ln for ln in lines if ln])
        servers, workers = hosts
        if not servers:
            raise errors.ConfigError(f"host file {servers_path} lists no server")
        addrs = {}
        for r, line in enumerate(servers + workers):
            host, port = line, base_port + r
            if line.count(":") == 1:  # host:port override (IPv6 literals: use [addr]:port)
                host, p = line.rsplit(":", 1)
                port = _port(p, line)
            elif line.startswith("[") and "]:" in line:
                host, p = line[1:].split("]:", 1)
                port = _port(p, line)
            if port > 65535:
                raise errors.ConfigError(f"rank {r} would listen on port {port} > 65535 (base_port too high)")
            addrs[r] = (host, port)
        return cls(addrs, num_ps=len(servers))

    @classmethod
    def local(cls, num_ps: int, num_workers: int, host: str = "127.0.0.1",
              base_port: int | None = None) -> "PeerDirectory":
        """Every rank on ``host``; ports ``base_port + r``, or free ports found now if None."""
        n = num_ps + num_workers
        ports = free_ports(n, host) if base_port is None else [base_port + r for r in range(n)]
        return cls({r: (host, ports[r]) for r in range(n)}, num_ps)

    def with_address(self, rank: int, addr: tuple[str, int]) -> "PeerDirectory":
        d = dict(self._addrs)
        d[rank] = addr
        return PeerDirectory(d, self.num_ps)

    # ------------------------------------------------------------------ queries
    @property
    def world_size(self) -> int:
        return len(self._addrs)

    @property
    def ps_ranks(self) -> list[int]:
        return list(range(self.num_ps))

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.num_ps, self.world_size))

    def role(self, rank: int) -> str:
        return role_of(rank, self.num_ps)

    def __getitem__(self, rank: int) -> tuple[str, int]:
        try:
            return self._addrs[rank]
        except KeyError:
            raise errors.UnknownPeer(f"rank {rank!r} is not in the directory (world size {self.world_size})") from None

    def __contains__(self, rank) -> bool:
        return rank in self._addrs

    def __iter__(self) -> Iterator[int]:
        return iter(self._addrs)

    def __len__(self) -> int:
        return len(self._addrs)

    def items(self):
        return self._addrs.items()

    def to_dict(self) -> dict[int, tuple[str, int]]:
        return dict(self._addrs)

    def __eq__(self, other) -> bool:
        return isinstance(other, PeerDirectory) and self._addrs == other._addrs and self.num_ps == other.num_ps

    def __repr__(self) -> str:
        return f"PeerDirectory(num_ps={self.num_ps}, {self._addrs})"


def _port(p: str, line: str) -> int:
    try:
        port = int(p)
    except ValueError:
        raise errors.ConfigError(f"bad port in host line {line!r}") from None
    if not 1 <= port <= 65535:
        raise errors.ConfigError(f"bad port in host line {line!r}")
    return port
