"""Where a node that only knows the master finds everybody else.

Each node ``r > 0`` dials the master (rank 0, whose address every node is given), authenticates
like any other connection, and registers the address it listens on (frame kind ``__rdv_reg``).
Once all ``world_size`` ranks registered, the master sends the complete directory to everyone
(``__rdv_dir``) and each node starts dialing its lower-ranked peers; ``Node.start()`` returns
then.  A node that restarts later registers again: the master updates the entry and re-sends the
directory to everyone, so peers re-dial the new address.  Only the master's directory is
believed (sender 0 of an authenticated connection); its encoding is a msgpack ``bin`` inside the
frame's meta map, decoded with strict limits.

After the start, one registration must not cost the master ``world_size - 1`` frames each time
(a member re-registering 2,000 times between two addresses made it send 10,000, issue 24):

* registrations within ``COALESCE_S`` share one send: one directory broadcast for every address
  change among them, one reply for the ranks that re-registered their known address (a
  reconnect; only they need the directory);
* a rank's address changes are rate-limited (``CHANGE_BURST`` at once, then one per
  ``CHANGE_EVERY_S``): a change beyond that is kept (the newest address wins) and broadcast when
  the rank has a token again, or earlier with another rank's change; the registrant itself is
  answered within ``COALESCE_S`` anyway.

So a legitimate restart (a rank that has not changed its address in the last few seconds)
reaches everyone within ``COALESCE_S``, and a flapping rank costs at most
``(world_size - 1) / CHANGE_EVERY_S`` frames per second, plus one reply to itself per
``COALESCE_S``.  The first start (before the directory is complete) is not delayed.

What it uses of the node: its identity and addresses (``rank``, ``world_size``, ``num_ps``,
``master``, ``listen_host``, ``advertise_host``, ``port``), ``loop``, ``closing``, ``stats`` and
``send``; the node registers :meth:`Rendezvous.handlers`, dials the master itself, and gives the
callback through which a directory the rendezvous learnt becomes the node's.
"""
from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

import msgpack

from . import errors
from .peers import PeerDirectory
from .ratelog import RateLog

__all__ = ["Rendezvous", "REG", "DIR"]

log = logging.getLogger("byzsgd.net")

REG = "__rdv_reg"
DIR = "__rdv_dir"
_WILDCARDS = ("", "0.0.0.0", "::")
COALESCE_S = 0.05      # registrations this close together share one directory send
CHANGE_BURST = 3       # address changes a rank may have broadcast at once...
CHANGE_EVERY_S = 1.0   # ...then one per this many seconds


class Rendezvous:
    """``set_directory(d)``: make ``d`` the node's directory (it dials who it must);
    ``rlog``: the node's rate-limited log for what peers cause."""

    def __init__(self, node, *, set_directory: Callable[[PeerDirectory], None], rlog: RateLog):
        self.node = node
        self._set_directory = set_directory
        self._rlog = rlog
        self.directory: PeerDirectory | None = None  # the last one this rendezvous set
        self.addrs: dict[int, tuple[str, int]] = {}
        self.done: asyncio.Future | None = None
        self._changed: set[int] = set()   # ranks whose new address everyone must learn
        self._reply: set[int] = set()     # ranks that must get the directory themselves
        self._tokens: dict[int, tuple[float, float]] = {}  # rank -> (tokens, when): address changes
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def handlers(self) -> dict:
        """The internal kinds and their handlers, for the node to register."""
        return {REG: self._on_reg, DIR: self._on_dir}

    def set_directory(self, d: PeerDirectory) -> None:
        self.directory = d
        self._set_directory(d)

    async def run(self, timeout: float | None) -> None:
        """Until the directory is complete (the node dials the master meanwhile)."""
        node = self.node
        self.done = node.loop.create_future()
        if node.rank == 0:
            host = node.advertise_host or (node.listen_host if node.listen_host not in _WILDCARDS else node.master[0])
            self.addrs[0] = (host, node.port)
            self._maybe_complete()
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except asyncio.TimeoutError:
            raise errors.RendezvousError(
                f"rank {node.rank}: directory incomplete after {timeout}s "
                f"({len(self.addrs) if node.rank == 0 else '?'} of {node.world_size} registered)") from None

    def close(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
            self._rlog.warning(f"rank {msg.sender}", "bad_registration",
                               "rank 0: bad registration from rank %d: %r", msg.sender, dict(list(msg.meta.items())[:4]))
            node.stats.rejected["bad_registration"] += 1
            return
        r = msg.sender
        changed = self.addrs.get(r) != (host, port)
        self.addrs[r] = (host, port)
        self._rlog.info(f"rank {r}", "registered", "rank 0: rank %d registered %s:%d (%d/%d)",
                        r, host, port, len(self.addrs), node.world_size)
        if self.done is not None and self.done.done():
            if changed:  # a restart on a new address: everyone must learn it, the master first
                self.set_directory(self.directory.with_address(r, (host, port)))
                self._changed.add(r)
            self._reply.add(r)  # (a reconnect: only the registrant needs the directory)
            self._schedule()
        else:
            self._maybe_complete()

    # ------------------------------------------------------------------ coalescing, rate limit
    def _has_token(self, r: int, now: float, take: bool = False) -> bool:
        tokens, when = self._tokens.get(r, (CHANGE_BURST, now))
        tokens = min(CHANGE_BURST, tokens + (now - when) / CHANGE_EVERY_S)
        ok = tokens >= 1 - 1e-9  # (float drift must not hold back a change that is due)
        self._tokens[r] = (tokens - 1 if ok and take else tokens, now)
        return ok

    def _due(self, now: float) -> float:
        """When the next send is due: within COALESCE_S for a reply or a change with a token,
        else when the first held-back change gets its token."""
        if self._reply or any(self._has_token(r, now) for r in self._changed):
            return now + COALESCE_S
        if self._changed:
            return now + min((1 - self._tokens[r][0]) * CHANGE_EVERY_S for r in self._changed)
        return math.inf

    def _schedule(self) -> None:
        loop = self.node.loop
        at = self._due(loop.time())
        if at < self._timer_at:  # an earlier send wins over one armed later
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = loop.call_at(at, self._flush)

    def _flush(self) -> None:
        self._timer, self._timer_at = None, math.inf
        node = self.node
        if node.closing:
            return
        now = node.loop.time()
        due = [r for r in self._changed if self._has_token(r, now)]
        if due:  # one broadcast carries every change so far, held-back ones included
            for r in due:
                self._has_token(r, now, take=True)
            self._changed.clear()
            self._reply.clear()
            self._broadcast()
        elif self._reply:
            ranks, self._reply = sorted(self._reply), set()
            self._broadcast(ranks)
        if self._changed:
            self._schedule()

    def _maybe_complete(self) -> None:
        node = self.node
        if len(self.addrs) < node.world_size:
            return
        self.set_directory(PeerDirectory(dict(self.addrs), node.num_ps))
        self._broadcast()
        if not self.done.done():
            self.done.set_result(None)

    def _broadcast(self, ranks=None) -> None:
        node = self.node
        d = self.directory
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
            self._rlog.log(logging.ERROR, "rank 0", "bad_directory",
                           "rank %d: bad directory from the master: %s", node.rank, e)
            return
        self.set_directory(d)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
