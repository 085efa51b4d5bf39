#!/usr/bin/env python
"""Benchmark byzsgd's transport against a raw blocking socket and torch.distributed gloo.

Every measurement runs a sender and a receiver in two separate processes on loopback:
one-way throughput of tensor messages (4 KB, 4 MB, 44 MB, 100 MB), the round-trip time of a
64-byte message, and a PS's fan-out: one model sent to ``--fanout`` (100) peers, timed until
every peer acknowledged it, against the same fan-out over raw blocking sockets and against
``fanout`` memory copies of the model (the "one copy per recipient" floor).  The receivers of a
fan-out are ``FANOUT_PROCS`` processes hosting the peers.  The RTTs and fan-outs of both kinds
alternate, repeated (``--repeat``), medians kept.

Prints a table; with ``--json`` the last line is one JSON object:
``{"sizes": {"<bytes>": {"byzsgd_gbps", "raw_gbps", "gloo_gbps", ...}}, "rtt_us": {...},
"fanout": {"<bytes>": {"byzsgd_s", "raw_s", "byzsgd_cpu_s", "raw_cpu_s", "memcpy_s",
"byzsgd_over_raw", "byzsgd_cpu_over_raw_cpu", "byzsgd_cpu_over_memcpy", ...}}}`` (``*_cpu_s``:
the sender's CPU seconds per fan-out: what the PS pays)
(GB/s = 1e9 bytes/s).  ``--quick`` keeps it under a minute; ``--only rtt,fanout`` runs a subset.
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


# ----------------------------------------------------------------------------- byzsgd children
def byz_child(role: str, size: int, n: int, ports: list[int], mode: str) -> dict:
    import torch

    from byzsgd.net import FrameLimits, Node, PeerDirectory, run

    torch.set_num_threads(1)
    d = PeerDirectory({0: ("127.0.0.1", ports[0]), 1: ("127.0.0.1", ports[1])}, num_ps=1)
    lim = FrameLimits.for_model(max(size // 4, 1024))
    rank = 0 if role == "recv" else 1

    async def main():
        node = Node(rank, "ps" if rank == 0 else "worker", SECRET, directory=d, limits=lim,
                    listen_host="127.0.0.1", outbox_depth=64)
        loop = asyncio.get_running_loop()
        state = {"n": 0, "done": loop.create_future()}
        if role == "recv":
            def on_t(msg):
                state["n"] += 1
                msg.release()
                if state["n"] == n + 1:
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
        out = {}
        if mode == "tput":
            x = torch.ones(size // 4, dtype=torch.float32)
            waiter["f"] = loop.create_future()
            await node.send(0, "t", 0, [x])  # warm-up: connection, pool buffer
            pending = []
            t0 = time.perf_counter()
            for i in range(n):
                pending.append(node.send(0, "t", i + 1, [x]))
                if len(pending) >= 32:
                    await pending.pop(0)
            await waiter["f"]
            dt = time.perf_counter() - t0
            out = {"gbps": n * size / dt / 1e9}
        else:
            x = torch.zeros(16, dtype=torch.float32)  # 64 bytes
            lat = []
            for i in range(n + 100):
                waiter["f"] = loop.create_future()
                t0 = time.perf_counter()
                node.send(0, "ping", i, [x])
                await waiter["f"]
                if i >= 100:
                    lat.append(time.perf_counter() - t0)
            out = rtt_stats(lat)
        await node.send(0, "stop", 0)
        await node.close()
        return out

    return run(main())


def rtt_stats(lat) -> dict:
    lat = sorted(lat)
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


# ----------------------------------------------------------------------------- raw socket children
def raw_child(role: str, size: int, n: int, ports: list[int], mode: str) -> dict:
    port = ports[0]
    if role == "recv":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "tput":
            buf = bytearray(size)
            mv = memoryview(buf)
            for _ in range(n + 1):
                got = 0
                while got < size:
                    k = c.recv_into(mv[got:])
                    if not k:
                        raise SystemExit("eof")
                    got += k
            c.sendall(b"k")
        else:
            buf = bytearray(64)
            mv = memoryview(buf)
            for _ in range(n + 100):
                got = 0
                while got < 64:
                    got += c.recv_into(mv[got:])
                c.sendall(buf)
        c.close()
        srv.close()
        return {}
    c = connect_retry(port)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "tput":
        data = bytearray(b"\x01" * size)
        c.sendall(data)
        t0 = time.perf_counter()
        for _ in range(n):
            c.sendall(data)
        c.recv(1)
        dt = time.perf_counter() - t0
        c.close()
        return {"gbps": n * size / dt / 1e9}
    buf = bytearray(64)
    mv = memoryview(buf)
    lat = []
    for i in range(n + 100):
        t0 = time.perf_counter()
        c.sendall(buf)
        got = 0
        while got < 64:
            got += c.recv_into(mv[got:])
        if i >= 100:
            lat.append(time.perf_counter() - t0)
    c.close()
    return rtt_stats(lat)


def connect_retry(port: int) -> socket.socket:
    for _ in range(500):
        try:
            return socket.create_connection(("127.0.0.1", port))
        except OSError:
            time.sleep(0.01)
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
FANOUT_SIZES = [7850 * 4, 431080 * 4]  # the linear model of bench_scale, the MNIST convnet
FANOUT_WARMUP = 3


def _fan_ranks(nrecv: int, part: int) -> list[int]:
    return [r for r in range(1, nrecv + 1) if r % FANOUT_PROCS == part]


def byz_fan_child(role: str, size: int, rounds: int, ports: list[int], nrecv: int) -> dict:
    """role "send": rank 0, a PS that broadcasts one model per round to ranks 1..nrecv and
    waits for every ack; role "recvK": the workers of part K (each its own Node)."""
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
                n.on("m", on_m)
                n.on("stop", lambda m: stop.done() or stop.set_result(None))
                nodes.append(n)
            for n in nodes:
                await n.start()
            await stop
            await asyncio.sleep(0.05)
            for n in nodes:
                await n.close()
            return {}
        node = Node(0, "ps", SECRET, directory=d, limits=lim, listen_host="127.0.0.1",
                    max_preauth_per_address=nrecv + 8)
        st = {"left": 0, "f": None}

        def on_ack(msg):
            st["left"] -= 1
            if st["left"] == 0:
                st["f"].set_result(None)
        node.on("ack", on_ack)
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
        node.broadcast(ranks, "stop", 0)
        await asyncio.sleep(0.2)
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
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def fan(kind: str, size: int, rounds: int, nrecv: int, timeout: float = 300) -> dict:
    """{"s": wall seconds until every peer acknowledged, "cpu_s": the sender's CPU seconds}
    per round (medians)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from byzsgd.net.peers import free_ports

    ports = free_ports(nrecv + 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for role in ["send"] + [f"recv{k}" for k in range(FANOUT_PROCS)]:
        procs[role] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--fan_child", kind, role, str(size), str(rounds),
             ",".join(map(str, ports)), str(nrecv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = procs["send"].communicate(timeout=timeout)
        if procs["send"].returncode != 0:
            raise RuntimeError(f"{kind} fan-out sender failed: {err[-2000:]}")
        for role, p in procs.items():
            if role != "send":
                p.wait(timeout=30)
        return json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


FAN_CHILDREN = {"byzsgd": byz_fan_child, "raw": raw_fan_child}


CHILDREN = {"byzsgd": byz_child, "raw": raw_child, "gloo": gloo_child}


def pair(kind: str, size: int, n: int, mode: str = "tput", timeout: float = 300) -> dict:
    ports = [free_port(), free_port()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, os.path.abspath(__file__), "--child", kind, "", str(size), str(n),
            ",".join(map(str, ports)), mode]
    procs = {}
    for role in ("recv", "send"):
        a = list(args)
        a[4] = role
        procs[role] = subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer messages (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per measurement (default 1 quick, 2 full; RTT and fan-out: 3 quick, 5 full); "
                         "throughput keeps the best, RTT and fan-out the median")
    ap.add_argument("--only", default="tput,rtt,fanout", help="comma-separated subset of tput,rtt,fanout")
    ap.add_argument("--fanout", type=int, default=100, help="peers of the fan-out (default 100)")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--fan_child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
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
    unknown = only - {"tput", "rtt", "fanout"}
    if unknown:
        ap.error(f"--only: unknown {sorted(unknown)}")
    repeat = a.repeat or (1 if a.quick else 2)
    many = a.repeat or (3 if a.quick else 5)
    kinds = ["byzsgd", "raw"] + ([] if a.no_gloo else ["gloo"])
    result = {"sizes": {}, "rtt_us": {}, "fanout": {}}
    if "tput" in only:
        print(f"{'size':>10} " + " ".join(f"{k + ' GB/s':>12}" for k in kinds) + f" {'byz/raw':>8} {'byz/gloo':>9}")
        for size in SIZES:
            n = counts(size, a.quick)
            row = {}
            for k in kinds:
                row[f"{k}_gbps"] = round(max(pair(k, size, n)["gbps"] for _ in range(repeat)), 3)
            row["byzsgd_over_raw"] = round(row["byzsgd_gbps"] / row["raw_gbps"], 3)
            if "gloo_gbps" in row:
                row["byzsgd_over_gloo"] = round(row["byzsgd_gbps"] / row["gloo_gbps"], 3)
            result["sizes"][str(size)] = row
            print(f"{size:>10} " + " ".join(f"{row[k + '_gbps']:>12.3f}" for k in kinds)
                  + f" {row['byzsgd_over_raw']:>8.3f} {row.get('byzsgd_over_gloo', float('nan')):>9.3f}", flush=True)
    if "rtt" in only:
        n = 500 if a.quick else 3000
        runs = {"byzsgd": [], "raw": []}
        for _ in range(many):  # alternate, so both kinds see the same machine
            for k in runs:
                runs[k].append(pair(k, 64, n, "rtt"))
        r = result["rtt_us"]
        for k, rs in runs.items():
            r[f"{k}_p50"] = round(statistics.median(x["p50_us"] for x in rs), 1)
            r[f"{k}_p99"] = round(statistics.median(x["p99_us"] for x in rs), 1)
        r["byzsgd_over_raw_p50"] = round(r["byzsgd_p50"] / r["raw_p50"], 3)
        r["runs"] = many
        print(f"64-byte RTT (median of {many} runs of {n}): byzsgd p50 {r['byzsgd_p50']} us p99 {r['byzsgd_p99']} us; "
              f"raw p50 {r['raw_p50']} us p99 {r['raw_p99']} us; ratio {r['byzsgd_over_raw_p50']}", flush=True)
    if "fanout" in only:
        rounds = 5 if a.quick else 20
        print(f"fan-out of one model to {a.fanout} peers, until every peer acknowledged it "
              f"(median of {many} runs of {rounds} rounds):")
        print(f"{'bytes':>10} {'byz ms':>8} {'raw ms':>8} {'byz/raw':>8} | {'sender CPU ms: byz':>18} "
              f"{'raw':>7} {'memcpy':>7} {'byz/raw':>8} {'byz/memcpy':>10}")
        for size in FANOUT_SIZES:
            runs = {"byzsgd": [], "raw": []}
            for _ in range(many):
                for k in runs:
                    runs[k].append(fan(k, size, rounds, a.fanout))
            row = {}
            for k, v in runs.items():
                row[f"{k}_s"] = statistics.median(x["s"] for x in v)
                row[f"{k}_cpu_s"] = statistics.median(x["cpu_s"] for x in v)
            row["memcpy_s"] = memcpy_fanout(size, a.fanout, max(rounds, 20))
            row["byzsgd_over_raw"] = round(row["byzsgd_s"] / row["raw_s"], 3)
            row["byzsgd_cpu_over_raw_cpu"] = round(row["byzsgd_cpu_s"] / row["raw_cpu_s"], 3)
            row["byzsgd_cpu_over_memcpy"] = round(row["byzsgd_cpu_s"] / row["memcpy_s"], 2)
            row["raw_cpu_over_memcpy"] = round(row["raw_cpu_s"] / row["memcpy_s"], 2)
            row["peers"] = a.fanout
            result["fanout"][str(size)] = row
            ms = 1e3
            print(f"{size:>10} {row['byzsgd_s'] * ms:>8.2f} {row['raw_s'] * ms:>8.2f} {row['byzsgd_over_raw']:>8.3f} | "
                  f"{row['byzsgd_cpu_s'] * ms:>18.2f} {row['raw_cpu_s'] * ms:>7.2f} {row['memcpy_s'] * ms:>7.3f} "
                  f"{row['byzsgd_cpu_over_raw_cpu']:>8.3f} {row['byzsgd_cpu_over_memcpy']:>10.2f}", flush=True)
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
