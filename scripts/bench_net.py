#!/usr/bin/env python
"""Benchmark byzsgd's transport against a raw blocking socket and torch.distributed gloo.

Every measurement runs a sender and a receiver in two separate processes on loopback:
one-way throughput of tensor messages (4 KB, 4 MB, 44 MB, 100 MB) and the round-trip time of a
64-byte message.  Prints a table; with ``--json`` the last line is one JSON object:
``{"sizes": {"<bytes>": {"byzsgd_gbps", "raw_gbps", "gloo_gbps", ...}}, "rtt_us": {...}}``
(GB/s = 1e9 bytes/s).  ``--quick`` keeps it under a minute.
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
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement, best kept (default 1 quick, 2 full)")
    ap.add_argument("--no-gloo", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, role, size, n, ports, mode = a.child
        r = CHILDREN[kind](role, int(size), int(n), [int(p) for p in ports.split(",")], mode)
        print(json.dumps(r))
        return
    repeat = a.repeat or (1 if a.quick else 2)
    kinds = ["byzsgd", "raw"] + ([] if a.no_gloo else ["gloo"])
    result = {"sizes": {}, "rtt_us": {}}
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
    n = 500 if a.quick else 5000
    for k in ("byzsgd", "raw"):
        best = min((pair(k, 64, n, "rtt") for _ in range(repeat)), key=lambda r: r["p50_us"])
        result["rtt_us"][f"{k}_p50"] = round(best["p50_us"], 1)
        result["rtt_us"][f"{k}_p99"] = round(best["p99_us"], 1)
    result["rtt_us"]["byzsgd_over_raw_p50"] = round(result["rtt_us"]["byzsgd_p50"] / result["rtt_us"]["raw_p50"], 3)
    r = result["rtt_us"]
    print(f"64-byte RTT: byzsgd p50 {r['byzsgd_p50']} us p99 {r['byzsgd_p99']} us; "
          f"raw p50 {r['raw_p50']} us p99 {r['raw_p99']} us; ratio {r['byzsgd_over_raw_p50']}")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
