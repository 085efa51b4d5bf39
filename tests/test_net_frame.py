"""Wire format: encode/decode round trips, limit checks, and a fuzz of the frame decoder."""
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from byzsgd.net import FrameLimits, errors
from byzsgd.net.bufpool import BufferPool, bucket
from byzsgd.net.frame import PREFIX, decode_header, encode
from byzsgd.net.protocol import FrameReader

pytestmark = pytest.mark.timeout(180, method="thread")  # uvloop can delay signal-based timeouts

torch.set_num_threads(1)
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20, max_tensors=4)


def feed_all(reader, data: bytes, chunk: int = 1 << 30):
    out = []
    i = 0
    while i < len(data):
        mv = reader.get_buffer()
        assert len(mv) > 0
        n = min(len(mv), chunk, len(data) - i)
        mv[:n] = data[i:i + n]
        out += reader.feed(n)
        i += n
    return out


def frame_bytes(*a, **k) -> bytes:
    bufs, n, _ = encode(*a, **k)
    data = b"".join(bytes(b) for b in bufs)
    assert len(data) == n
    return data


def test_round_trip_through_reader_in_odd_chunks():
    ts = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.tensor(True), torch.empty(0, 4)]
    data = frame_bytes("grad", 9, 3, ts, meta={"x": 1.5, "s": "a", "b": b"\x00", "n": None})
    for chunk in (1, 7, 64, 1 << 20):
        r = FrameReader(LIM, BufferPool(), kinds={"grad": None}, sender=3, handshake=False)
        msgs = feed_all(r, data * 3, chunk)
        assert len(msgs) == 3
        for m in msgs:
            assert (m.kind, m.step, m.sender) == ("grad", 9, 3)
            assert m.meta == {"x": 1.5, "s": "a", "b": b"\x00", "n": None}
            for a, b in zip(m.tensors, ts):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            m.release()
            m.release()  # idempotent


def test_encode_refuses_what_limits_refuse():
    with pytest.raises(errors.FrameTooLarge):
        encode("k", 0, 0, [torch.zeros(1 << 19)], limits=LIM)
    with pytest.raises(errors.TooManyTensors):
        encode("k", 0, 0, [torch.zeros(1)] * 5, limits=LIM)
    with pytest.raises(errors.BadDtype):
        encode("k", 0, 0, [torch.zeros(1, dtype=torch.int8)], limits=LIM)
    for bad in (-1, 1 << 63, 1.0, True):
        with pytest.raises(errors.BadStep):
            encode("k", bad, 0)
    encode("k", (1 << 63) - 1, 0)  # int64 max still encodes (headroom above MAX_STEP)
    with pytest.raises(TypeError):
        encode("k", 0, 0, meta={"x": [1]})


def test_for_model():
    lim = FrameLimits.for_model(1_000_000)
    assert 4_000_000 < lim.max_frame_bytes < 6_000_000
    encode("m", 0, 0, [torch.zeros(1_000_000)], limits=lim)
    with pytest.raises(errors.ConfigError):
        FrameLimits.for_model(-1)
    with pytest.raises(errors.ConfigError):
        FrameLimits(allowed_dtypes=frozenset({torch.complex64}))


def hdr(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


GOOD = ["k", 1, 2, [["f4", [2, 2], 16]], {}]


@pytest.mark.parametrize("obj,exc", [
    (b"\xc1", errors.BadHeader),                        # invalid msgpack byte
    ("not a list", errors.BadHeader),
    (["k", 1, 2, []], errors.BadHeader),                # wrong arity
    ([1, 1, 2, [], {}], errors.BadHeader),              # kind not str
    (["zz", 1, 2, [], {}], errors.UnknownKind),
    (["k", -1, 2, [], {}], errors.BadStep),
    (["k", 1.0, 2, [], {}], errors.BadStep),
    (["k", 1, 3, [], {}], errors.SenderMismatch),
    (["k", 1, 2, [["c8", [1], 8]], {}], errors.BadDtype),
    (["k", 1, 2, [["i1", [1], 1]], {}], errors.BadDtype),   # known but not allowed
    (["k", 1, 2, [["f4", [2, 2], 15]], {}], errors.ShapeMismatch),
    (["k", 1, 2, [["f4", [2, -2], 16]], {}], errors.BadHeader),
    (["k", 1, 2, [["f4", [1 << 40, 1 << 40], 0]], {}], errors.ShapeMismatch),
    (["k", 1, 2, [["f4", "22", 16]], {}], errors.BadHeader),
    (["k", 1, 2, [["f4", [1], 4]] * 5, {}], errors.TooManyTensors),
    (["k", 1, 2, [], {"a": [1]}], errors.BadMeta),
    (["k", 1, 2, [], {1: 1}], errors.BadHeader),          # strict_map_key refuses int keys
    (["k", 1, 2, [], []], errors.BadHeader),
])
def test_decode_header_violations(obj, exc):
    data = obj if isinstance(obj, bytes) else hdr(obj)
    with pytest.raises(exc):
        decode_header(data, 16, LIM, kinds={"k": None}, sender=2)


def test_decode_header_checks_body_length_and_registered_shapes():
    decode_header(hdr(GOOD), 16, LIM, kinds={"k": None}, sender=2)
    with pytest.raises(errors.ShapeMismatch):
        decode_header(hdr(GOOD), 17, LIM, kinds={"k": None}, sender=2)
    with pytest.raises(errors.ShapeMismatch):
        decode_header(hdr(GOOD), 16, LIM, kinds={"k": [(4,)]}, sender=2)
    decode_header(hdr(GOOD), 16, LIM, kinds={"k": [(2, 2)]}, sender=2)


def test_prefix_limits_refuse_before_allocating():
    pool = BufferPool()
    for prefix, exc in [(PREFIX.pack(LIM.max_header_bytes + 1, 0), errors.HeaderTooLarge),
                        (PREFIX.pack(0, 0), errors.HeaderTooLarge),
                        (PREFIX.pack(10, (1 << 20) + 1), errors.FrameTooLarge),
                        (PREFIX.pack(10, 1 << 63), errors.FrameTooLarge)]:
        r = FrameReader(LIM, pool, kinds=None, sender=None, handshake=False)
        with pytest.raises(exc):
            feed_all(r, prefix)
    assert pool.allocations == 0


class GuardPool(BufferPool):
    def acquire(self, n):
        assert 0 < n <= LIM.max_frame_bytes, n
        return super().acquire(n)


_valid = frame_bytes("k", 3, 2, [torch.randn(4, 4), torch.tensor([1, 2], dtype=torch.int32)])


def _mutations():
    prefix = st.builds(lambda h, b: PREFIX.pack(h, b), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
    small_prefix = st.builds(lambda h, b: PREFIX.pack(h, b), st.integers(0, 5000), st.integers(0, 5000))
    header_objs = st.recursive(
        st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda ch: st.lists(ch, max_size=6) | st.dictionaries(st.text(max_size=4), ch, max_size=4),
        max_leaves=20)
    structured = st.builds(
        lambda h, body: (lambda hb: PREFIX.pack(len(hb), len(body)) + hb + body)(hdr(h)),
        st.one_of(header_objs, st.builds(
            lambda k, s, snd, specs, meta: [k, s, snd, specs, meta],
            st.sampled_from(["k", "x", 1]), st.integers(-3, 2**64 - 1), st.integers(-1, 3),
            st.lists(st.lists(st.one_of(st.sampled_from(["f4", "f8", "b1", "zz"]),
                                        st.lists(st.integers(-1, 10**12), max_size=4),
                                        st.integers(-1, 10**12)), min_size=0, max_size=4), max_size=10),
            st.one_of(st.dictionaries(st.text(max_size=3), st.integers(-2**63, 2**63 - 1), max_size=3), st.integers(0, 9)))),
        st.binary(max_size=300))
    flipped = st.builds(lambda i, v: _valid[:i] + bytes([v]) + _valid[i + 1:],
                        st.integers(0, len(_valid) - 1), st.integers(0, 255))
    truncated = st.builds(lambda i: _valid[:i], st.integers(0, len(_valid)))
    return st.one_of(st.binary(max_size=400), prefix.map(lambda p: p + b"\x00" * 20),
                     st.builds(lambda p, b: p + b, small_prefix, st.binary(max_size=300)),
                     structured, flipped, truncated)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_mutations(), chunk=st.integers(1, 64))
def test_fuzz_frame_reader(data, chunk):
    """Nothing but ProtocolError escapes; no buffer above the limit is ever requested."""
    r = FrameReader(LIM, GuardPool(), kinds={"k": None}, sender=2, handshake=False)
    try:
        for m in feed_all(r, data, chunk):
            assert m.kind == "k" and m.sender == 2 and m.step >= 0
            m.release()
    except errors.ProtocolError:
        pass


def test_pool_reuses_buffers():
    pool = BufferPool(max_cached_bytes=1 << 24)
    a = pool.acquire(5000)
    assert len(a) == bucket(5000) >= 5000
    pool.release(a)
    assert pool.acquire(4500) is a
    assert pool.allocations == 1
    pool2 = BufferPool(max_cached_bytes=4096)
    b = pool2.acquire(10000)
    pool2.release(b)
    assert pool2.cached_bytes == 0


def test_layering_net_imports_only_errors_from_byzsgd():
    import ast
    import pathlib

    import byzsgd.net
    for path in pathlib.Path(byzsgd.net.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                if m == "byzsgd" or m.startswith("byzsgd."):
                    assert m == "byzsgd.errors" or m.startswith("byzsgd.net"), (path.name, m)


def test_decoder_bounds_the_step():
    import msgpack
    from byzsgd.net.frame import MAX_STEP, decode_header
    for bad in (-1, MAX_STEP, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        h = msgpack.packb(["k", bad, 0, [], {}], use_bin_type=True)
        with pytest.raises(errors.BadStep):
            decode_header(h, 0, LIM)
    h = msgpack.packb(["k", MAX_STEP - 1, 0, [], {}], use_bin_type=True)
    assert decode_header(h, 0, LIM).step == MAX_STEP - 1
    encode("k", MAX_STEP - 1 + 1000, 0)  # a reply to any accepted step still encodes
