#!/usr/bin/env python
"""Benchmark byzsgd's transport against the floors under it: a bare asyncio echo, a raw blocking
socket, and torch.distributed gloo.

Every measurement runs a sender and a receiver in separate processes on loopback:

* ``tput``: one-way throughput of tensor messages (4 KB, 4 MB, 44 MB, 100 MB): byzsgd, raw, gloo.
* ``rtt``: the round trip of a 64-byte message (p50, p99), and ``msgs``: one-way 4 KB messages
  per second, for four kinds measured in the same run: ``byzsgd`` (two real, authenticated
  ``byzsgd.net.Node`` objects), ``uvloop`` (a bare ``asyncio.Protocol`` echo on uvloop: no
  framing, no dispatch: the floor of any asyncio design), ``asyncio`` (the same on the stock
  loop) and ``raw`` (blocking ``sendall``/``recv_into``: the floor without an event loop);
  and two floors of *this design's shape* (:func:`framed_child`): ``msgpack`` (a length prefix,
  a msgpack header packed and unpacked, a handler looked up by kind: no checks, no queue) and
  ``msgpack_torch`` (the same, the payload read from a tensor and received as one).
* ``fanout``: a PS's fan-out: one model sent to ``--fanout`` (100) peers, timed until every
  peer acknowledged it (wall, and the sender's CPU: what the PS pays), byzsgd, uvloop and raw,
  against ``fanout`` memory copies of the model (the "one copy per recipient" floor).  The
  receivers are ``FANOUT_PROCS`` processes hosting the peers.
* ``cost``: where byzsgd's microseconds go, in one process (no scheduler in the way): a 64-byte
  round trip between two Nodes on one loop against the uvloop echo on one loop, each stage of
  the per-message path timed alone, and the top of the round trip's cProfile.

Why two runs of the previous version disagreed 4x on the *raw* 64-byte round trip (15.8 µs and
68.5 µs): nothing pinned the processes, so the kernel chose where they ran.  A blocking
ping-pong whose two ends share a CPU is a direct hand-off (the sender blocks in ``recv``, the
woken receiver runs on the same CPU): 15.6 µs here; with the ends on two CPUs every hop wakes
the other, often idle, vCPU (a halt-polling VM): 34-47 µs, more on a quiet host.  Which one a run
gets depends on the load at that moment (a busy machine keeps a waker and its wakee on one
CPU), and the kinds of one run could land differently: byzsgd across CPUs, raw on one, likely
the 8x of the issue.  The rest was already equal (TCP_NODELAY on both ends of both kinds, so no
Nagle; kernel-default, autotuned buffers; 100 discarded round trips each).  Same code, this
2-vCPU VM under load, three runs each (``--placement``)::

    none (unpinned): 15.5 15.7 15.6 µs   same (one CPU): 15.6 15.5 15.7 µs
    split (two CPUs): 40.8 46.6 33.7 µs

So now: every child pins itself (``--placement same``, the default: both ends of every kind on
one CPU, which measures the CPU cost of the path and stays put under load; ``split``: senders
on one CPU, receivers on another, which adds the same cross-CPU wake-ups to every kind;
``none``: the old behaviour); every kind applies the same socket options (:func:`tune`:
TCP_NODELAY, no SO_SNDBUF/SO_RCVBUF, which would turn autotuning off) and reports what its socket
has (``sockopts``; a socket without TCP_NODELAY fails the run); every kind has the same
warm-up (``WARMUP`` round trips or messages, untimed); the kinds alternate run by run (A B C D
A B C D ...) and the medians over ``--repeat`` runs are kept.

Prints tables; with ``--json`` the last line is one JSON object:
``{"sizes": {"<bytes>": {"byzsgd_gbps", "raw_gbps", "gloo_gbps", ...}},
"rtt_us": {"<kind>_p50", "<kind>_p99", "byzsgd_over_raw_p50", "byzsgd_over_uvloop_p50", ...},
"msgs": {"4096": {"<kind>_msgs_s", ...}}, "fanout": {"<bytes>": {"<kind>_s", "<kind>_cpu_s",
"memcpy_s", "byzsgd_over_raw", "byzsgd_over_uvloop", "byzsgd_cpu_over_raw_cpu", ...}},
"ratios": {"rtt_p50": {"byzsgd_over_uvloop", "byzsgd_over_raw", "byzsgd_over_msgpack", ...}, "rtt_p99": {...},
"msgs_4096": {...}, "fanout_31400": {...}, "fanout_31400_cpu": {...}, ...}, "sockopts",
"placement", "cost_us"}``.  A ratio is byzsgd's number over the other kind's: above 1 is slower
for times, below 1 is slower for msgs/s.  ``*_cpu_s``: the sender's CPU seconds per fan-out.
GB/s = 1e9 bytes/s.  ``--quick`` keeps it short; ``--only rtt,msgs,fanout,cost`` runs a subset.
Taken beside other work the numbers are noisy: compare the kinds of one run, not runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SIZES = [4096, 4 << 20, 44 << 20, 100 << 20]
SECRET = b"bench-secret-0123456789abcdef"
#: round trips (rtt) or messages (msgs) every kind runs untimed before it measures
WARMUP = 200
MSG_SIZE = 4096
SMALL_KINDS = ("byzsgd", "uvloop", "asyncio", "raw", "msgpack", "msgpack_torch")
#: a corked floor: the 4 KB messages only (a round trip has nothing to join)
MSGS_KINDS = SMALL_KINDS + ("msgpack_torch_corked",)
#: the bytes of a corked write (byzsgd's outbox joins small frames up to 64 KB)
CORK_BYTES = 64 << 10
#: the kinds byzsgd's small-message rows are divided by (``byzsgd_over_<kind>``)
BASELINES = ("uvloop", "raw", "asyncio", "msgpack", "msgpack_torch")
PLACEMENTS = ("same", "split", "none")
_CPUS_ENV = "BENCH_NET_CPUS"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def counts(size: int, quick: bool) -> int:
    total = (96 << 20) if quick else (2 << 30)
    n = max(3, total // size)
    return min(n, 5000 if quick else 100000)


# ----------------------------------------------------------------------------- fairness
def tune(sock) -> None:
    """The socket options of every kind: what byzsgd's Connection sets that matters for speed
    (TCP_NODELAY); buffers left to the kernel's autotuning, as byzsgd leaves them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def sockopts(sock) -> dict:
    """What a connected socket has; a child refuses to measure without TCP_NODELAY."""
    out = {"nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
           "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
           "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
    if not out["nodelay"]:
        raise SystemExit("bench_net: a socket without TCP_NODELAY: the kinds would not compare")
    return out


def placement_env(placement: str) -> tuple[dict, dict]:
    """The environment of the senders and of the receivers for ``placement``."""
    if placement == "none" or not hasattr(os, "sched_setaffinity"):
        return {}, {}
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return {_CPUS_ENV: str(cpus[0])}, {_CPUS_ENV: str(cpus[0])}
    if len(cpus) < 2:
        raise SystemExit("bench_net: --placement split needs two CPUs")
    return {_CPUS_ENV: str(cpus[0])}, {_CPUS_ENV: str(cpus[1])}


def pin_self() -> None:
    cpus = os.environ.get(_CPUS_ENV)
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def _env(extra: dict) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop(_CPUS_ENV, None)
    env.update(extra)
    return env


def rtt_stats(lat) -> dict:
    lat = sorted(lat)
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# ----------------------------------------------------------------------------- byzsgd children
def byz_child(role: str, size: int, n: int, ports: list[int], mode: str) -> dict:
    """Two real Nodes (rank 0 receives, rank 1 sends), authenticated by the handshake."""
    import torch

    from byzsgd.net import FrameLimits, Node, PeerDirectory, run

    torch.set_num_threads(1)
    d = PeerDirectory({0: ("127.0.0.1", ports[0]), 1: ("127.0.0.1", ports[1])}, num_ps=1)
    lim = FrameLimits.for_model(max(size // 4, 1024))
    rank = 0 if role == "recv" else 1
    warm = 1 if mode == "tput" else WARMUP

    async def main():
        node = Node(rank, "ps" if rank == 0 else "worker", SECRET, directory=d, limits=lim,
                    listen_host="127.0.0.1", outbox_depth=64)
        loop = asyncio.get_running_loop()
        state = {"n": 0, "done": loop.create_future()}
        if role == "recv":
            def on_t(msg):
                state["n"] += 1
                msg.release()
                if state["n"] in (warm, n + warm):  # after the warm-up, then at the end
                    node.send(1, "ack", 0)

            def on_ping(msg):
                node.send(1, "pong", msg.step, msg.tensors)
                msg.release()

            node.on("t", on_t)
            node.on("ping", on_ping)
            node.on("stop", lambda m: state["done"].set_result(None))
            await node.start()
            await state["done"]
            await asyncio.sleep(0.05)
            await node.close()
            return {}
        waiter = {"f": None}

        def on_ack(msg):
            if waiter["f"] is not None and not waiter["f"].done():
                waiter["f"].set_result(msg)

        node.on("ack", on_ack)
        node.on("pong", on_ack)
        await node.start()
        await node.wait_connected({0}, 30)
        out = {"sockopts": sockopts(node.connection(0).transport.get_extra_info("socket"))}
        if mode in ("tput", "msgs"):
            x = torch.ones(size // 4, dtype=torch.float32)
            waiter["f"] = loop.create_future()
            pending = []
            for i in range(warm):  # warm-up: connection, pool buffer, code paths
                pending.append(node.send(0, "t", i, [x]))
                if len(pending) >= 32:
                    await pending.pop(0)
            await waiter["f"]
            waiter["f"] = loop.create_future()
            t0 = time.perf_counter()
            for i in range(n):
                pending.append(node.send(0, "t", i + 1, [x]))
                if len(pending) >= 32:
                    await pending.pop(0)
            await waiter["f"]
            dt = time.perf_counter() - t0
            out.update(gbps=n * size / dt / 1e9, msgs_s=n / dt)
        else:
            x = torch.zeros(16, dtype=torch.float32)  # 64 bytes
            lat = []
            for i in range(n + warm):
                waiter["f"] = loop.create_future()
                t0 = time.perf_counter()
                node.send(0, "ping", i, [x])
                await waiter["f"]
                if i >= warm:
                    lat.append(time.perf_counter() - t0)
            out.update(rtt_stats(lat))
        await node.send(0, "stop", 0)
        await node.close()
        return out

    return run(main())


# ----------------------------------------------------------------------------- asyncio echo children
def aio_child(role: str, size: int, n: int, ports: list[int], mode: str, loop_kind: str = "uvloop") -> dict:
    """The floor of an asyncio design: protocols that move bytes and nothing else (no framing,
    no header, no dispatch), on uvloop or the stock loop.  rtt: the receiver echoes what it
    gets; the sender awaits a future per round trip, as byzsgd's sender does.  msgs: one
    ``transport.write`` per message under the transport's flow control; the receiver counts
    bytes and answers one byte after the warm-up and at the end."""
    if loop_kind == "uvloop":
        import uvloop
        new_loop = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop
    warm = WARMUP

    async def recv():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        class Echo(asyncio.BufferedProtocol):
            def connection_made(self, tr):
                self.tr, self.got = tr, 0
                tune(tr.get_extra_info("socket"))
                self.buf = memoryview(bytearray(256 << 10))

            def get_buffer(self, hint):
                return self.buf

            def buffer_updated(self, k):
                if mode == "rtt":
                    self.tr.write(bytes(self.buf[:k]))
                    return
                before, self.got = self.got, self.got + k
                for mark in (warm * size, (warm + n) * size):
                    if before < mark <= self.got:
                        self.tr.write(b"k")

            def connection_lost(self, exc):
                done.done() or done.set_result(None)

        srv = await loop.create_server(Echo, "127.0.0.1", ports[0], reuse_address=True)
        await done
        srv.close()
        return {}

    async def send():
        loop = asyncio.get_running_loop()
        st = {"f": None, "want": 0, "got": 0, "paused": None}

        class Client(asyncio.Protocol):
            def data_received(self, data):
                st["got"] += len(data)
                if st["got"] >= st["want"] and st["f"] is not None and not st["f"].done():
                    st["f"].set_result(None)

            def pause_writing(self):
                st["paused"] = loop.create_future()

            def resume_writing(self):
                p, st["paused"] = st["paused"], None
                p is not None and not p.done() and p.set_result(None)

        tr, _p = await aio_connect_retry(loop, Client, ports[0])
        sock = tr.get_extra_info("socket")
        tune(sock)
        out = {"sockopts": sockopts(sock)}
        if mode == "rtt":
            payload, lat = bytes(64), []
            for i in range(n + warm):
                st["f"], st["want"] = loop.create_future(), st["want"] + 64
                t0 = time.perf_counter()
                tr.write(payload)
                await st["f"]
                if i >= warm:
                    lat.append(time.perf_counter() - t0)
            out.update(rtt_stats(lat))
        else:
            payload = b"\x01" * size
            for count, ack in ((warm, 1), (n, 2)):
                st["f"], st["want"] = loop.create_future(), ack
                if ack == 2:
                    t0 = time.perf_counter()
                for _ in range(count):
                    tr.write(payload)
                    if st["paused"] is not None:
                        await st["paused"]
                await st["f"]
            dt = time.perf_counter() - t0
            out.update(gbps=n * size / dt / 1e9, msgs_s=n / dt)
        tr.close()
        return out

    loop = new_loop()
    try:
        return loop.run_until_complete(recv() if role == "recv" else send())
    finally:
        loop.close()


def uvloop_child(role, size, n, ports, mode):
    return aio_child(role, size, n, ports, mode, "uvloop")


def asyncio_child(role, size, n, ports, mode):
    return aio_child(role, size, n, ports, mode, "asyncio")


# ----------------------------------------------------------------------------- the design's floor
def framed_child(role: str, size: int, n: int, ports: list[int], mode: str, with_torch: bool = False,
                 cork: bool = False) -> dict:
    """The floor of *this design's shape*, whatever its implementation: every message is a
    length prefix, a msgpack header (kind, step, sender, one tensor spec, meta) packed by the
    sender and unpacked by the receiver, the payload, and a handler looked up by kind; on uvloop,
    in a plain ``asyncio.Protocol``.  Nothing else: no limits, no validation of the header, no
    check of the sender, no queue, no futures.  ``with_torch`` (kind ``msgpack_torch``): the
    payload is a tensor's, as it is for a node: the sender reads its bytes
    (``ctypes.string_at(t.data_ptr(), n)``, byzsgd's own way) and the receiver builds a tensor
    over them (``torch.frombuffer``).  byzsgd over these kinds is what its checks and plumbing
    cost; these kinds over the bare echo are what the shape costs before a line of byzsgd.
    ``cork`` (kind ``msgpack_torch_corked``, msgs only): the sender joins the frames of a burst
    into writes of up to :data:`CORK_BYTES`, as byzsgd's outbox does (a round trip has one
    message in flight: nothing to join)."""
    import ctypes
    import struct

    import msgpack
    import uvloop

    torch = None
    if with_torch:
        import torch
        torch.set_num_threads(1)
    prefix = struct.Struct("<II")
    packer = msgpack.Packer()  # reused, as byzsgd's is
    elems = size // 4
    warm = WARMUP

    def payload_of(t):
        return ctypes.string_at(t.data_ptr(), elems * 4) if with_torch else t

    def frame(kind: str, step: int, t) -> bytes:
        body = payload_of(t)
        head = packer.pack([kind, step, 1, [["float32", [elems], len(body)]], {}])
        return b"".join((prefix.pack(len(head), len(body)), head, body))

    class Framed(asyncio.Protocol):
        """Cuts frames out of the byte stream and calls ``handlers[kind](step, tensor)``."""

        def __init__(self, handlers):
            self.handlers, self.buf, self.tr = handlers, bytearray(), None

        def connection_made(self, tr):
            self.tr = tr
            tune(tr.get_extra_info("socket"))

        def data_received(self, data):
            buf = self.buf
            buf += data
            pos, end = 0, len(buf)
            while end - pos >= prefix.size:
                hl, bl = prefix.unpack_from(buf, pos)
                stop = pos + prefix.size + hl + bl
                if stop > end:
                    break
                kind, step, _sender, _specs, _meta = msgpack.unpackb(buf[pos + prefix.size:pos + prefix.size + hl])
                body = buf[stop - bl:stop]  # a copy, as a node's receive buffer is its own
                t = torch.frombuffer(body, dtype=torch.float32) if with_torch else body
                pos = stop
                self.handlers[kind](step, t)
            del buf[:pos]

    async def recv():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        st = {"n": 0}

        def make():
            proto = Framed({})

            def on_ping(step, t):
                proto.tr.write(frame("pong", step, t))

            def on_t(step, t):
                st["n"] += 1
                if st["n"] in (warm, n + warm):
                    proto.tr.write(frame("ack", 0, ack_payload))

            proto.handlers.update(ping=on_ping, t=on_t)
            proto.connection_lost = lambda exc: done.done() or done.set_result(None)
            return proto

        srv = await loop.create_server(make, "127.0.0.1", ports[0], reuse_address=True)
        await done
        srv.close()
        return {}

    async def send():
        loop = asyncio.get_running_loop()
        st = {"f": None, "paused": None}

        def resolve(step, t):
            f = st["f"]
            if f is not None and not f.done():
                f.set_result(None)

        class Client(Framed):
            def pause_writing(self):
                st["paused"] = loop.create_future()

            def resume_writing(self):
                fut, st["paused"] = st["paused"], None
                fut is not None and not fut.done() and fut.set_result(None)

        tr, _p = await aio_connect_retry(loop, lambda: Client({"pong": resolve, "ack": resolve}), ports[0])
        out = {"sockopts": sockopts(tr.get_extra_info("socket"))}
        x = torch.zeros(elems, dtype=torch.float32) if with_torch else bytes(size)
        if mode == "rtt":
            lat = []
            for i in range(n + warm):
                st["f"] = loop.create_future()
                t0 = time.perf_counter()
                tr.write(frame("ping", i, x))
                await st["f"]
                if i >= warm:
                    lat.append(time.perf_counter() - t0)
            out.update(rtt_stats(lat))
        else:
            per_write = max(1, CORK_BYTES // (size + 64)) if cork else 1
            for count, timed in ((warm, False), (n, True)):
                st["f"] = loop.create_future()
                t0 = time.perf_counter()
                for i in range(0, count, per_write):
                    if per_write == 1:
                        tr.write(frame("t", i, x))
                    else:  # corked: the frames of a burst in one write, as byzsgd's outbox does
                        tr.write(b"".join([frame("t", j, x) for j in range(i, min(i + per_write, count))]))
                    if st["paused"] is not None:
                        await st["paused"]
                await st["f"]
            dt = time.perf_counter() - t0
            out.update(gbps=n * size / dt / 1e9, msgs_s=n / dt)
        tr.close()
        return out

    ack_payload = torch.zeros(elems, dtype=torch.float32) if with_torch else bytes(size)
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(recv() if role == "recv" else send())
    finally:
        loop.close()


def msgpack_child(role, size, n, ports, mode):
    return framed_child(role, size, n, ports, mode, with_torch=False)


def msgpack_torch_child(role, size, n, ports, mode):
    return framed_child(role, size, n, ports, mode, with_torch=True)


def msgpack_torch_corked_child(role, size, n, ports, mode):
    return framed_child(role, size, n, ports, mode, with_torch=True, cork=True)


# ----------------------------------------------------------------------------- raw socket children
def _recv_exact(c, mv, size: int) -> None:
    got = 0
    while got < size:
        k = c.recv_into(mv[got:size])
        if not k:
            raise SystemExit("eof")
        got += k


def raw_child(role: str, size: int, n: int, ports: list[int], mode: str) -> dict:
    """Blocking sockets, one ``sendall`` per message: the floor without an event loop."""
    port = ports[0]
    warm = 1 if mode == "tput" else WARMUP
    if role == "recv":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        c, _ = srv.accept()
        tune(c)
        if mode in ("tput", "msgs"):
            mv = memoryview(bytearray(size))
            for i in range(n + warm):
                _recv_exact(c, mv, size)
                if i + 1 in (warm, n + warm):
                    c.sendall(b"k")
        else:
            mv = memoryview(bytearray(64))
            for _ in range(n + warm):
                _recv_exact(c, mv, 64)
                c.sendall(mv)
        c.close()
        srv.close()
        return {}
    c = connect_retry(port)
    tune(c)
    out = {"sockopts": sockopts(c)}
    if mode in ("tput", "msgs"):
        data = bytearray(b"\x01" * size)
        for _ in range(warm):
            c.sendall(data)
        c.recv(1)
        t0 = time.perf_counter()
        for _ in range(n):
            c.sendall(data)
        c.recv(1)
        dt = time.perf_counter() - t0
        c.close()
        out.update(gbps=n * size / dt / 1e9, msgs_s=n / dt)
        return out
    mv = memoryview(bytearray(64))
    lat = []
    for i in range(n + warm):
        t0 = time.perf_counter()
        c.sendall(mv)
        _recv_exact(c, mv, 64)
        if i >= warm:
            lat.append(time.perf_counter() - t0)
    c.close()
    out.update(rtt_stats(lat))
    return out


def connect_retry(port: int) -> socket.socket:
    for _ in range(500):
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            time.sleep(0.01)
    raise SystemExit("cannot connect")


async def aio_connect_retry(loop, factory, port: int):
    """:func:`connect_retry` for the asyncio kinds: ``(transport, protocol)`` once the receiver
    listens (it starts at the same time as the sender)."""
    for _ in range(500):
        try:
            return await loop.create_connection(factory, "127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
    raise SystemExit("cannot connect")


# ----------------------------------------------------------------------------- gloo children
def gloo_child(role: str, size: int, n: int, ports: list[int], mode: str) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = 0 if role == "send" else 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2)
    x = torch.ones(size // 4) if rank == 0 else torch.empty(size // 4)
    ack = torch.zeros(1)
    out = {}
    if rank == 0:
        dist.send(x, 1)
        dist.recv(ack, 1)
        t0 = time.perf_counter()
        for _ in range(n):
            dist.send(x, 1)
        dist.recv(ack, 1)
        out = {"gbps": n * size / (time.perf_counter() - t0) / 1e9}
    else:
        dist.recv(x, 0)
        dist.send(ack, 0)
        for _ in range(n):
            dist.recv(x, 0)
        dist.send(ack, 0)
    dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------- fan-out children
FANOUT_PROCS = 2
#: the linear model of bench_scale (7,850 parameters), and a 431,080-parameter model (1.7 MB; called
#: "the MNIST convnet" here before: that one has 21,840, docs/scale_plan.md), kept for comparison
FANOUT_SIZES = [7850 * 4, 431080 * 4]
FANOUT_WARMUP = 3


def _fan_ranks(nrecv: int, part: int) -> list[int]:
    return [r for r in range(1, nrecv + 1) if r % FANOUT_PROCS == part]


def byz_fan_child(role: str, size: int, rounds: int, ports: list[int], nrecv: int) -> dict:
    """role "send": rank 0, a PS that broadcasts one model per round to ranks 1..nrecv and
    waits for every ack; role "recvK": the workers of part K (each its own Node).  At the end
    every worker answers ``stop`` with ``bye`` and the PS closes only once it has every bye:
    closing earlier reset connections whose ``stop`` a starved worker had not read yet, and
    that worker's process then waited for ever (seen with all processes on one CPU)."""
    import torch

    from byzsgd.net import FrameLimits, Node, PeerDirectory, run

    torch.set_num_threads(1)
    d = PeerDirectory({r: ("127.0.0.1", ports[r]) for r in range(nrecv + 1)}, num_ps=1)
    lim = FrameLimits.for_model(max(size // 4, 1024))

    async def main():
        loop = asyncio.get_running_loop()
        if role != "send":
            nodes = []
            stop = loop.create_future()
            for r in _fan_ranks(nrecv, int(role[4:])):
                n = Node(r, "worker", SECRET, directory=d, limits=lim, listen_host="127.0.0.1")

                def on_m(msg, n=n):
                    n.send(0, "ack", msg.step)
                    msg.release()
                def on_stop(msg, n=n):
                    n.send(0, "bye", 0)
                    msg.release()
                    stopped.add(n.rank)
                    if len(stopped) == len(nodes) and not stop.done():
                        stop.set_result(None)
                n.on("m", on_m)
                n.on("stop", on_stop)
                nodes.append(n)
            stopped: set[int] = set()
            for n in nodes:
                await n.start()
            await stop
            for n in nodes:
                await n.close(drain_timeout=1)
            return {}
        node = Node(0, "ps", SECRET, directory=d, limits=lim, listen_host="127.0.0.1",
                    max_preauth_per_address=nrecv + 8)
        st = {"left": 0, "f": None}

        def on_ack(msg):
            st["left"] -= 1
            if st["left"] == 0:
                st["f"].set_result(None)
        node.on("ack", on_ack)
        node.on("bye", on_ack)
        await node.start()
        ranks = list(range(1, nrecv + 1))
        await node.wait_connected(set(ranks), 120)
        x = torch.ones(size // 4, dtype=torch.float32)
        times, cpu = [], []
        for i in range(rounds + FANOUT_WARMUP):
            st["left"], st["f"] = nrecv, loop.create_future()
            t0, c0 = time.perf_counter(), time.process_time()
            node.broadcast(ranks, "m", i, [x])
            await st["f"]
            if i >= FANOUT_WARMUP:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        st["left"], st["f"] = nrecv, loop.create_future()
        node.broadcast(ranks, "stop", 0)
        await asyncio.wait([st["f"]], timeout=60)
        await node.close()
        return {"s": statistics.median(times), "cpu_s": statistics.median(cpu)}

    return run(main())


def raw_fan_child(role: str, size: int, rounds: int, ports: list[int], nrecv: int) -> dict:
    """The same fan-out over raw blocking sockets: the sender ``sendall``s the model to each
    peer in turn, every peer answers one byte per model (a selector loop per part)."""
    import selectors

    if role != "send":
        socks = [connect_retry(ports[0]) for _ in _fan_ranks(nrecv, int(role[4:]))]
        sel = selectors.DefaultSelector()
        state = {}
        for c in socks:
            tune(c)
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            state[c] = [bytearray(size), 0]
        open_ = len(socks)
        while open_:
            for key, _ in sel.select():
                c = key.fileobj
                buf, got = state[c]
                try:
                    k = c.recv_into(memoryview(buf)[got:])
                except BlockingIOError:
                    continue
                if not k:
                    sel.unregister(c)
                    open_ -= 1
                    continue
                got += k
                if got == size:
                    c.setblocking(True)
                    c.sendall(b"k")
                    c.setblocking(False)
                    got = 0
                state[c][1] = got
        return {}
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", ports[0]))
    srv.listen(nrecv + 8)
    peers = []
    for _ in range(nrecv):
        c, _ = srv.accept()
        tune(c)
        peers.append(c)
    data = bytearray(b"\x01" * size)
    one = bytearray(1)
    times, cpu = [], []
    for i in range(rounds + FANOUT_WARMUP):
        t0, c0 = time.perf_counter(), time.process_time()
        for c in peers:
            c.sendall(data)
        for c in peers:
            c.recv_into(one)
        if i >= FANOUT_WARMUP:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    for c in peers:
        c.close()
    srv.close()
    return {"s": statistics.median(times), "cpu_s": statistics.median(cpu)}


def uvloop_fan_child(role: str, size: int, rounds: int, ports: list[int], nrecv: int) -> dict:
    """The same fan-out with bare uvloop protocols: the sender writes the model's bytes to each
    peer's transport, every peer answers one byte per model (no framing, no dispatch)."""
    import uvloop

    async def recv():
        loop = asyncio.get_running_loop()
        lost = {"n": 0, "f": loop.create_future()}
        mine = _fan_ranks(nrecv, int(role[4:]))

        class Peer(asyncio.BufferedProtocol):
            def connection_made(self, tr):
                self.tr, self.got = tr, 0
                self.buf = memoryview(bytearray(size))
                tune(tr.get_extra_info("socket"))

            def get_buffer(self, hint):
                return self.buf[self.got:]

            def buffer_updated(self, k):
                self.got += k
                if self.got == size:
                    self.got = 0
                    self.tr.write(b"k")

            def connection_lost(self, exc):
                lost["n"] += 1
                if lost["n"] == len(mine) and not lost["f"].done():
                    lost["f"].set_result(None)

        for _ in mine:
            await aio_connect_retry(loop, Peer, ports[0])
        await lost["f"]
        return {}

    async def send():
        loop = asyncio.get_running_loop()
        st = {"left": 0, "f": None, "conns": [], "all": loop.create_future()}

        class Srv(asyncio.Protocol):
            def connection_made(self, tr):
                tune(tr.get_extra_info("socket"))
                st["conns"].append(tr)
                if len(st["conns"]) == nrecv:
                    st["all"].set_result(None)

            def data_received(self, data):
                st["left"] -= len(data)
                if st["left"] == 0:
                    st["f"].set_result(None)

        srv = await loop.create_server(Srv, "127.0.0.1", ports[0], reuse_address=True, backlog=nrecv + 8)
        await asyncio.wait_for(st["all"], 120)
        data = b"\x01" * size
        times, cpu = [], []
        for i in range(rounds + FANOUT_WARMUP):
            st["left"], st["f"] = nrecv, loop.create_future()
            t0, c0 = time.perf_counter(), time.process_time()
            for tr in st["conns"]:
                tr.write(data)
            await st["f"]
            if i >= FANOUT_WARMUP:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        for tr in st["conns"]:
            tr.close()
        srv.close()
        return {"s": statistics.median(times), "cpu_s": statistics.median(cpu)}

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(send() if role == "send" else recv())
    finally:
        loop.close()


def memcpy_fanout(size: int, nrecv: int, rounds: int) -> float:
    """The floor: ``nrecv`` copies of the model, one per recipient (median over rounds)."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(nrecv):
            np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fan(kind: str, size: int, rounds: int, nrecv: int, timeout: float = 300, placement: str = "none") -> dict:
    """{"s": wall seconds until every peer acknowledged, "cpu_s": the sender's CPU seconds}
    per round (medians).  The receivers' pipes are read to the end (``communicate``): a bare
    ``wait`` deadlocked once their nodes' reconnect warnings filled the stderr pipe."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from byzsgd.net.peers import free_ports

    ports = free_ports(nrecv + 1)
    send_env, recv_env = placement_env(placement)
    procs = {}
    for role in ["send"] + [f"recv{k}" for k in range(FANOUT_PROCS)]:
        procs[role] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--fan_child", kind, role, str(size), str(rounds),
             ",".join(map(str, ports)), str(nrecv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(send_env if role == "send" else recv_env))
    try:
        out, err = procs["send"].communicate(timeout=timeout)
        if procs["send"].returncode != 0:
            raise RuntimeError(f"{kind} fan-out sender failed: {err[-2000:]}")
        for role, p in procs.items():
            if role != "send":
                try:
                    p.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    raise RuntimeError(f"{kind} fan-out {role} did not finish: {p.communicate()[1][-2000:]}") from None
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


FAN_CHILDREN = {"byzsgd": byz_fan_child, "uvloop": uvloop_fan_child, "raw": raw_fan_child}
FAN_KINDS = ("byzsgd", "uvloop", "raw")


CHILDREN = {"byzsgd": byz_child, "uvloop": uvloop_child, "asyncio": asyncio_child, "raw": raw_child,
            "msgpack": msgpack_child, "msgpack_torch": msgpack_torch_child,
            "msgpack_torch_corked": msgpack_torch_corked_child, "gloo": gloo_child}


def pair(kind: str, size: int, n: int, mode: str = "tput", timeout: float = 300, placement: str = "none") -> dict:
    ports = [free_port(), free_port()]
    args = [sys.executable, os.path.abspath(__file__), "--child", kind, "", str(size), str(n),
            ",".join(map(str, ports)), mode]
    send_env, recv_env = placement_env(placement)
    procs = {}
    for role in ("recv", "send"):
        a = list(args)
        a[4] = role
        procs[role] = subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=_env(send_env if role == "send" else recv_env))
    res = {}
    try:
        for role, p in procs.items():
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{kind} {role} failed: {err[-2000:]}")
            if role == "send":
                res = json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return res


# ----------------------------------------------------------------------------- where the microseconds go
def _per_call_us(fn, n: int, batch: int = 50) -> float:
    """CPU µs per call of ``fn()`` (kernel time included): the median over batches of
    ``batch`` calls.  CPU time and small batches, because on a shared machine a wall-clock
    loop also counts the slices other processes take from it."""
    runs = []
    for _ in range(max(n // batch, 5)):
        c0 = time.process_time()
        for _ in range(batch):
            fn()
        runs.append((time.process_time() - c0) / batch * 1e6)
    return statistics.median(runs)


def cost(quick: bool) -> dict:
    """Where byzsgd's 64-byte round trip spends its time, in one process on one uvloop loop
    (no second process, so no scheduler and no wake-ups: CPU only).  ``inproc_rtt_us``: a
    round trip between two Nodes, and the bare uvloop echo's (median wall time); ``stages_us``:
    each step of the per-message path alone (CPU µs, :func:`_per_call_us`); ``profile``: the
    round trip's top functions by own CPU time (cProfile on the process clock; its overhead
    inflates Python-heavy code, so read the shares, ``own_share``)."""
    import cProfile
    import pstats

    import torch
    import uvloop

    from byzsgd.net import FrameLimits, Node, PeerDirectory
    from byzsgd.net.bufpool import BufferPool
    from byzsgd.net.codec import from_buffer
    from byzsgd.net.frame import build_message, decode_header, encode, parse_prefix, PREFIX
    from byzsgd.net.protocol import FrameReader

    torch.set_num_threads(1)
    n = 2000 if quick else 10000
    out: dict = {"n": n}
    lim = FrameLimits.for_model(1024)
    x = torch.zeros(16, dtype=torch.float32)

    async def echo_rtt() -> float:
        loop = asyncio.get_running_loop()
        st = {"f": None}

        class Echo(asyncio.Protocol):
            def connection_made(self, tr):
                self.tr = tr
                tune(tr.get_extra_info("socket"))

            def data_received(self, data):
                self.tr.write(data)

        class Client(asyncio.Protocol):
            def data_received(self, data):
                st["f"].set_result(None)

        srv = await loop.create_server(Echo, "127.0.0.1", 0)
        tr, _ = await loop.create_connection(Client, "127.0.0.1", srv.sockets[0].getsockname()[1])
        tune(tr.get_extra_info("socket"))
        payload, lat = bytes(64), []
        for i in range(n + WARMUP):
            st["f"] = loop.create_future()
            t0 = time.perf_counter()
            tr.write(payload)
            await st["f"]
            if i >= WARMUP:
                lat.append(time.perf_counter() - t0)
        tr.close()
        srv.close()
        return statistics.median(lat) * 1e6

    async def byz(profile: bool) -> dict:
        loop = asyncio.get_running_loop()
        ports = [free_port(), free_port()]
        d = PeerDirectory({0: ("127.0.0.1", ports[0]), 1: ("127.0.0.1", ports[1])}, num_ps=1)
        a = Node(0, "ps", SECRET, directory=d, limits=lim, listen_host="127.0.0.1")
        b = Node(1, "worker", SECRET, directory=d, limits=lim, listen_host="127.0.0.1")
        st = {"f": None, "nop": 0, "want": 0, "g": None}

        def on_ping(msg):
            a.send(1, "pong", msg.step, msg.tensors)
            msg.release()

        def on_pong(msg):
            msg.release()
            st["f"].set_result(None)

        def on_nop(msg):
            msg.release()
            st["nop"] += 1
            if st["nop"] == st["want"]:
                st["g"].set_result(None)
        a.on("ping", on_ping)
        a.on("nop", on_nop)
        b.on("pong", on_pong)
        await a.start()
        await b.start()
        await b.wait_connected({0}, 30)
        prof = cProfile.Profile(time.process_time) if profile else None
        lat = []
        for i in range(n + WARMUP):
            if prof is not None and i == WARMUP:
                prof.enable()
            st["f"] = loop.create_future()
            t0 = time.perf_counter()
            b.send(0, "ping", i, [x])
            await st["f"]
            if i >= WARMUP:
                lat.append(time.perf_counter() - t0)
        res = {"rtt_us": statistics.median(lat) * 1e6}
        if prof is not None:
            prof.disable()
            stats = pstats.Stats(prof)
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
            total = sum(v[2] for v in stats.stats.values())
            res["profile"] = [{"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})",
                               "calls_per_rtt": round(v[1] / n, 2),
                               "own_us_per_rtt": round(v[2] / n * 1e6, 2),
                               "own_share": round(v[2] / total, 3),
                               "cum_us_per_rtt": round(v[3] / n * 1e6, 2)} for k, v in rows]
            res["profile_total_us_per_rtt"] = round(total / n * 1e6, 1)
        else:
            # the send path alone: Node.send (encode, outbox, transport.write) of a 64-byte
            # message, bursts of 50 (the first written at once, the rest corked and joined
            # into one write at the end of the loop iteration: included, the last future waits
            # for it) that the peer's handler counts before the next burst
            runs = []
            for _ in range(max(n // 50, 5)):
                st["want"], st["g"] = st["nop"] + 50, loop.create_future()
                c0 = time.process_time()
                for i in range(50):
                    last = b.send(0, "nop", i, [x])
                await last
                runs.append((time.process_time() - c0) / 50 * 1e6)
                await st["g"]
            res["send_call_us"] = statistics.median(runs)
            # the dispatch alone: route -> Connection.deliver -> the handler (a counter)
            conn = a.connection(1)

            def one_route():
                m = build_message(hdr, bytearray(64), None)
                a.dispatcher.route(conn, m)
            buffers, _, _ = encode("nop", 1, 1, [x], None, lim)
            frame = buffers[0]
            hlen, blen = parse_prefix(frame, lim)
            hdr = decode_header(memoryview(frame)[PREFIX.size:PREFIX.size + hlen], blen, lim,
                                kinds=a.dispatcher.kinds, sender=1)
            st["want"] = -1  # the counter's future is not set again
            res["route_us"] = _per_call_us(one_route, n) - _per_call_us(
                lambda: build_message(hdr, bytearray(64), None), n)
        await b.close(drain_timeout=0.1)
        await a.close(drain_timeout=0.1)
        return res

    def run_loop(coro):
        loop = uvloop.new_event_loop()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    echo = run_loop(echo_rtt())
    plain = run_loop(byz(False))
    profiled = run_loop(byz(True))
    out["inproc_rtt_us"] = {"uvloop_echo": round(echo, 1), "byzsgd": round(plain["rtt_us"], 1),
                            "byzsgd_minus_echo": round(plain["rtt_us"] - echo, 1),
                            "byzsgd_over_echo": round(plain["rtt_us"] / echo, 2)}
    # each stage alone, per message (a round trip is two messages)
    buffers, total, _ = encode("ping", 1, 1, [x], None, lim)
    frame = buffers[0]
    hlen, blen = parse_prefix(frame, lim)
    hmv = memoryview(frame)[PREFIX.size:PREFIX.size + hlen]
    kinds = {"ping": None, "pong": None}
    hdr = decode_header(hmv, blen, lim, kinds=kinds, sender=1)
    reader = FrameReader(lim, BufferPool(), kinds=kinds, sender=1, handshake=False)
    body = bytearray(frame[PREFIX.size + hlen:])  # writable, as the reader's copy is

    def feed():
        mv = reader.get_buffer()
        mv[:total] = frame
        reader.feed(total)

    loop = uvloop.new_event_loop()

    async def wake():
        f = loop.create_future()
        loop.call_soon(f.set_result, None)
        await f

    def wakes(k=1000):
        async def many():
            for _ in range(k):
                await wake()
        loop.run_until_complete(many())

    tune_ok = True
    try:
        s1 = socket.create_server(("127.0.0.1", 0))
        c1 = socket.create_connection(s1.getsockname())
        c2, _ = s1.accept()
        tune(c1)
        tune(c2)
        buf = bytearray(total)

        def syscalls():
            c1.send(frame)
            c2.recv_into(buf)
    except OSError:
        tune_ok = False
    stages = {
        "encode (frame.encode: checks, msgpack header, join)": _per_call_us(
            lambda: encode("ping", 1, 1, [x], None, lim), n),
        "send path, per message of a burst (Node.send: encode + outbox + joined write)": plain["send_call_us"],
        "receive: FrameReader.feed (prefix, header, Message)": _per_call_us(feed, n),
        "  of which decode_header (msgpack unpack + validation)": _per_call_us(
            lambda: decode_header(hmv, blen, lim, kinds=kinds, sender=1), n),
        "  of which the Message (its tensors are built on first use)": _per_call_us(
            lambda: build_message(hdr, body, None), n),
        "a handler's first read of msg.tensors (codec.from_buffer: torch.frombuffer)": _per_call_us(
            lambda: from_buffer(body, 0, torch.float32, (16,), 64), n),
        "dispatch (route + deliver + handler call)": plain["route_us"],
        "future resolved -> awaiting task resumed (uvloop)": _per_call_us(lambda: wakes(20), n // 20, 1) / 20,
    }
    if tune_ok:
        stages["kernel: send + recv of one frame on loopback TCP"] = _per_call_us(syscalls, n)
        c1.close()
        c2.close()
        s1.close()
    loop.close()
    out["frame_bytes"] = total
    out["stages_us"] = {k: round(v, 2) for k, v in stages.items()}
    out["profile"] = profiled["profile"]
    out["profile_total_us_per_rtt"] = profiled["profile_total_us_per_rtt"]
    out["profile_rtt_us"] = round(profiled["rtt_us"], 1)
    return out


# ----------------------------------------------------------------------------- driver
def _ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a and b else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages (a few minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per measurement (default 1 quick, 2 full; rtt, msgs and fan-out: 3 quick, 5 full); "
                         "throughput keeps the best, rtt, msgs and fan-out the median")
    ap.add_argument("--only", default="tput,rtt,msgs,fanout,cost",
                    help="comma-separated subset of tput,rtt,msgs,fanout,cost")
    ap.add_argument("--fanout", type=int, default=100, help="peers of the fan-out (default 100)")
    ap.add_argument("--placement", choices=PLACEMENTS, default="same",
                    help="where the benchmark's processes run (module docstring; default same)")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--fan_child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child or a.fan_child:
        pin_self()
    if a.child:
        kind, role, size, n, ports, mode = a.child
        r = CHILDREN[kind](role, int(size), int(n), [int(p) for p in ports.split(",")], mode)
        print(json.dumps(r))
        return
    if a.fan_child:
        kind, role, size, rounds, ports, nrecv = a.fan_child
        r = FAN_CHILDREN[kind](role, int(size), int(rounds), [int(p) for p in ports.split(",")], int(nrecv))
        print(json.dumps(r))
        return
    only = set(a.only.split(","))
    unknown = only - {"tput", "rtt", "msgs", "fanout", "cost"}
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}")
    repeat = a.repeat or (1 if a.quick else 2)
    many = a.repeat or (3 if a.quick else 5)
    kinds = ["byzsgd", "raw"] + ([] if a.no_gloo else ["gloo"])
    result = {"sizes": {}, "rtt_us": {}, "msgs": {}, "fanout": {}, "ratios": {}, "sockopts": {},
              "placement": a.placement, "repeat": many, "warmup": WARMUP}
    ratios = result["ratios"]
    if "tput" in only:
        print(f"{'size':>10} " + " ".join(f"{k + ' GB/s':>12}" for k in kinds) + f" {'byz/raw':>8} {'byz/gloo':>9}")
        for size in SIZES:
            n = counts(size, a.quick)
            row = {}
            for k in kinds:
                row[f"{k}_gbps"] = round(max(pair(k, size, n, placement=a.placement)["gbps"] for _ in range(repeat)), 3)
            row["byzsgd_over_raw"] = round(row["byzsgd_gbps"] / row["raw_gbps"], 3)
            if "gloo_gbps" in row:
                row["byzsgd_over_gloo"] = round(row["byzsgd_gbps"] / row["gloo_gbps"], 3)
            result["sizes"][str(size)] = row
            print(f"{size:>10} " + " ".join(f"{row[k + '_gbps']:>12.3f}" for k in kinds)
                  + f" {row['byzsgd_over_raw']:>8.3f} {row.get('byzsgd_over_gloo', float('nan')):>9.3f}", flush=True)
    if "rtt" in only:
        n = 1000 if a.quick else 5000
        runs = {k: [] for k in SMALL_KINDS}
        for _ in range(many):  # interleaved, so every kind sees the same machine
            for k in runs:
                runs[k].append(pair(k, 64, n, "rtt", placement=a.placement))
        r = result["rtt_us"]
        for k, rs in runs.items():
            r[f"{k}_p50"] = round(statistics.median(x["p50_us"] for x in rs), 1)
            r[f"{k}_p99"] = round(statistics.median(x["p99_us"] for x in rs), 1)
            r[f"{k}_p50_runs"] = [round(x["p50_us"], 1) for x in rs]
            result["sockopts"][k] = rs[0]["sockopts"]
        for k in BASELINES:
            r[f"byzsgd_over_{k}_p50"] = _ratio(r["byzsgd_p50"], r[f"{k}_p50"])
            r[f"byzsgd_over_{k}_p99"] = _ratio(r["byzsgd_p99"], r[f"{k}_p99"])
        for k in ("msgpack", "msgpack_torch"):  # the shape's own cost, before any byzsgd code
            r[f"{k}_over_uvloop_p50"] = _ratio(r[f"{k}_p50"], r["uvloop_p50"])
        r["runs"], r["round_trips"] = many, n
        for q in ("p50", "p99"):
            ratios[f"rtt_{q}"] = {f"byzsgd_over_{k}": r[f"byzsgd_over_{k}_{q}"] for k in BASELINES}
        print(f"64-byte RTT, µs (median of {many} interleaved runs of {n}, placement {a.placement}):", flush=True)
        for k in SMALL_KINDS:
            print(f"  {k:>8}: p50 {r[k + '_p50']:>8.1f}  p99 {r[k + '_p99']:>8.1f}  runs {r[k + '_p50_runs']}")
    if "msgs" in only:
        n = 3000 if a.quick else 20000
        runs = {k: [] for k in MSGS_KINDS}
        for _ in range(many):
            for k in runs:
                runs[k].append(pair(k, MSG_SIZE, n, "msgs", placement=a.placement))
        row = {}
        for k, rs in runs.items():
            row[f"{k}_msgs_s"] = round(statistics.median(x["msgs_s"] for x in rs))
            row[f"{k}_msgs_s_runs"] = [round(x["msgs_s"]) for x in rs]
            result["sockopts"].setdefault(k, rs[0]["sockopts"])
        for k in BASELINES + ("msgpack_torch_corked",):
            row[f"byzsgd_over_{k}"] = _ratio(row["byzsgd_msgs_s"], row[f"{k}_msgs_s"])
        for k in ("msgpack", "msgpack_torch", "msgpack_torch_corked"):
            row[f"{k}_over_uvloop"] = _ratio(row[f"{k}_msgs_s"], row["uvloop_msgs_s"])
        row["runs"], row["messages"] = many, n
        result["msgs"][str(MSG_SIZE)] = row
        ratios[f"msgs_{MSG_SIZE}"] = {f"byzsgd_over_{k}": row[f"byzsgd_over_{k}"]
                                      for k in BASELINES + ("msgpack_torch_corked",)}
        print(f"{MSG_SIZE}-byte one-way messages/s (median of {many} interleaved runs of {n}): "
              + ", ".join(f"{k} {row[k + '_msgs_s']}" for k in MSGS_KINDS), flush=True)
    if "fanout" in only:
        rounds = 5 if a.quick else 20
        print(f"fan-out of one model to {a.fanout} peers, until every peer acknowledged it "
              f"(median of {many} interleaved runs of {rounds} rounds, placement {a.placement}):")
        print(f"{'bytes':>10} " + " ".join(f"{k + ' ms':>10}" for k in FAN_KINDS) + " | sender CPU ms: "
              + " ".join(f"{k:>8}" for k in FAN_KINDS) + f" {'memcpy':>7}")
        for size in FANOUT_SIZES:
            runs = {k: [] for k in FAN_KINDS}
            for _ in range(many):
                for k in runs:
                    runs[k].append(fan(k, size, rounds, a.fanout, placement=a.placement))
            row = {}
            for k, v in runs.items():
                row[f"{k}_s"] = statistics.median(x["s"] for x in v)
                row[f"{k}_cpu_s"] = statistics.median(x["cpu_s"] for x in v)
            row["memcpy_s"] = memcpy_fanout(size, a.fanout, max(rounds, 20))
            for k in ("raw", "uvloop"):
                row[f"byzsgd_over_{k}"] = _ratio(row["byzsgd_s"], row[f"{k}_s"])
                row[f"byzsgd_cpu_over_{k}_cpu"] = _ratio(row["byzsgd_cpu_s"], row[f"{k}_cpu_s"])
            row["byzsgd_cpu_over_memcpy"] = round(row["byzsgd_cpu_s"] / row["memcpy_s"], 2)
            row["raw_cpu_over_memcpy"] = round(row["raw_cpu_s"] / row["memcpy_s"], 2)
            row["peers"] = a.fanout
            result["fanout"][str(size)] = row
            ratios[f"fanout_{size}"] = {f"byzsgd_over_{k}": row[f"byzsgd_over_{k}"] for k in ("uvloop", "raw")}
            ratios[f"fanout_{size}_cpu"] = {f"byzsgd_over_{k}": row[f"byzsgd_cpu_over_{k}_cpu"] for k in ("uvloop", "raw")}
            ms = 1e3
            print(f"{size:>10} " + " ".join(f"{row[k + '_s'] * ms:>10.2f}" for k in FAN_KINDS) + " |                "
                  + " ".join(f"{row[k + '_cpu_s'] * ms:>8.2f}" for k in FAN_KINDS) + f" {row['memcpy_s'] * ms:>7.3f}",
                  flush=True)
    if "cost" in only:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        pin_cpus = placement_env(a.placement)[0].get(_CPUS_ENV)
        if pin_cpus:
            os.sched_setaffinity(0, {int(pin_cpus)})
        c = result["cost_us"] = cost(a.quick)
        i = c["inproc_rtt_us"]
        print(f"where the 64-byte round trip goes (one process, one loop, {c['n']} round trips): "
              f"byzsgd {i['byzsgd']} µs, uvloop echo {i['uvloop_echo']} µs, difference {i['byzsgd_minus_echo']} µs")
        for k, v in c["stages_us"].items():
            print(f"  {v:>7.2f} µs  {k}")
        print(f"  cProfile (CPU clock; the round trip {c['profile_rtt_us']} µs under the profiler), "
              "own CPU µs per round trip and share:")
        for p in c["profile"][:10]:
            print(f"  {p['own_us_per_rtt']:>7.2f} {p['own_share']:>6.1%}  {p['calls_per_rtt']:>5} calls  {p['function']}")
    if ratios:
        print("\nratios (byzsgd's number over the other's: times above 1 and msgs/s below 1 are slower):")
        cols = [(k, max(len(k) + 7, 11)) for k in BASELINES + ("msgpack_torch_corked",)]
        print(f"{'measure':>22} " + " ".join(f"{'byzsgd/' + k:>{w}}" for k, w in cols))
        for name, rr in ratios.items():
            print(f"{name:>22} " + " ".join(f"{'' if rr.get('byzsgd_over_' + k) is None else rr['byzsgd_over_' + k]:>{w}}"
                                             for k, w in cols))
        for name, table in (("rtt_us", result["rtt_us"]), (f"msgs {MSG_SIZE}", result["msgs"].get(str(MSG_SIZE), {}))):
            shape = {k: v for k, v in table.items() if k.endswith("_over_uvloop") or k.endswith("_over_uvloop_p50")}
            if shape and not all(k.startswith("byzsgd") for k in shape):
                print(f"{name}: the design's shape alone over the uvloop echo: "
                      + ", ".join(f"{k} {v}" for k, v in shape.items() if not k.startswith("byzsgd")))
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
