#!/usr/bin/env python3
"""An outsider's flood: idle or slow sockets to every endpoint of a run directory.

    python scripts/outsider_flood.py RUN_DIR [--sockets N] [--seconds S] [--ranks 0,1] [--mode idle|slow]
                                     [--rate R] [--source 127.0.0.2]

Someone without credentials (docs/design.md §5: "outsiders can connect but get nothing parsed and
cannot starve legitimate connections") keeps ``N`` TCP connections open to each endpoint
(``host:port`` of each rank in ``RUN_DIR/deployment.json``, or only ``--ranks``) for ``S``
seconds (or until SIGTERM / SIGINT: then within ``--drip`` seconds), then closes them all and
exits by itself:

* ``idle``: connect and never send a byte;
* ``slow``: send a plausible handshake length prefix, then one byte every ``--drip`` seconds
  (a slow-loris hello that never completes).

A socket the node closes (it evicts unauthenticated connections beyond its per-address and total
limits, or times their handshake out) is opened again, at most ``--rate`` connections per second
in all, so the pressure stays at ``N`` per endpoint for the whole time.  ``--source`` binds every
socket to one loopback address (e.g. ``127.0.0.2``): a one-address flood next to legitimate peers
on ``127.0.0.1``, which a node must tell apart (its pre-auth limits are per address).  Bounded on purpose:
loopback addresses only, at most 5,000 sockets per endpoint and 20,000 in all, at most 3,600 s.
The last line printed is a JSON summary: per endpoint the sockets opened, closed by the node,
the most open at once, and connect failures.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from byzsgd import rundir  # noqa: E402  (light: no torch import)
from byzsgd.errors import ConfigError  # noqa: E402

MAX_PER_ENDPOINT = 5000
MAX_TOTAL = 20000
MAX_SECONDS = 3600.0


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoints(run_dir: Path, ranks: list[int] | None) -> list[tuple[int, str, int]]:
    doc = rundir.read_deployment(run_dir)
    out = []
    for r in doc["ranks"]:
        rank = int(r["rank"])
        if ranks is not None and rank not in ranks:
            continue
        host, port = str(r["host"]), int(r["port"])
        if not loopback(host):
            raise ConfigError(f"rank {rank} is at {host}: outsider_flood only targets loopback addresses")
        out.append((rank, host, port))
    if not out:
        raise ConfigError(f"no endpoint to flood in {run_dir} (ranks {ranks})")
    return out


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


class Endpoint:
    def __init__(self, rank: int, host: str, port: int):
        self.rank, self.host, self.port = rank, host, port
        self.opened = self.closed_by_node = self.connect_failures = 0
        self.open_now = self.max_open = 0

    def summary(self) -> dict:
        return dict(rank=self.rank, host=self.host, port=self.port, opened=self.opened,
                    closed_by_node=self.closed_by_node, max_open=self.max_open,
                    connect_failures=self.connect_failures)


class Flood:
    def __init__(self, eps: list[Endpoint], sockets: int, seconds: float, mode: str, drip: float, rate: float,
                 source: str | None = None):
        self.eps, self.sockets, self.seconds, self.mode, self.drip = eps, sockets, seconds, mode, drip
        self.local_addr = (source, 0) if source else None
        self.interval = 1.0 / rate
        self.deadline = 0.0
        self._next_slot = 0.0

    async def _pace(self) -> None:
        """At most ``rate`` connection attempts per second, in all."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _one(self, ep: Endpoint) -> None:
        """Keep one socket open to ``ep`` until the deadline, reopening it when it is closed."""
        loop = asyncio.get_running_loop()
        while loop.time() < self.deadline:
            await self._pace()
            if loop.time() >= self.deadline:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(ep.host, ep.port, local_addr=self.local_addr), 5.0)
            except (OSError, asyncio.TimeoutError):
                ep.connect_failures += 1
                await asyncio.sleep(0.5)
                continue
            ep.opened += 1
            ep.open_now += 1
            ep.max_open = max(ep.max_open, ep.open_now)
            try:
                closed = await self._hold(reader, writer)
            finally:
                ep.open_now -= 1
                writer.close()
            if closed:
                ep.closed_by_node += 1

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """True when the node closed the socket before the deadline."""
        loop = asyncio.get_running_loop()
        if self.mode == "slow":
            writer.write(b"\x40")  # half of a 2-byte handshake length prefix (0x0040 = 64 bytes)
        while True:
            left = self.deadline - loop.time()
            if left <= 0:
                return False
            try:
                data = await asyncio.wait_for(reader.read(4096), min(left, self.drip))
            except asyncio.TimeoutError:
                if self.mode == "slow":
                    try:
                        writer.write(b"\x00")
                    except (OSError, RuntimeError):
                        return True
                continue
            except (OSError, ConnectionError):
                return True
            if not data:
                return True

    def stop(self) -> None:
        """End the flood now: every socket closes at its next wake-up (within ``drip`` s), and
        the summary is still printed (a test stops the flood when its run has ended)."""
        self.deadline = min(self.deadline, asyncio.get_running_loop().time())

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.deadline = start + self.seconds
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Linux
                pass
        tasks = [loop.create_task(self._one(ep)) for ep in self.eps for _ in range(self.sockets)]
        await asyncio.wait(tasks, timeout=self.seconds + 15)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return dict(seconds=round(loop.time() - start, 2), mode=self.mode, sockets_per_endpoint=self.sockets,
                    source=self.local_addr[0] if self.local_addr else None,
                    endpoints=[ep.summary() for ep in self.eps])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/outsider_flood.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sockets", type=int, default=150, help="sockets per endpoint (default 150)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long (default 30 s)")
    p.add_argument("--ranks", default="", help="comma-separated ranks (default: every rank)")
    p.add_argument("--mode", choices=("idle", "slow"), default="idle")
    p.add_argument("--drip", type=float, default=2.0, help="slow mode: seconds between bytes")
    p.add_argument("--rate", type=float, default=2000.0, help="connection attempts per second, in all")
    p.add_argument("--source", default="", help="bind every socket to this loopback address (e.g. 127.0.0.2)")
    args = p.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()] or None
        if not 1 <= args.sockets <= MAX_PER_ENDPOINT:
            raise ConfigError(f"--sockets must be in [1, {MAX_PER_ENDPOINT}]")
        if not 0 < args.seconds <= MAX_SECONDS:
            raise ConfigError(f"--seconds must be in (0, {MAX_SECONDS:g}]")
        if not args.drip > 0 or not args.rate > 0:
            raise ConfigError("--drip and --rate must be > 0")
        if args.source and not loopback(args.source):
            raise ConfigError(f"--source {args.source} is not a loopback address")
        eps = [Endpoint(*e) for e in endpoints(args.run_dir, ranks)]
        total = len(eps) * args.sockets
        if total > MAX_TOTAL:
            raise ConfigError(f"{total} sockets in all > {MAX_TOTAL}: fewer --sockets or --ranks")
        limit = raise_fd_limit(total)
        if limit < total + 16:
            raise ConfigError(f"the open-file limit ({limit}) is below {total} sockets")
    except (ConfigError, ValueError) as exc:
        print(f"outsider_flood: error: {exc}", file=sys.stderr)
        return 2
    print(f"outsider_flood: {args.sockets} {args.mode} sockets to each of {len(eps)} endpoints "
          f"for {args.seconds:g} s", file=sys.stderr, flush=True)
    t0 = time.time()
    result = asyncio.run(Flood(eps, args.sockets, args.seconds, args.mode, args.drip, args.rate,
                               args.source or None).run())
    result["started"] = t0
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
