"""Nodes over real TCP on loopback: round trips, malformed input, auth, outbox, reconnect."""
import asyncio
import contextlib
import logging

import msgpack
import pytest
import torch

from byzsgd.net import FrameLimits, Mailbox, Node, PeerDirectory, errors, run
from byzsgd.net.frame import PREFIX
from byzsgd.net.protocol import HS_PREFIX
from byzsgd.net.testing import RawPeer

pytestmark = pytest.mark.timeout(180, method="thread")  # uvloop can delay signal-based timeouts
torch.set_num_threads(1)
SECRET = b"0123456789abcdef-test-secret"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=8 << 20, max_tensors=8)


def make_nodes(num_ps, num_workers, *, limits=LIM, secret=SECRET, **kw):
    d = PeerDirectory.local(num_ps, num_workers)
    return [Node(r, d.role(r), secret, directory=d, limits=limits, listen_host="127.0.0.1",
                 handshake_timeout=kw.pop("handshake_timeout", 2.0), **kw) for r in range(d.world_size)]


@contextlib.asynccontextmanager
async def started(nodes, kinds=("m",), connect=True):
    boxes = [{k: n.mailbox(k, window=64) for k in kinds} for n in nodes]
    try:
        for n in nodes:
            await n.start()
        if connect:
            for n in nodes:
                others = set(n.directory) - {n.rank}
                assert await n.wait_connected(others, 10) == others
        yield boxes
    finally:
        for n in nodes:
            await n.close()


async def roundtrip(src, dst_box, dst_rank, step, tensors, meta=None):
    f = src.send(dst_rank, "m", step, tensors, meta)
    got = await dst_box.collect(step, 1, senders={src.rank}, timeout=10)
    assert await asyncio.wait_for(f, 10) is True
    return got[src.rank]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.uint8, torch.bool]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 3), (2, 3, 4, 5)]


def test_every_dtype_and_shape_round_trips():
    async def main():
        a, b = nodes = make_nodes(1, 1)
        async with started(nodes) as boxes:
            step = 0
            for dt in DTYPES:
                ts = []
                for sh in SHAPES:
                    x = torch.randn(sh) * 100
                    ts.append(x.to(dt) if dt != torch.bool else x > 0)
                for i in range(0, len(ts), 4):
                    chunk = ts[i:i + 4]
                    m = await roundtrip(b, boxes[0]["m"], 0, step, chunk, {"dt": str(dt)})
                    assert m.sender == 1 and m.meta == {"dt": str(dt)}
                    for x, y in zip(m.tensors, chunk):
                        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
                    m.release()
                    step += 1
            m = await roundtrip(a, boxes[1]["m"], 1, 0, [])
            assert m.tensors == [] and m.meta == {}
            # non-contiguous input is sent as a contiguous copy
            x = torch.randn(6, 4).t()
            m = await roundtrip(a, boxes[1]["m"], 1, 1, [x])
            assert torch.equal(m.tensors[0], x)
    run(main())


def test_100mb_tensor_and_buffer_reuse():
    async def main():
        lim = FrameLimits.for_model(25_000_000)
        nodes = make_nodes(1, 1, limits=lim)
        async with started(nodes) as boxes:
            big = torch.randn(25_000_000)
            for step in range(3):
                m = await roundtrip(nodes[1], boxes[0]["m"], 0, step, [big])
                assert torch.equal(m.tensors[0], big)
                m.release()
            assert nodes[0].pool.allocations <= 2  # reused, not reallocated per message
    run(main())


def test_many_peers_all_to_all():
    async def main():
        nodes = make_nodes(3, 6)
        async with started(nodes) as boxes:
            for n in nodes:
                n.broadcast([r for r in n.directory if r != n.rank], "m", 0, [torch.full((10,), float(n.rank))])
            for n, bx in zip(nodes, boxes):
                got = await bx["m"].collect(0, len(nodes) - 1, timeout=10)
                assert set(got) == set(range(len(nodes))) - {n.rank}
                for s, m in got.items():
                    assert m.tensors[0][0].item() == s
    run(main())


def test_send_to_self_and_unknown_rank():
    async def main():
        nodes = make_nodes(1, 1)
        async with started(nodes) as boxes:
            t = torch.ones(3)
            assert await nodes[0].send(0, "m", 0, [t]) is True
            got = await boxes[0]["m"].collect(0, 1, timeout=2)
            assert torch.equal(got[0].tensors[0], t)
            with pytest.raises(errors.UnknownPeer):
                nodes[0].send(5, "m", 0)
    run(main())


# ------------------------------------------------------------------ malicious / malformed peers
async def auth_raw(node, rank, num_ps=1):
    p = await RawPeer.connect("127.0.0.1", node.port)
    reply = await p.handshake(SECRET, rank, node.rank, num_ps, world_size=node.world_size)
    assert reply == {"ok": True}, reply
    return p


def good_frame_bytes(kind="m", step=0, sender=2, tensors=(torch.ones(4),)):
    from byzsgd.net.frame import encode
    bufs, _, _ = encode(kind, step, sender, tensors)
    return b"".join(bytes(b) for b in bufs)




def raw_frame(header_obj, body=b""):
    h = msgpack.packb(header_obj, use_bin_type=True)
    return PREFIX.pack(len(h), len(body)) + h + body


MALFORMED = {
    "truncated": (good_frame_bytes()[:30], None),  # followed by EOF
    "oversized_prefix": (PREFIX.pack(100, 1 << 40), "frame_too_large"),
    "oversized_header": (PREFIX.pack(1 << 20, 0), "header_too_large"),
    "invalid_msgpack": (PREFIX.pack(3, 0) + b"\xc1\xc1\xc1", "bad_header"),
    "wrong_types": (raw_frame(["m", "zero", 2, [], {}]), "bad_step"),
    "wrong_structure": (raw_frame({"kind": "m"}), "bad_header"),
    "unknown_kind": (good_frame_bytes(kind="nope"), "unknown_kind"),
    "dtype_not_allowed": (raw_frame(["m", 0, 2, [["i1", [4], 4]], {}], b"\0" * 4), "bad_dtype"),
    "nbytes_mismatch": (raw_frame(["m", 0, 2, [["f4", [4], 12]], {}], b"\0" * 12), "shape_mismatch"),
    "sender_spoof": (good_frame_bytes(sender=0), "sender_mismatch"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_frame_closes_only_that_connection(case, caplog):
    data, reason = MALFORMED[case]

    async def main():
        nodes = make_nodes(1, 2)  # ranks 0 (ps), 1, 2 (workers); rank 2 is played raw
        n0, n1 = nodes[0], nodes[1]
        async with started(nodes[:2], connect=False) as boxes:
            assert await n0.wait_connected({1}, 10) == {1}
            bad = await auth_raw(n0, 2)
            bad.write(data)
            if reason is None:
                bad.writer.write_eof()
            assert await bad.closed_by_peer(5)
            if reason is not None:
                assert n0.stats.rejected[reason] == 1, n0.stats.rejected
            m = await roundtrip(n1, boxes[0]["m"], 0, 7, [torch.arange(5)])
            assert torch.equal(m.tensors[0], torch.arange(5))
            # the well-behaved raw peer can reconnect and is served
            again = await auth_raw(n0, 2)
            again.write(good_frame_bytes(step=8))
            got = await boxes[0]["m"].collect(8, 1, senders={2}, timeout=5)
            assert torch.equal(got[2].tensors[0], torch.ones(4))
            await again.close()
            await bad.close()

    with caplog.at_level(logging.WARNING, logger="byzsgd.net"):
        run(main())
    if reason is not None:
        assert any(reason in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["bad_hmac", "wrong_version", "bad_rank", "garbage", "silent"])
def test_handshake_failures(case):
    async def main():
        nodes = make_nodes(1, 2, handshake_timeout=0.5)
        n0, n1 = nodes[0], nodes[1]
        async with started(nodes[:2], connect=False) as boxes:
            assert await n0.wait_connected({1}, 10) == {1}
            p = await RawPeer.connect("127.0.0.1", n0.port)
            if case == "bad_hmac":
                reply = await p.handshake(SECRET, 2, 0, 1, bad_mac=True, world_size=3)
                # no {ok}, no reason given to a peer that failed to authenticate: closed
                assert reply == {"closed": True}, reply
            elif case == "wrong_version":
                reply = await p.handshake(SECRET, 2, 0, 1, version=99, world_size=3)
                assert "version" in reply["err"]
            elif case == "bad_rank":
                reply = await p.handshake(SECRET, 0, 0, 1, role="ps", world_size=3)  # claims the listener's own rank
                assert "rank" in reply["err"]
            elif case == "garbage":
                p.write(HS_PREFIX.pack(5000) + b"x" * 100)
            # silent: send nothing; the handshake timeout closes it
            assert await p.closed_by_peer(5)
            expect = {"bad_hmac": "auth", "wrong_version": "version", "bad_rank": "bad_rank",
                      "garbage": "handshake", "silent": "handshake_timeout"}[case]
            assert n0.stats.rejected[expect] == 1, n0.stats.rejected
            assert 2 not in n0.connected
            await p.close()
            m = await roundtrip(n1, boxes[0]["m"], 0, 1, [torch.ones(2)])
            assert torch.equal(m.tensors[0], torch.ones(2))
    run(main())


def test_wrong_secret_node_never_connects():
    async def main():
        d = PeerDirectory.local(1, 1)
        a = Node(0, "ps", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
        b = Node(1, "worker", b"another-secret-entirely", directory=d, limits=LIM, listen_host="127.0.0.1")
        a.mailbox("m")
        b.mailbox("m")
        await a.start()
        await b.start()
        try:
            assert await b.wait_connected({0}, 0.5) == set()
            # another operator secret is another deployment: refused before any MAC, by name
            assert a.stats.rejected["deployment"] >= 1
            assert b.stats.rejected["deployment"] >= 1
        finally:
            await a.close()
            await b.close()
    run(main())


def test_second_connection_claiming_connected_rank_is_refused():
    async def main():
        nodes = make_nodes(1, 1)
        async with started(nodes) as boxes:
            n0, n1 = nodes
            p = await RawPeer.connect("127.0.0.1", n0.port)
            reply = await p.handshake(SECRET, 1, 0, 1, world_size=2)
            assert "duplicate" in reply["err"]
            assert await p.closed_by_peer(5)
            assert n0.stats.rejected["duplicate_rank"] == 1
            m = await roundtrip(n1, boxes[0]["m"], 0, 0, [torch.ones(1)])
            assert m.sender == 1
    run(main())


def test_restarted_node_rejoins():
    async def main():
        d = PeerDirectory.local(1, 1)
        a = Node(0, "ps", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
        mba = a.mailbox("m")
        await a.start()
        for gen in range(2):
            b = Node(1, "worker", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
            mbb = b.mailbox("m")
            await b.start()
            assert await b.wait_connected({0}, 10) == {0}
            assert await a.wait_connected({1}, 10) == {1}
            assert await b.send(0, "m", gen, [torch.tensor([gen])])
            got = await mba.collect(gen, 1, timeout=5)
            assert got[1].tensors[0].item() == gen
            assert await a.send(1, "m", 0, [torch.tensor([7])])
            assert (await mbb.collect(0, 1, timeout=5))[0].tensors[0].item() == 7
            await b.close()  # "kill" it; the next generation reuses rank 1 and its port
        await a.close()
    run(main())


def test_peer_restart_listener_side_reconnects():
    async def main():
        d = PeerDirectory.local(1, 1)
        b = Node(1, "worker", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
        mbb = b.mailbox("m")
        await b.start()
        for gen in range(2):
            a = Node(0, "ps", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
            a.mailbox("m")
            await a.start()
            assert await b.wait_connected({0}, 10) == {0}
            assert await a.send(1, "m", gen, [torch.tensor([gen])])
            assert (await mbb.collect(gen, 1, timeout=5))[0].tensors[0].item() == gen
            await a.close()
        await b.close()
    run(main())


def test_sends_queue_until_peer_connects():
    async def main():
        d = PeerDirectory.local(1, 1)
        b = Node(1, "worker", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
        b.mailbox("m")
        await b.start()
        fut = b.send(0, "m", 3, [torch.ones(2)])
        await asyncio.sleep(0.2)
        assert not fut.done()
        a = Node(0, "ps", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
        mba = a.mailbox("m")
        await a.start()
        assert await asyncio.wait_for(fut, 10) is True
        assert set(await mba.collect(3, 1, timeout=5)) == {1}
        await a.close()
        await b.close()
    run(main())


def test_outbox_not_blocked_by_a_peer_that_never_reads():
    async def main():
        lim = FrameLimits.for_model(1 << 20)
        nodes = make_nodes(1, 1, limits=lim, outbox_depth=4)
        n0, n1 = nodes
        n0.mailbox("m")
        await n0.start()
        # rank 1 is a raw peer that authenticates and then never reads
        p = await RawPeer.connect("127.0.0.1", n0.port)
        assert (await p.handshake(SECRET, 1, 0, 1, world_size=2)) == {"ok": True}
        p.writer.transport.pause_reading()
        x = torch.zeros(1 << 20)  # 4 MB
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        futs = [n0.send(1, "m", s, [x]) for s in range(40)]
        assert loop.time() - t0 < 1.0  # send() itself never blocked
        await asyncio.sleep(0.5)
        assert sum(f.done() and f.result() is False for f in futs) >= 30  # oldest dropped
        assert n0.stats.dropped >= 30
        # the node still serves others meanwhile: a second (legit) loopback send works
        assert await n0.send(0, "m", 0, [torch.ones(1)]) is True
        await n0.close()
        assert all(f.done() for f in futs)
        await p.close()
    run(main())


def test_async_and_failing_handlers():
    async def main():
        nodes = make_nodes(1, 1)
        n0, n1 = nodes
        seen = []

        async def slow(msg):
            await asyncio.sleep(0.01)
            seen.append(msg.step)
            msg.release()

        def bad(msg):
            raise RuntimeError("boom")

        n0.on("a", slow)
        n0.on("b", bad)
        async with started(nodes, kinds=("m",)) as boxes:
            for s in range(20):
                n1.send(0, "a", s)
            n1.send(0, "b", 0)
            assert await n1.send(0, "m", 0, [torch.ones(1)])
            await boxes[0]["m"].collect(0, 1, timeout=5)
            for _ in range(100):
                if len(seen) == 20:
                    break
                await asyncio.sleep(0.02)
            assert seen == list(range(20))
            assert n0.stats.handler_errors == 1
            assert n0.stats.failures == {"handler:b:RuntimeError": 1}
            for s in range(3):  # counted every time, logged once per reason
                n1.send(0, "b", s)
            assert await n1.send(0, "m", 1, [torch.ones(1)])
            await boxes[0]["m"].collect(1, 1, timeout=5)
            assert n0.stats.failures == {"handler:b:RuntimeError": 4}
            assert 1 in n0.connected
    run(main())


def test_plain_asyncio_loop_round_trip():
    async def main():
        assert "uvloop" not in type(asyncio.get_running_loop()).__module__
        nodes = make_nodes(1, 1, limits=FrameLimits.for_model(3_000_000))
        async with started(nodes) as boxes:
            for step, n in enumerate((1, 3_000_000)):
                x = torch.randn(n)
                m = await roundtrip(nodes[1], boxes[0]["m"], 0, step, [x])
                assert torch.equal(m.tensors[0], x)
    asyncio.run(main())


def test_close_is_idempotent_and_cancels_collects():
    async def main():
        nodes = make_nodes(1, 1)
        mb = nodes[0].mailbox("m")
        for n in nodes:
            await n.start()
        task = asyncio.create_task(mb.collect(0, 1))
        await asyncio.sleep(0.01)
        for n in nodes:
            await n.close()
            await n.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert nodes[0].send(1, "m", 0).result() is False
    run(main())


def test_config_errors():
    d = PeerDirectory.local(1, 2)
    ok = dict(directory=d, limits=LIM)
    with pytest.raises(errors.ConfigError, match="secret"):
        Node(0, "ps", b"", **ok)
    with pytest.raises(errors.ConfigError, match="bytes"):
        Node(0, "ps", "str-secret", **ok)
    with pytest.raises(errors.ConfigError, match="is a ps"):
        Node(0, "worker", SECRET, **ok)
    with pytest.raises(errors.ConfigError, match="not in the directory"):
        Node(5, "worker", SECRET, **ok)
    with pytest.raises(errors.ConfigError, match="exactly one"):
        Node(0, "ps", SECRET, limits=LIM)
    with pytest.raises(errors.ConfigError, match="world_size"):
        Node(1, "worker", SECRET, master=("127.0.0.1", 1234), limits=LIM)
    with pytest.raises(errors.ConfigError, match="outbox_depth"):
        Node(0, "ps", SECRET, outbox_depth=0, **ok)
    n = Node(0, "ps", SECRET, **ok)
    with pytest.raises(errors.ConfigError, match="reserved"):
        n.on("__x", print)
    n.on("x", print)
    with pytest.raises(errors.ConfigError, match="already"):
        n.on("x", print)
    with pytest.raises(errors.ConfigError):
        PeerDirectory({0: ("h", 1), 2: ("h", 2)}, 1)


def test_registered_shapes_enforced():
    async def main():
        nodes = make_nodes(1, 1)
        mb = nodes[0].mailbox("model", shapes=[(4,)])
        nodes[1].mailbox("model", shapes=[(4,)])
        async with started(nodes, kinds=()):
            assert await nodes[1].send(0, "model", 0, [torch.ones(4)])
            assert set(await mb.collect(0, 1, timeout=5)) == {1}
            nodes[1].send(0, "model", 1, [torch.ones(5)])
            for _ in range(100):
                if nodes[0].stats.rejected["shape_mismatch"]:
                    break
                await asyncio.sleep(0.02)
            assert nodes[0].stats.rejected["shape_mismatch"] == 1
            # the dialer reconnects by itself and traffic resumes
            assert await nodes[1].wait_connected({0}, 10) == {0}
            await asyncio.sleep(0.1)
            assert await nodes[1].wait_connected({0}, 10) == {0}
            assert await nodes[1].send(0, "model", 2, [torch.ones(4)])
            assert set(await mb.collect(2, 1, timeout=10)) == {1}
    run(main())


def test_unauthenticated_connections_are_bounded():
    async def main():
        nodes = make_nodes(1, 1)
        nodes[0].max_pending_handshakes = 3
        async with started(nodes) as boxes:
            raws = [await RawPeer.connect("127.0.0.1", nodes[0].port) for _ in range(3)]
            await asyncio.sleep(0.05)
            extra = await RawPeer.connect("127.0.0.1", nodes[0].port)
            assert await raws[0].closed_by_peer(5)  # the oldest idle one made room
            assert nodes[0].stats.rejected["preauth_evicted"] >= 1
            assert nodes[0].pending_handshakes <= 3
            for r in raws:
                await r.close()
            await extra.close()
            m = await roundtrip(nodes[1], boxes[0]["m"], 0, 0, [torch.ones(3)])
            assert torch.equal(m.tensors[0], torch.ones(3))
    run(main())


def test_mixed_sizes_both_directions_integrity():
    """Many frames of mixed sizes back to back, both ways: exercises the staging/body switch."""
    async def main():
        nodes = make_nodes(1, 1, outbox_depth=512)
        got = {0: [], 1: []}
        for n in nodes:
            n.on("x", lambda m, r=n.rank: got[r].append((m.step, [t.clone() for t in m.tensors], m.release())))
        g = torch.Generator().manual_seed(0)

        def payload(step):
            k = step % 4
            sizes = [int(torch.randint(0, 70_000, (1,), generator=g)) for _ in range(k)]
            return [torch.arange(s, dtype=torch.int32) + step for s in sizes]

        plan = {s: payload(s) for s in range(150)}
        async with started(nodes, kinds=()):
            futs = []
            for s, ts in plan.items():
                futs += [nodes[0].send(1, "x", s, ts), nodes[1].send(0, "x", s, ts)]
                if s % 10 == 0:
                    await asyncio.sleep(0)
            res = await asyncio.wait_for(asyncio.gather(*futs), 20)
            assert all(res)
            for _ in range(200):
                if len(got[0]) == len(got[1]) == len(plan):
                    break
                await asyncio.sleep(0.02)
            for r in (0, 1):
                assert [s for s, _, _ in got[r]] == list(range(150))  # in order
                for s, ts, _ in got[r]:
                    assert len(ts) == len(plan[s]) and all(torch.equal(a, b) for a, b in zip(ts, plan[s]))
    run(main())


def test_workers_never_connect_to_one_another():
    """peer_roles: a worker exchanges messages with PSes only, so it dials only PSes and
    refuses a worker that dials it (100 workers, 4,950 fewer connections)."""
    async def main():
        d = PeerDirectory.local(2, 3)
        roles = {"ps": ("ps", "worker"), "worker": ("ps",)}
        nodes = [Node(r, d.role(r), SECRET, directory=d, limits=LIM, listen_host="127.0.0.1",
                      peer_roles=roles[d.role(r)]) for r in range(4)]
        # rank 4: a worker that dials everyone (peer_roles None), as a Byzantine one might
        nodes.append(Node(4, "worker", SECRET, directory=d, limits=LIM, listen_host="127.0.0.1"))
        for n in nodes:
            n.mailbox("m")
            await n.start()
        try:
            for n in nodes[:2]:
                others = set(d) - {n.rank}
                assert await n.wait_connected(others, 10) == others
            assert await nodes[2].wait_connected({0, 1}, 10) == {0, 1}
            await asyncio.sleep(0.5)
            assert nodes[2].connected == {0, 1} and nodes[3].connected == {0, 1}
            assert 2 not in nodes[4].connected and 3 not in nodes[4].connected
            assert nodes[2].stats.rejected["bad_rank"] + nodes[3].stats.rejected["bad_rank"] >= 2
            # PS <-> worker traffic is unchanged
            f = nodes[3].send(0, "m", 0, [torch.ones(2)])
            assert await asyncio.wait_for(f, 10) is True
        finally:
            for n in nodes:
                await n.close()
        with pytest.raises(errors.ConfigError):
            Node(2, "worker", SECRET, directory=d, limits=LIM, peer_roles=("server",))
    run(main())


def test_free_ports_avoid_the_ephemeral_range():
    """The launcher's ports come from below the range outgoing connections take theirs from
    (a port the kernel picked there was once taken by a connect() before the node bound it)."""
    from byzsgd.net.peers import ephemeral_port_range, free_ports
    import socket
    lo, _ = ephemeral_port_range()
    ports = free_ports(40)
    assert len(set(ports)) == 40
    if lo - 10000 >= 8 * 40:
        assert all(10000 <= p < lo for p in ports), ports
    for p in ports:  # each is bindable now
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        s.close()
