"""Issue 24 (5): the rendezvous master does not amplify re-registrations.

A member re-registering 2,000 times between two addresses made the master send 10,000
directory frames (world - 1 per registration).  Registrations are now coalesced and a rank's
address changes rate-limited (byzsgd/net/rendezvous.py), without delaying a legitimate restart."""
import asyncio
import collections
import logging
import math
from types import SimpleNamespace

import pytest

from byzsgd.net import FrameLimits, Node, run
from byzsgd.net import rendezvous as rdv
from byzsgd.net.peers import PeerDirectory, free_ports, role_of
from byzsgd.net.ratelog import RateLog

pytestmark = pytest.mark.timeout(120, method="thread")
SECRET = b"rendezvous-amplification-secret"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)


async def _until(cond, timeout: float, what: str) -> float:
    """Wait for ``cond()`` (checked every 10 ms) at most ``timeout`` s; the time it took."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < timeout, what
        await asyncio.sleep(0.01)
    return loop.time() - t0


def test_re_registration_flood_sends_a_bounded_number_of_directories():
    async def main():
        world, num_ps = 6, 2
        (mport,) = free_ports(1)
        master_addr = ("127.0.0.1", mport)

        def node(r):
            n = Node(r, role_of(r, num_ps), SECRET, master=master_addr, world_size=world, num_ps=num_ps,
                     limits=LIM, listen_host="127.0.0.1")
            n.mailbox("m")
            return n
        nodes = [node(r) for r in range(world)]
        try:
            await asyncio.wait_for(asyncio.gather(*(n.start(timeout=20) for n in nodes)), 30)
            master, member = nodes[0], nodes[5]
            sent = collections.Counter()

            def counting(rank, kind, step, tensors=(), meta=None):
                sent[kind] += 1
                return proceed(rank, kind, step, tensors, meta)
            proceed = master.add_send_filter(counting)
            real = ("127.0.0.1", member.port)
            other = ("127.0.0.1", free_ports(1)[0])
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            got0 = master.stats.frames_received
            restarted = None
            for i in range(2000):
                host, port = (other, real)[i % 2]
                assert await member.send(0, rdv.REG, 0, meta={"host": host, "port": port})
                if i == 1000:  # meanwhile rank 4 restarts on a new port: it must not wait for the flood
                    await nodes[4].close()
                    nodes[4] = restarted = node(4)
                    t_restart = loop.time()
                    await restarted.start(timeout=10)
                    new4 = ("127.0.0.1", restarted.port)
                    lag = await _until(lambda: all(n.directory[4] == new4 for n in nodes[1:4]), 2,
                                       "the restart did not reach everyone")
                    print(f"restart: start() {loop.time() - t_restart - lag:.3f} s, everyone knew "
                          f"{lag:.3f} s later")
            await _until(lambda: master.stats.frames_received >= got0 + 2000, 10, "the master got the flood")
            flood_s = loop.time() - t0
            # the last registration (the real address) reaches everyone once the rate allows
            await _until(lambda: all(n.directory[5] == real for n in nodes[1:5]), rdv.CHANGE_EVERY_S + 2,
                         "the member's last address did not converge")
            await _until(lambda: master._rdv._timer is None, rdv.CHANGE_EVERY_S + 2, "a send is still pending")
            assert await restarted.wait_connected(set(range(world)) - {4}, 10) == set(range(world)) - {4}
            frames = sent[rdv.DIR]
            total_s = loop.time() - t0
            # broadcasts: a burst, then one per CHANGE_EVERY_S for the member, one for rank 4's
            # restart; replies to the registrants: at most one per COALESCE_S
            bound = ((world - 1) * (rdv.CHANGE_BURST + math.ceil(total_s / rdv.CHANGE_EVERY_S) + 2)
                     + math.ceil(total_s / rdv.COALESCE_S) + 2)
            print(f"2,000 re-registrations in {flood_s:.2f} s: {frames} directory frames (bound {bound}; "
                  f"before: {2000 * (world - 1)})")
            assert frames <= bound, (frames, bound)
            assert frames < 2000 * (world - 1) / 20
        finally:
            for n in nodes:
                await n.close()
    run(main())


class _Timer:
    def __init__(self, at, fn):
        self.at, self.fn, self.cancelled = at, fn, False

    def cancel(self):
        self.cancelled = True


class _FakeMaster:
    """What Rendezvous uses of a Node, on a fake clock (no loop, no sockets)."""
    rank, world_size, num_ps, closing = 0, 4, 1, False

    def __init__(self):
        self.t = 0.0
        self.timers: list[_Timer] = []
        self.loop = self
        self.directory = PeerDirectory({r: ("h", 1000 + r) for r in range(4)}, 1)
        self.rlog = RateLog(logging.getLogger("byzsgd.test.rdv"))
        self.stats = SimpleNamespace(rejected=collections.Counter())
        self.sends: list[tuple[float, int]] = []

    def time(self):
        return self.t

    def call_at(self, at, fn):
        self.timers.append(_Timer(at, fn))
        return self.timers[-1]

    def advance(self, to):
        while True:
            due = [h for h in self.timers if h.at <= to and not h.cancelled]
            if not due:
                break
            h = min(due, key=lambda h: h.at)
            self.timers.remove(h)
            self.t = h.at
            h.fn()
        self.t = to

    def set_directory(self, d):
        self.directory = d

    def send(self, r, kind, step, tensors=(), meta=None):
        self.sends.append((self.t, r))


def _reg(sender, port):
    return SimpleNamespace(sender=sender, meta={"host": "h", "port": port}, release=lambda: None)


def test_restarts_are_broadcast_within_the_window_and_a_flapping_rank_is_held_back():
    """Fake clock: a reconnect (same address) is answered to the registrant only; restarts
    within COALESCE_S share one broadcast, sent COALESCE_S after the first; a rank flapping 40
    times in 0.4 s gets a burst, then one broadcast per CHANGE_EVERY_S, and the newest address."""
    m = _FakeMaster()
    r = rdv.Rendezvous(m, set_directory=m.set_directory, rlog=m.rlog)
    r.directory = m.directory
    r.addrs = dict(m.directory.items())
    r.done = SimpleNamespace(done=lambda: True)
    r._on_reg(_reg(2, 1002))
    m.advance(1.0)
    assert m.sends == [(rdv.COALESCE_S, 2)]
    m.sends.clear()
    m.t = 10.0
    r._on_reg(_reg(3, 2003))
    m.t = 10.02
    r._on_reg(_reg(2, 2002))
    m.advance(11.0)
    assert m.sends == [(10.0 + rdv.COALESCE_S, k) for k in (1, 2, 3)]
    assert m.directory[3] == ("h", 2003) and m.directory[2] == ("h", 2002)
    m.sends.clear()
    for i in range(40):
        m.advance(20.0 + i * 0.01)
        r._on_reg(_reg(3, 3000 + i % 2))
    m.advance(30.0)
    broadcasts = [t for t, k in m.sends if k == 1]
    assert len(broadcasts) <= rdv.CHANGE_BURST + 1, broadcasts
    assert broadcasts[-1] - 20.0 <= 0.4 + rdv.CHANGE_EVERY_S + rdv.COALESCE_S  # the last change got out
    assert len([t for t, k in m.sends if k == 3]) <= 0.4 / rdv.COALESCE_S + 2  # answered, coalesced
    assert m.directory[3] == ("h", 3001)
    assert not [h for h in m.timers if not h.cancelled]
