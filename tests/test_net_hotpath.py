"""The small-message hot path (issue 28): the receiver's header cache, messages that build their
tensors on first use, and the outbox's corking.  Each test pins a way these could break while
the round-trip numbers of scripts/bench_net.py still looked fine."""
import asyncio
import logging

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from byzsgd.net import FrameLimits, errors, run
from byzsgd.net.bufpool import BufferPool
from byzsgd.net.frame import MAX_SEND_STEP, MAX_STEP, PREFIX, SMALL_FRAME, encode
from byzsgd.net.hcache import HCACHE_ENTRIES, HCACHE_HEADER
from byzsgd.net.outbox import Outbox
from byzsgd.net.protocol import FrameReader
from tests.test_net_fastpath import _Conn, _Stats
from tests.test_net_frame import GuardPool, feed_all, frame_bytes
from tests.test_net_frame import LIM as FLIM
from tests.test_net_node import auth_raw, good_frame_bytes, make_nodes, roundtrip, started

pytestmark = pytest.mark.timeout(180, method="thread")
torch.set_num_threads(1)
LIM = FrameLimits.for_model(1 << 16)
#: one step per msgpack width the cache parses: fixint, uint8, uint16, uint32, uint64
STEPS = [0, 5, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, MAX_STEP - 1]


def reader(sender=1, kinds=None, pool=None, lim=LIM):
    return FrameReader(lim, pool or BufferPool(), kinds=kinds, sender=sender, handshake=False)


def same(msgs, steps, xs):
    assert [m.step for m in msgs] == steps
    for m, x in zip(msgs, xs):
        assert m.kind == "k" and m.sender == 1 and m.meta == {}
        assert len(m.tensors) == 1 and torch.equal(m.tensors[0], x)


# -- the header cache -------------------------------------------------------------------------
def test_cached_headers_split_at_every_byte_boundary():
    """Frames whose headers differ only in the step (every msgpack width of it), the first
    warming the cache, the stream cut in two at every byte: the same messages each time."""
    xs = [torch.randn(16) for _ in STEPS]
    data = b"".join(frame_bytes("k", s, 1, [x]) for s, x in zip(STEPS, xs))
    for cut in range(len(data) + 1):
        r = reader()
        msgs = feed_all(r, data[:cut]) + feed_all(r, data[cut:])
        same(msgs, STEPS, xs)
    r = reader()
    same(feed_all(r, data, chunk=1), STEPS, xs)
    assert len(r._hcache) == 1  # one entry: the step is not part of the key


def test_many_frames_in_one_read_keep_their_order_and_bytes():
    xs = [torch.full((16,), float(i)) for i in range(300)]
    data = b"".join(frame_bytes("k", i, 1, [x]) for i, x in enumerate(xs))
    r = reader()
    msgs = feed_all(r, data)  # one get_buffer / feed for all 300
    same(msgs, list(range(300)), xs)


def test_a_cached_header_with_a_step_out_of_range_is_refused():
    for bad in (MAX_STEP, (1 << 64) - 1):
        frame = bytearray(frame_bytes("k", 1 << 40, 1, [torch.zeros(4)]))  # a uint64 step
        at = frame.index(b"\xcf")
        frame[at + 1:at + 9] = bad.to_bytes(8, "big")
        r = reader()
        feed_all(r, frame_bytes("k", 5, 1, [torch.zeros(4)]))  # the cache now holds this header
        assert len(r._hcache) == 1
        with pytest.raises(errors.BadStep):
            feed_all(r, bytes(frame))


@pytest.mark.parametrize("claim,kinds,exc", [
    (2, None, errors.SenderMismatch),              # the key holds the claimed sender
    (1, {"k": [(4,)]}, errors.ShapeMismatch),      # registered shapes: another shape, another key
])
def test_the_cache_never_lets_through_what_a_fresh_decode_refuses(claim, kinds, exc):
    r = reader(sender=1, kinds=kinds)
    assert len(feed_all(r, frame_bytes("k", 0, 1, [torch.zeros(4)]))) == 1 and r._hcache
    with pytest.raises(exc):
        feed_all(r, frame_bytes("k", 1, claim, [torch.zeros(4 if claim == 2 else 5)]))


def test_start_frames_clears_the_cache():
    r = FrameReader(LIM, BufferPool(), kinds=None, handshake=True)
    r._hcache[(b"x", b"y", 0)] = ("k", 9, ())
    r.start_frames(1)
    assert r._hcache == {}


def test_the_cache_is_bounded():
    r = reader()
    n = HCACHE_ENTRIES + 50
    data = b"".join(frame_bytes("k", 0, 1, [torch.zeros(k)]) for k in range(1, n + 1))
    assert len(feed_all(r, data)) == n
    assert 0 < len(r._hcache) <= HCACHE_ENTRIES
    r2 = reader()  # a header above HCACHE_HEADER bytes is decoded, never cached
    wide = torch.zeros(*[300, 0] * 8)  # 16 dims: a ~40-byte spec, no bytes
    data = frame_bytes("k" * 31, 0, 1, [wide] * 8)
    assert PREFIX.unpack_from(data)[0] > HCACHE_HEADER
    assert len(feed_all(r2, data)) == 1 and r2._hcache == {}


_warm = frame_bytes("k", 3, 2, [torch.randn(4, 4), torch.tensor([1, 2], dtype=torch.int32)])


def _near_misses():
    """The warm frame with one byte changed (its step's bytes, kind, specs, meta), truncated,
    or with another step appended: what a cache keyed wrongly would accept."""
    flipped = st.builds(lambda i, v: _warm[:i] + bytes([v]) + _warm[i + 1:],
                        st.integers(0, len(_warm) - 1), st.integers(0, 255))
    steps = st.builds(lambda s: frame_bytes("k", s, 2, [torch.randn(4, 4), torch.tensor([1, 2], dtype=torch.int32)]),
                      st.sampled_from(STEPS))
    resized = st.builds(lambda h: PREFIX.pack(h, len(_warm) - PREFIX.size - 33) + _warm[PREFIX.size:],
                        st.integers(1, 60))
    return st.one_of(flipped, steps, resized)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_near_misses(), chunk=st.integers(1, 64))
def test_fuzz_a_warm_cache_decides_like_a_fresh_decoder(data, chunk):
    """Differential: a reader whose cache holds the valid header and a fresh one (which decodes
    every header in full) accept the same messages and refuse with the same error."""
    def outcome(warm: bool):
        r = FrameReader(FLIM, GuardPool(), kinds={"k": None}, sender=2, handshake=False)
        if warm:
            assert len(feed_all(r, _warm)) == 1 and r._hcache
        try:
            return [(m.kind, m.step, m.sender, m.meta, [t.numpy().tobytes() for t in m.tensors])
                    for m in feed_all(r, data, chunk)]
        except errors.ProtocolError as e:
            return type(e)
    fresh, warm = outcome(False), outcome(True)
    assert fresh == warm  # tensors compared as bytes: a flipped body byte may make a NaN


def test_oversized_lengths_are_refused_before_allocation_on_the_inline_prefix_check():
    pool = GuardPool()
    for prefix, exc in [(PREFIX.pack(FLIM.max_header_bytes + 1, 0), errors.HeaderTooLarge),
                        (PREFIX.pack(0, 0), errors.HeaderTooLarge),
                        (PREFIX.pack(10, FLIM.max_frame_bytes + 1), errors.FrameTooLarge)]:
        r = FrameReader(FLIM, pool, kinds=None, sender=2, handshake=False)
        feed_all(r, _warm)  # warm cache, then the bad prefix
        with pytest.raises(exc):
            feed_all(r, prefix + b"\0" * 16)
    assert pool.allocations == 0


def test_a_malformed_header_after_cached_ones_closes_only_that_connection(caplog):
    """A raw rank-2 peer sends good frames (cached), then the same header with its nbytes
    changed: that connection is closed with its reason, rank 1 keeps its round trips."""
    good = good_frame_bytes(step=1)
    bad = bytearray(good_frame_bytes(step=2))
    at = bad.index(bytes([0x10]), PREFIX.size)  # nbytes 16 (a positive fixint) in the spec
    bad[at] = 0x0c  # 12: prod(shape) * itemsize no longer matches

    async def main():
        nodes = make_nodes(1, 2)
        n0, n1 = nodes[0], nodes[1]
        async with started(nodes[:2], connect=False) as boxes:
            assert await n0.wait_connected({1}, 10) == {1}
            raw = await auth_raw(n0, 2)
            raw.write(good)
            got = await boxes[0]["m"].collect(1, 1, senders={2}, timeout=5)
            assert torch.equal(got[2].tensors[0], torch.ones(4))
            raw.write(bytes(bad))
            assert await raw.closed_by_peer(5)
            assert n0.stats.rejected["shape_mismatch"] == 1, n0.stats.rejected
            m = await roundtrip(n1, boxes[0]["m"], 0, 7, [torch.arange(5)])
            assert torch.equal(m.tensors[0], torch.arange(5))
            await raw.close()

    with caplog.at_level(logging.WARNING, logger="byzsgd.net"):
        run(main())


# -- messages build their tensors on first use ------------------------------------------------
def test_tensors_are_built_on_first_use_and_not_after_release():
    pool = BufferPool()
    x = torch.randn(50_000)  # a pooled body
    m, = feed_all(reader(pool=pool), frame_bytes("k", 0, 1, [x]))
    assert m.nbytes == x.numel() * 4 and not m.released
    assert torch.equal(m.tensors[0], x) and m.tensors is m.tensors  # built once
    m.release()
    assert m.tensors == [] and m.released
    m2, = feed_all(reader(pool=pool), frame_bytes("k", 1, 1, [x]))
    m2.release()  # never looked at: the buffer goes back all the same
    assert m2.tensors == [] and pool.allocations == 1
    s, = feed_all(reader(), frame_bytes("k", 2, 1, [torch.arange(6).view(2, 3)]))
    assert "tensors=1" in repr(s) and torch.equal(s.tensors[0], torch.arange(6).view(2, 3))
    s.tensors = [torch.zeros(1)]  # a handler may replace them
    assert torch.equal(s.tensors[0], torch.zeros(1))


# -- corking ----------------------------------------------------------------------------------
@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_a_burst_goes_out_in_few_writes_in_order_and_never_drops(loop):
    """100 sends in one loop iteration to a peer with room for 64: the first is written at once
    (a round trip waits for nothing), the rest in a few joined writes, none dropped."""
    ob, conn = Outbox(1, 64, _Stats()), _Conn()
    ob.attach(conn)
    futs = [loop.create_future() for _ in range(100)]
    for i, f in enumerate(futs):
        ob.put([b"m%03d" % i], 4, f, None)
    assert conn.transport.writes[0] == b"m000" and futs[0].result() is True
    loop.run_until_complete(asyncio.sleep(0))  # the iteration ends: the cork's callback runs
    assert b"".join(conn.transport.writes) == b"".join(b"m%03d" % i for i in range(100))
    assert len(conn.transport.writes) <= 5 and ob.stats.dropped == 0
    assert all(f.result() is True for f in futs)
    f = loop.create_future()
    ob.put([b"next"], 4, f, None)  # a later iteration: written at once again
    assert conn.transport.writes[-1] == b"next" and f.result() is True


def test_an_answer_rearms_the_direct_write(loop):
    """Request/answer: each message is written at once, no callback waited for; two sends
    without an answer between them are a burst: the second waits for the iteration's end."""
    ob, conn = Outbox(1, 64, _Stats()), _Conn()
    ob.attach(conn)
    for i in range(3):
        f = loop.create_future()
        ob.put([b"q%d" % i], 2, f, None)
        assert conn.transport.writes[-1] == b"q%d" % i and f.result() is True
        ob.on_read()  # the answer arrived
    f1, f2 = loop.create_future(), loop.create_future()
    ob.put([b"a"], 1, f1, None)
    ob.put([b"b"], 1, f2, None)
    assert conn.transport.writes[-1] == b"a" and not f2.done()
    loop.run_until_complete(asyncio.sleep(0))
    assert conn.transport.writes[-1] == b"b" and f2.result() is True


def test_a_node_burst_larger_than_the_outbox_arrives_whole():
    async def main():
        nodes = make_nodes(1, 1, outbox_depth=8)
        async with started(nodes, kinds=("m",)) as boxes:
            futs = [nodes[1].send(0, "m", i, [torch.full((4,), float(i))]) for i in range(40)]
            assert await asyncio.gather(*futs) == [True] * 40
            for i in range(40):
                got = await boxes[0]["m"].collect(i, 1, senders={1}, timeout=10)
                assert torch.equal(got[1].tensors[0], torch.full((4,), float(i)))
                got[1].release()
            assert nodes[1].stats.dropped == 0
    run(main())


def test_the_encoder_copies_small_tensors_from_their_memory():
    """The joined small frame reads each tensor's bytes at its own offset (a view into a larger
    storage included), with the alignment padding between tensors."""
    base = torch.arange(40, dtype=torch.float32)
    parts = [base[3:8], torch.tensor([True, False, True]), base[10:20].view(2, 5)]
    bufs, n, keep = encode("k", 1, 1, parts, None, LIM)
    assert len(bufs) == 1 and keep == []
    m, = feed_all(reader(), bufs[0])
    assert all(torch.equal(a, b) for a, b in zip(m.tensors, parts))
    h = msgpack.unpackb(bufs[0][PREFIX.size:PREFIX.size + PREFIX.unpack_from(bufs[0])[0]])
    assert h[3] == [["f4", [5], 20], ["b1", [3], 3], ["f4", [2, 5], 40]]


# -- header templates on the send side ---------------------------------------------------------
def test_templates_give_the_same_bytes_as_a_full_encode():
    tpl = {}
    cases = [torch.randn(16), torch.arange(6, dtype=torch.int64).view(2, 3), torch.tensor([True, False]),
             torch.randn(3).to(torch.bfloat16), torch.randn(1000)]
    for x in cases:
        for step in STEPS:
            full = encode("k", step, 3, [x], None, LIM)
            fast = encode("k", step, 3, [x], None, LIM, templates=tpl)
            assert fast == full, (x.dtype, x.shape, step)
    assert len(tpl) == len(cases)
    x = cases[0]
    with pytest.raises(errors.BadStep):  # the step is checked again on the template path
        encode("k", MAX_SEND_STEP, 3, [x], None, LIM, templates=tpl)
    y = torch.randn(4, 4).t()  # same (dtype, shape) as a template, not contiguous: full path
    tpl[("k", 3, y.dtype, y.shape)] = tpl[("k", 3, x.dtype, x.shape)]
    assert encode("k", 1, 3, [y], None, LIM, templates=tpl)[0] == encode("k", 1, 3, [y.contiguous()], None, LIM)[0]
    m, = feed_all(reader(sender=3), encode("k", 2, 3, [x], None, LIM, templates=tpl)[0][0])
    assert torch.equal(m.tensors[0], x)


def test_a_template_is_never_made_for_what_it_cannot_replay():
    tpl = {}
    encode("k", 1, 3, [torch.randn(4)], {"a": 1}, LIM, templates=tpl)          # meta
    encode("k", 1, 3, [torch.randn(4), torch.randn(4)], None, LIM, templates=tpl)  # two tensors
    encode("k", 1, 3, [torch.randn(4, 4).t()], None, LIM, templates=tpl)      # a copy was sent
    encode("k", 1, 3, [torch.randn(SMALL_FRAME)], None, LIM, templates=tpl)   # not a small frame
    encode("k", 1, 3, [torch.zeros(0)], None, LIM, templates=tpl)             # no bytes
    assert tpl == {}
    tight = FrameLimits(max_header_bytes=64, max_frame_bytes=1 << 20)
    encode("k" * 45, 1, 3, [torch.zeros(2)], None, tight, templates=tpl)     # a wider step would not fit
    assert tpl == {}


def test_a_negated_view_is_sent_with_its_value_not_its_memory():
    """A conjugate's imaginary part is a lazily negated view: contiguous, but its memory holds
    the value's negation.  Copying the memory of small frames must not send that."""
    im = torch.tensor([1 + 2j], dtype=torch.cfloat).conj().imag
    assert im.is_neg() and im.is_contiguous()
    tpl = {}
    for step in range(3):  # the full path, then the template path
        encode("k", step, 1, [torch.zeros(1)], None, LIM, templates=tpl)
        m, = feed_all(reader(), encode("k", step, 1, [im], None, LIM, templates=tpl)[0][0])
        assert m.tensors[0].tolist() == [-2.0]
