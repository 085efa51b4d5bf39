"""Issue 24 (4): what peers cause is logged rate-limited, with a count of what was held back.

The node's log used to get one WARNING line per refused connection (138 KB per PS in 33 s of
an outsider's churn) and one INFO line per reconnect of a member.  Fake clocks, no sleeps."""
import asyncio
import logging
import re

import pytest

from byzsgd.net import FrameLimits, Node, PeerDirectory, run
from byzsgd.net.credentials import derive
from byzsgd.net.ratelog import RateLog
from byzsgd.net.testing import RawPeer

pytestmark = pytest.mark.timeout(120, method="thread")
OPERATOR = b"operator-secret-ratelog-test"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)
SUPPRESSED = re.compile(r"suppressed (\d+) (?:similar|more) lines")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog, since=0):
    return [r.getMessage() for r in caplog.records[since:] if r.name == "byzsgd.test.ratelog"]


def _held(lines) -> int:
    return sum(int(m.group(1)) for m in map(SUPPRESSED.search, lines) if m)


def test_one_key_flood_costs_burst_plus_one_line_per_interval(caplog):
    clock = Clock()
    rl = RateLog(logging.getLogger("byzsgd.test.ratelog"), "rank 0: ", interval=10, burst=3, clock=clock)
    per_interval = []
    with caplog.at_level(logging.INFO, logger="byzsgd.test.ratelog"):
        for _ in range(10):  # 10 intervals of 1,280 refusals each from one address
            n0 = len(caplog.records)
            for _ in range(1280):
                rl.warning("10.0.0.9", "preauth_evicted", "closing connection from %s", "10.0.0.9")
                clock.t += 1 / 128  # (exact in binary: the intervals do not drift)
            per_interval.append(len(_lines(caplog, n0)))
        rl.flush()
    lines = _lines(caplog)
    assert per_interval == [3] + [4] * 9, per_interval  # the first interval's count comes with the next
    # exact accounting: every event was written or counted in a "suppressed N" line
    written = sum(1 for m in lines if not SUPPRESSED.search(m))
    assert written + _held(lines) == 12_800 == written + rl.suppressed
    assert lines.count("rank 0: suppressed 1277 similar lines (preauth_evicted) from 10.0.0.9 in the last 10 s") == 10
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_many_addresses_cost_a_bounded_number_of_lines(caplog):
    """4,096 source addresses: at most max_lines + 1 lines per interval, memory max_keys."""
    clock = Clock()
    rl = RateLog(logging.getLogger("byzsgd.test.ratelog"), interval=10, burst=2, max_lines=20, max_keys=256,
                 clock=clock)
    per_interval = []
    with caplog.at_level(logging.INFO, logger="byzsgd.test.ratelog"):
        for i in range(4):
            n0 = len(caplog.records)
            for a in range(4096):
                for _ in range(4):
                    rl.info(f"10.1.{a // 256}.{a % 256}", "handshake_timeout", "closing %d", a)
                clock.t += 10 / 4096  # (exact in binary)
            per_interval.append(len(_lines(caplog, n0)))
            assert len(rl._keys) <= 256
        rl.flush()
    assert max(per_interval) <= 20 + 1, per_interval
    lines = _lines(caplog)
    written = sum(1 for m in lines if not SUPPRESSED.search(m))
    assert written + _held(lines) == 4 * 4096 * 4 == written + rl.suppressed
    assert any("more lines from" in m for m in lines)


def test_a_quiet_key_logs_every_line_and_a_new_interval_starts_fresh(caplog):
    clock = Clock()
    rl = RateLog(logging.getLogger("byzsgd.test.ratelog"), interval=10, burst=2, clock=clock)
    with caplog.at_level(logging.INFO, logger="byzsgd.test.ratelog"):
        assert rl.info("rank 3", "connected", "a") and rl.info("rank 3", "connected", "b")
        assert not rl.info("rank 3", "connected", "c")
        assert rl.info("rank 4", "connected", "other key")
        clock.t += 10
        assert rl.info("rank 3", "connected", "d")  # the summary goes first
    assert _lines(caplog) == ["a", "b", "other key",
                              "suppressed 1 similar lines (connected) from rank 3 in the last 10 s", "d"]
    with pytest.raises(ValueError):
        RateLog(logging.getLogger("x"), interval=0)


def test_refused_connections_and_member_reconnects_do_not_grow_the_log(caplog):
    """300 outsiders refused (wrong deployment) and a member reconnecting 100 times: a few lines
    each, then one count per interval.  Before: 300 WARNING lines, and 100 INFO lines."""
    async def main():
        d = PeerDirectory.local(1, 1)
        n0 = Node(0, "ps", derive(OPERATOR, 0, 2), directory=d, limits=LIM, listen_host="127.0.0.1")
        n0.mailbox("m")
        await n0.start()
        outsider = derive(b"not this deployment's secret", 1, 2)
        member = derive(OPERATOR, 1, 2)
        try:
            for _ in range(300):
                p = await RawPeer.connect("127.0.0.1", n0.port)
                assert (await p.handshake(outsider, 1, 0, 1)) == {"err": "deployment"}
                assert await p.closed_by_peer(5)
                await p.close()
            for _ in range(100):
                p = await RawPeer.connect("127.0.0.1", n0.port)
                assert (await p.handshake(member, 1, 0, 1)) == {"ok": True}
                await p.close()
                if (conn := n0.connection(1)) is not None:
                    await asyncio.wait_for(conn.wait_closed(), 5)
            assert n0.stats.rejected["deployment"] == 300 and n0.stats.connects == 100
            n0._rlog.clock = lambda: 1e9  # the interval is over: the counts come out
            p = await RawPeer.connect("127.0.0.1", n0.port)
            await p.handshake(outsider, 1, 0, 1)
            await p.close()
        finally:
            await n0.close()

    with caplog.at_level(logging.INFO, logger="byzsgd.net"):
        run(main())
    msgs = [r.getMessage() for r in caplog.records if r.name == "byzsgd.net"]
    refused = [m for m in msgs if "deployment" in m and "closing connection from" in m]
    connected = [m for m in msgs if "connected to rank 1" in m]
    assert 1 <= len(refused) <= 4 and 1 <= len(connected) <= 3, (len(refused), len(connected))
    assert ("rank 0: suppressed 297 similar lines (closing connection: deployment) from 127.0.0.1 "
            "in the last 10 s") in msgs, msgs[-5:]
    assert "rank 0: suppressed 97 similar lines (connected) from rank 1 in the last 10 s" in msgs, msgs[-5:]
    assert len(msgs) < 30, len(msgs)
