"""The per-message fast path: small frames joined and received without the pool, queued small
frames written together, a broadcast framed once for all its recipients.  Each test pins a
behaviour the RTT and fan-out numbers of scripts/bench_net.py rely on."""
import asyncio

import pytest
import torch

from byzsgd.net import FrameLimits, errors, run
from byzsgd.net import sending as sending_mod
from byzsgd.net.bufpool import BufferPool
from byzsgd.net.frame import SMALL_FRAME, encode
from byzsgd.net.outbox import BATCH_BYTES, Outbox
from byzsgd.net.protocol import FrameReader
from tests.test_net_frame import feed_all
from tests.test_net_node import make_nodes, started

LIM = FrameLimits.for_model(1 << 20)


# -- encode ---------------------------------------------------------------------------------
def test_small_frame_is_one_joined_buffer_and_keeps_nothing():
    x = torch.arange(16, dtype=torch.float32)
    bufs, n, keep = encode("k", 3, 1, [x], {"a": 1}, LIM)
    assert len(bufs) == 1 and isinstance(bufs[0], bytes) and len(bufs[0]) == n and keep == []
    x.add_(1)  # a copy was sent: changing the tensor now changes nothing
    msgs = feed_all(FrameReader(LIM, BufferPool(), kinds=None, sender=1, handshake=False), bufs[0])
    assert torch.equal(msgs[0].tensors[0], torch.arange(16, dtype=torch.float32))


def test_large_frame_is_sent_from_the_tensor_memory():
    x = torch.ones(SMALL_FRAME)  # 4 x SMALL_FRAME bytes
    bufs, n, keep = encode("k", 3, 1, [x], None, LIM)
    assert len(bufs) == 2 and keep[0] is x
    assert memoryview(bufs[1]).obj is not None and bytes(bufs[1][:4]) == bytes(x[:1].numpy())
    x[0] = 7.0  # zero-copy: the view sees the tensor's own memory
    assert bytes(bufs[1][:4]) == bytes(torch.tensor([7.0]).numpy())


@pytest.mark.parametrize("bad,exc", [
    (dict(kind=""), ValueError), (dict(step=-1), errors.BadStep), (dict(step=1.0), errors.BadStep),
    (dict(tensors=[[1.0]]), TypeError), (dict(tensors=[torch.zeros(2, dtype=torch.complex64)]), errors.BadDtype),
    (dict(meta={"k": [1]}), TypeError), (dict(meta=[1]), TypeError),
    (dict(tensors=[torch.zeros(1)] * 9), errors.TooManyTensors),
])
def test_the_fast_encode_keeps_every_check(bad, exc):
    args = dict(kind="k", step=0, sender=1, tensors=[torch.zeros(4)], meta=None)
    args.update(bad)
    with pytest.raises(exc):
        encode(args["kind"], args["step"], args["sender"], args["tensors"], args["meta"], LIM)


# -- receive --------------------------------------------------------------------------------
def test_small_bodies_skip_the_pool_large_ones_reuse_it():
    pool = BufferPool()
    r = FrameReader(LIM, pool, kinds=None, sender=1, handshake=False)
    small = torch.randn(64)
    for step in range(5):
        bufs, _, _ = encode("k", step, 1, [small], None, LIM)
        (m,) = feed_all(r, bufs[0])
        assert torch.equal(m.tensors[0], small) and m.step == step
        m.release()
    assert pool.allocations == 0  # small frames: a fresh copy each, never a pooled buffer
    big = torch.randn(3 * SMALL_FRAME)
    for step in range(3):
        bufs, _, _ = encode("k", step, 1, [big], None, LIM)
        (m,) = feed_all(r, b"".join(bytes(b) for b in bufs))
        assert torch.equal(m.tensors[0], big)
        m.release()
    assert pool.allocations == 1  # reused


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_small_frames_split_anywhere_decode_the_same(chunk):
    r = FrameReader(LIM, BufferPool(), kinds=None, sender=1, handshake=False)
    xs = [torch.randn(k) for k in (1, 16, 300)]
    data = b"".join(encode("k", i, 1, [x], {"i": i}, LIM)[0][0] for i, x in enumerate(xs))
    msgs = feed_all(r, data, chunk=chunk)
    assert [m.meta["i"] for m in msgs] == [0, 1, 2]
    assert all(torch.equal(m.tensors[0], x) for m, x in zip(msgs, xs))


def test_a_lying_small_frame_is_still_refused():
    bufs, _, _ = encode("k", 0, 1, [torch.zeros(4)], None, LIM)
    r = FrameReader(LIM, BufferPool(), kinds=None, sender=2, handshake=False)
    with pytest.raises(errors.SenderMismatch):
        feed_all(r, bufs[0])
    r = FrameReader(LIM, BufferPool(), kinds={"k": [(5,)]}, sender=1, handshake=False)
    with pytest.raises(errors.ShapeMismatch):
        feed_all(r, bufs[0])


# -- outbox batching ------------------------------------------------------------------------
class _Transport:
    def __init__(self):
        self.writes = []
        self.pending = 0

    def write(self, data):
        self.writes.append(bytes(data))

    def writelines(self, bufs):
        self.writes.append(b"".join(bytes(b) for b in bufs))

    def get_write_buffer_size(self):
        return self.pending


class _Conn:
    tls = False
    closed = False

    def __init__(self):
        self.transport = _Transport()
        self.write_paused = False


class _Stats:
    dropped = frames_sent = bytes_sent = 0


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def queued_while_paused(loop, items, ob=None, conn=None):
    """Put ``items`` (lists of buffers) while the kernel is full, then resume: (outbox,
    connection, futures)."""
    if ob is None:
        ob, conn = Outbox(1, 64, _Stats()), _Conn()
        ob.attach(conn)
    conn.write_paused = True
    futs = [loop.create_future() for _ in items]
    for bufs, f in zip(items, futs):
        ob.put(bufs, sum(len(b) for b in bufs), f, None)
    assert not any(f.done() for f in futs)
    conn.write_paused = False
    ob.on_resume(conn)
    return ob, conn, futs


def test_queued_small_frames_go_out_in_one_write_in_order(loop):
    ob, conn = Outbox(1, 64, _Stats()), _Conn()
    ob.attach(conn)
    f0 = loop.create_future()
    ob.put([b"first"], 5, f0, None)  # nothing queued: written at once
    assert conn.transport.writes == [b"first"] and f0.result() is True
    _, _, futs = queued_while_paused(loop, [[b"m%d" % i] for i in range(5)], ob, conn)
    assert conn.transport.writes[1:] == [b"m0m1m2m3m4"]  # one write, per-peer order kept
    assert all(f.result() is True for f in futs) and ob.stats.frames_sent == 6


def test_batches_stop_at_large_frames_and_at_the_byte_cap(loop):
    half = b"x" * (BATCH_BYTES // 2)
    items = [[b"a"], [half], [half], [b"head", memoryview(b"tensor")], [b"z"]]
    _, conn, futs = queued_while_paused(loop, items)
    assert conn.transport.writes == [b"a" + half, half, b"headtensor", b"z"]
    assert all(f.result() is True for f in futs)


def test_a_batch_in_flight_resolves_together_and_fails_together(loop):
    ob, conn = Outbox(1, 64, _Stats()), _Conn()
    ob.attach(conn)
    conn.transport.pending = 3  # the kernel will not take it all
    _, _, futs = queued_while_paused(loop, [[b"s"]] * 3, ob, conn)
    assert ob.busy and not any(f.done() for f in futs)
    ob.detach(conn)  # the connection died while it was being written
    assert [f.result() for f in futs] == [False] * 3 and not ob.busy


# -- broadcast: framed once -----------------------------------------------------------------
def test_broadcast_frames_once_for_every_recipient(monkeypatch):
    calls = []
    real = sending_mod.encode

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    async def main():
        nodes = make_nodes(1, 4)
        async with started(nodes) as boxes:
            x = torch.randn(50_000)  # a large frame: sent from x's own memory to every peer
            monkeypatch.setattr(sending_mod, "encode", counting)
            futs = nodes[0].broadcast([1, 2, 3, 4], "m", 7, [x], {"v": 1})
            assert await asyncio.gather(*futs) == [True] * 4
            assert calls == ["m"]  # one framing, four recipients
            for r in (1, 2, 3, 4):
                got = await boxes[r]["m"].collect(7, 1, senders={0}, timeout=10)
                assert torch.equal(got[0].tensors[0], x) and got[0].meta == {"v": 1}
            calls.clear()
            small = torch.randn(8)
            futs = nodes[0].broadcast([1, 2, 3, 4, 0], "m", 8, [small])  # itself too: local copy
            assert await asyncio.gather(*futs) == [True] * 5
            assert calls.count("m") == 1 + 1  # the frame, plus the local send's own check
            for r in (0, 1, 2, 3, 4):
                got = await boxes[r]["m"].collect(8, 1, senders={0}, timeout=10)
                assert torch.equal(got[0].tensors[0], small)
    run(main())


def test_broadcast_to_an_unknown_rank_sends_nothing():
    async def main():
        nodes = make_nodes(1, 2)
        async with started(nodes):
            before = nodes[0].stats.frames_sent
            with pytest.raises(errors.UnknownPeer):
                nodes[0].broadcast([1, 99, 2], "m", 1, [torch.zeros(2)])
            assert nodes[0].stats.frames_sent == before
    run(main())


def test_a_small_staged_frame_is_read_after_its_device_copy_not_before():
    """Device tensors go through staging buffers filled by an asynchronous copy: a small frame
    must not be joined (copied) at encode time, when those buffers are not filled yet."""
    import concurrent.futures
    import threading

    from byzsgd.net.staging import Staged

    class LateStaging:  # stands in for DeviceStaging: the copy ends 50 ms after stage()
        def stage(self, tensors):
            host = [torch.zeros(t.shape) for t in tensors]
            ready = concurrent.futures.Future()

            def copy():
                for h in host:
                    h.fill_(7.0)
                ready.set_result(None)
            threading.Timer(0.05, copy).start()
            return Staged(host, ready)

        def close(self):
            pass

    async def main():
        nodes = make_nodes(1, 2)
        async with started(nodes) as boxes:
            nodes[0].staging = LateStaging()
            dev = torch.empty(8, device="meta")  # not host memory: goes through staging
            futs = nodes[0].broadcast([1, 2], "m", 3, [dev])
            assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [True, True]
            for r in (1, 2):
                got = await boxes[r]["m"].collect(3, 1, senders={0}, timeout=10)
                assert torch.equal(got[0].tensors[0], torch.full((8,), 7.0))
    run(main())
