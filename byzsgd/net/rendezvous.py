"""Where a node that only knows the master finds everybody else.

Each node ``r > 0`` dials the master (rank 0, whose address every node is given), authenticates
like any other connection, and registers the address it listens on (frame kind ``__rdv_reg``).
Once all ``world_size`` ranks registered, the master sends the complete directory to everyone
(``__rdv_dir``) and each node starts dialing its lower-ranked peers; ``Node.start()`` returns
then.  A node that restarts later registers again: the master updates the entry and re-sends the
directory to everyone, so peers re-dial the new address.  Only the master's directory is
believed (sender 0 of an authenticated connection); its encoding is a msgpack ``bin`` inside the
frame's meta map, decoded with strict limits.
"""
from __future__ import annotations

import asyncio
import logging

import msgpack

from . import errors
from .outbox import Outbox
from .peers import PeerDirectory

__all__ = ["Rendezvous", "REG", "DIR"]

log = logging.getLogger("byzsgd.net")

REG = "__rdv_reg"
DIR = "__rdv_dir"
_WILDCARDS = ("", "0.0.0.0", "::")


class Rendezvous:
    def __init__(self, node):
        self.node = node
        self.addrs: dict[int, tuple[str, int]] = {}
        self.done: asyncio.Future | None = None

    def register_kinds(self) -> None:
        self.node._register(REG, self._on_reg, None, internal=True)
        self.node._register(DIR, self._on_dir, None, internal=True)

    async def run(self, timeout: float | None) -> None:
        node = self.node
        self.done = node._loop.create_future()
        if node.rank == 0:
            host = node.advertise_host or (node.listen_host if node.listen_host not in _WILDCARDS else node.master[0])
            self.addrs[0] = (host, node.port)
            self._maybe_complete()
        else:
            node._peers[0] = Outbox(0, node.outbox_depth, node.stats)
            node._dialers[0] = node._loop.create_task(node._dial_loop(0))
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except asyncio.TimeoutError:
            raise errors.RendezvousError(
                f"rank {node.rank}: directory incomplete after {timeout}s "
                f"({len(self.addrs) if node.rank == 0 else '?'} of {node.world_size} registered)") from None

    def close(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.cancel()

    # ------------------------------------------------------------------ events
    def on_connect(self, conn) -> None:
        node = self.node
        if node.rank != 0 and conn.rank == 0:
            host = node.advertise_host
            if not host:
                host = node.listen_host if node.listen_host not in _WILDCARDS else None
            if not host:
                sock = conn.transport.get_extra_info("sockname")
                host = sock[0] if sock else "127.0.0.1"
            node.send(0, REG, 0, meta={"host": host, "port": node.port})

    def _on_reg(self, msg) -> None:
        msg.release()
        node = self.node
        if node.rank != 0:
            return
        host, port = msg.meta.get("host"), msg.meta.get("port")
        if type(host) is not str or not host or len(host) > 255 or type(port) is not int or not 1 <= port <= 65535:
            log.warning("rank 0: bad registration from rank %d: %r", msg.sender, msg.meta)
            node.stats.rejected["bad_registration"] += 1
            return
        changed = self.addrs.get(msg.sender) != (host, port)
        self.addrs[msg.sender] = (host, port)
        log.info("rank 0: rank %d registered %s:%d (%d/%d)", msg.sender, host, port, len(self.addrs), node.world_size)
        if self.done is not None and self.done.done():
            if changed:  # a restart on a new address: everyone must learn it
                node._set_directory(node._directory.with_address(msg.sender, (host, port)))
                self._broadcast()
            else:  # a reconnect: only the registrant needs the directory (no amplification)
                self._broadcast([msg.sender])
        else:
            self._maybe_complete()

    def _maybe_complete(self) -> None:
        node = self.node
        if len(self.addrs) < node.world_size:
            return
        node._set_directory(PeerDirectory(dict(self.addrs), node.num_ps))
        self._broadcast()
        if not self.done.done():
            self.done.set_result(None)

    def _broadcast(self, ranks=None) -> None:
        node = self.node
        d = node._directory
        blob = msgpack.packb([list(d[r]) for r in range(d.world_size)], use_bin_type=True)
        for r in (range(1, d.world_size) if ranks is None else ranks):
            node.send(r, DIR, 0, meta={"dir": blob, "num_ps": d.num_ps})

    def _on_dir(self, msg) -> None:
        msg.release()
        node = self.node
        if node.rank == 0 or msg.sender != 0:
            return
        try:
            blob = msg.meta.get("dir")
            if type(blob) is not bytes:
                raise ValueError("no directory")
            entries = msgpack.unpackb(blob, raw=False, strict_map_key=True, max_str_len=255,
                                      max_bin_len=0, max_array_len=max(node.world_size, 2),
                                      max_map_len=0, max_ext_len=0)
            if type(entries) is not list or len(entries) != node.world_size:
                raise ValueError(f"directory of {len(entries) if isinstance(entries, list) else '?'} ranks")
            if msg.meta.get("num_ps") != node.num_ps:
                raise ValueError(f"num_ps {msg.meta.get('num_ps')!r} != {node.num_ps}")
            addrs = {}
            for r, e in enumerate(entries):
                if type(e) is not list or len(e) != 2:
                    raise ValueError("entry must be [host, port]")
                addrs[r] = (e[0], e[1])
            d = PeerDirectory(addrs, node.num_ps)
        except Exception as e:
            node.stats.rejected["bad_directory"] += 1
            log.error("rank %d: bad directory from the master: %s", node.rank, e)
            return
        node._set_directory(d)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
