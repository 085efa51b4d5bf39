"""Issue 13 (3): no authenticated frame crashes a live node.  Hypothesis drives random kinds,
steps (0, -1, 2**63 - 1, 2**63, ...), shapes, dtypes, NaN payloads, truncated and garbage
headers through a real authenticated TCP connection into a node whose handlers reply, raise
and await; after each frame the node still answers, and every refusal is counted."""
import asyncio
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzsgd.net import FrameLimits, Node, PeerDirectory, errors
from byzsgd.net.codec import NAME_TO_DTYPE, align
from byzsgd.net.credentials import derive
from byzsgd.net.frame import MAX_STEP, PREFIX
from byzsgd.net.testing import RawPeer

pytestmark = pytest.mark.timeout(300, method="thread")
OPERATOR = b"operator-secret-fuzz"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 16, max_tensors=4)
KINDS = ["m", "echo", "boom", "aboom", "nope", "__rdv_dir", ""]
PROTOCOL_REASONS = {c.reason for c in vars(errors).values()
                    if isinstance(c, type) and issubclass(c, errors.ProtocolError)}


@pytest.fixture(scope="module")
def live():
    loop = asyncio.new_event_loop()
    d = PeerDirectory.local(1, 2)
    n0 = Node(0, "ps", derive(OPERATOR, 0, 3), directory=d, limits=LIM, listen_host="127.0.0.1")
    n1 = Node(1, "worker", derive(OPERATOR, 1, 3), directory=d, limits=LIM, listen_host="127.0.0.1")
    n0.mailbox("m", window=1 << 30)
    n1.mailbox("m")

    def echo(msg):  # a worker-like reply at the received step + 1 (must always encode)
        n0.send(msg.sender, "m", msg.step + 1, [t.clone() for t in msg.tensors])
        msg.release()

    def boom(msg):
        if any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in msg.tensors):
            raise FloatingPointError("NaN")
        raise KeyError("boom")

    async def aboom(msg):
        await asyncio.sleep(0)
        raise ValueError("async boom")

    pings = set()
    n0.on("ping", lambda msg: (pings.add(msg.step), msg.release()))
    n1.on("ping", lambda msg: msg.release())
    n0.on("echo", echo)
    n0.on("boom", boom)
    n0.on("aboom", aboom)

    async def start():
        await n0.start()
        await n1.start()
        assert await n1.wait_connected({0}, 10) == {0}
    loop.run_until_complete(start())
    yield loop, n0, n1, pings
    loop.run_until_complete(n0.close())
    loop.run_until_complete(n1.close())
    loop.close()


def frame_bytes(kind, step, sender, specs, meta, body):
    h = msgpack.packb([kind, step, sender, specs, meta], use_bin_type=True)
    return PREFIX.pack(len(h), len(body)) + h + body


@st.composite
def tensor_spec(draw):
    name = draw(st.sampled_from(sorted(NAME_TO_DTYPE) + ["i1", "zz"]))
    shape = draw(st.lists(st.integers(0, 9), max_size=3))
    n = 1
    for s in shape:
        n *= s
    item = torch.empty(0, dtype=NAME_TO_DTYPE[name]).element_size() if name in NAME_TO_DTYPE else 1
    nbytes = draw(st.sampled_from([n * item, n * item, n * item + 1, 0]))
    return [name, shape, nbytes]


@st.composite
def frames(draw):
    mode = draw(st.sampled_from(["frame", "frame", "frame", "garbage_header", "truncated", "huge_prefix"]))
    kind = draw(st.sampled_from(KINDS) | st.text(max_size=70))
    step = draw(st.sampled_from([0, 1, -1, MAX_STEP - 1, MAX_STEP, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
                                 -(1 << 63)]) | st.integers(-(1 << 63), (1 << 64) - 1))
    sender = draw(st.sampled_from([2, 2, 2, 0, 1, -1]))
    specs = draw(st.lists(tensor_spec(), max_size=3))
    meta = draw(st.sampled_from([{}, {"a": 1}, {"x": float("nan")}, {1: 2}]))
    body = bytearray()
    for name, shape, nbytes in specs:
        body.extend(b"\0" * (align(len(body)) - len(body)))
        if name in ("f4", "f8", "float32", "float64") and draw(st.booleans()):
            fill = struct.pack("<f", float("nan"))
            body.extend((fill * (nbytes // 4 + 1))[:nbytes])
        else:
            body.extend(draw(st.binary(min_size=nbytes, max_size=nbytes)) if nbytes < 64 else b"\x7f" * nbytes)
    if draw(st.booleans()):
        body.extend(b"\0" * draw(st.integers(0, 3)))
    try:
        data = frame_bytes(kind, step, sender, specs, meta, bytes(body))
    except (OverflowError, ValueError, TypeError):
        data = frame_bytes("m", 0, 2, [], {}, b"")
    if mode == "garbage_header":
        g = draw(st.binary(min_size=1, max_size=40))
        data = PREFIX.pack(len(g), 0) + g
    elif mode == "truncated":
        data = data[:draw(st.integers(1, max(1, len(data) - 1)))]
    elif mode == "huge_prefix":
        data = PREFIX.pack(draw(st.integers(0, 1 << 32 - 1)), draw(st.integers(0, (1 << 64) - 1)))
    return data


@settings(max_examples=int(__import__("os").environ.get("FUZZ_N", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=frames())
def test_authenticated_fuzz_never_crashes_a_live_node(live, data):
    loop, n0, n1, pings = live

    async def case():
        before = sum(n0.stats.rejected.values())
        p = await RawPeer.connect("127.0.0.1", n0.port)
        assert (await p.handshake(derive(OPERATOR, 2, 3), 2, 0, 1)) == {"ok": True}
        p.write(data)
        closed = await p.closed_by_peer(0.3)
        await p.close()
        await asyncio.sleep(0.01)
        after = sum(n0.stats.rejected.values())
        if closed:
            assert after == before + 1, (n0.stats.rejected, data[:80])
        for reason in n0.stats.rejected:
            assert reason in PROTOCOL_REASONS | {"peer_closed"}, n0.stats.rejected
        for reason in n0.stats.failures:
            assert reason.startswith("handler:"), n0.stats.failures
        # the node still answers its real peers
        step = n0.stats.frames_received
        assert await asyncio.wait_for(n1.send(0, "ping", step, [torch.ones(2)]), 5)
        for _ in range(500):
            if step in pings:
                break
            await asyncio.sleep(0.01)
        assert step in pings and 1 in n0.connected
    loop.run_until_complete(case())
