"""Issue 13, role-level defences: who may send what, requests answered once and fairly,
far-future models, re-asks, the sync worker's clock, and the drain at close.

Role classes are driven directly with a recording node (no network); the node rules run on
real loopback nodes."""
from __future__ import annotations

import asyncio

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.net import FrameLimits, Message, NewestModels, Node, PeerDirectory

pytestmark = pytest.mark.timeout(180, method="thread")
SYNTH = "synthetic:1x28x28:10:64:64"
SECRET = b"0123456789abcdef-test-secret"


class RecordingNode:
    def __init__(self):
        self.sent = []

    def broadcast(self, ranks, kind, step, tensors=(), meta=None):
        for r in ranks:
            self.send(r, kind, step, tensors, meta)

    def send(self, rank, kind, step, tensors=(), meta=None):
        self.sent.append((rank, kind, step))


def cfg(**kw) -> RunConfig:
    base = dict(num_ps=4, fps=1, num_workers=7, fw=1, dataset=SYNTH, resend_after=0.05)
    base.update(kw)
    return RunConfig(insecure_shared_secret=True, **base)


def request(sender: int, step: int, size: int = 3, kind: str = "model") -> Message:
    return Message(kind=kind, step=step, sender=sender, tensors=[torch.zeros(size)], meta={})


# ---------------------------------------------------------------------------- who may send what
def test_each_kind_only_from_its_role_on_real_nodes():
    async def main():
        d = PeerDirectory.local(1, 2)
        lim = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20, max_tensors=4)
        nodes = [Node(r, d.role(r), SECRET, directory=d, limits=lim, listen_host="127.0.0.1") for r in range(3)]
        got = []
        nodes[1].on("done", got.append, shapes=[], senders="ps")
        nodes[1].on("grad", got.append, shapes=[], senders="worker")
        for n in (nodes[0], nodes[2]):
            n.on("done", lambda m: None, shapes=[])
            n.on("grad", lambda m: None, shapes=[])
        try:
            for n in nodes:
                await n.start()
            for n in nodes:
                assert await n.wait_connected(set(d) - {n.rank}, 10) == set(d) - {n.rank}
            nodes[2].send(1, "done", 7)  # a worker saying "done": refused
            nodes[0].send(1, "grad", 7)  # a PS sending a gradient: refused
            nodes[0].send(1, "done", 8)
            nodes[2].send(1, "grad", 9)
            for _ in range(200):
                if len(got) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted((m.kind, m.sender, m.step) for m in got) == [("done", 0, 8), ("grad", 2, 9)]
            assert nodes[1].stats.refused == {"sender:done": 1, "sender:grad": 1}
            assert 1 in nodes[2].connected  # refusing a kind does not cost the connection
        finally:
            for n in nodes:
                await n.close()
    asyncio.run(main())


def test_roles_register_every_kind_with_its_senders():
    from byzsgd.roles.messages import SENDERS
    from byzsgd.roles.nodes import ParameterServer
    from byzsgd.roles.nodes import Worker

    for extra in (dict(), dict(mode="paper"), dict(mode="paper", sync=True)):
        for role in (ParameterServer(cfg(rank=0, **extra)), Worker(cfg(rank=5, **extra))):
            kinds = set(role.node._handlers) - {k for k in role.node._handlers if k.startswith("__")}
            assert kinds and all(role.node._senders[k] == SENDERS[k] for k in kinds), kinds


def test_done_counts_only_from_ps_ranks_once_each():
    from byzsgd.roles.departure import Departure
    from byzsgd.roles.nodes import ParameterServer

    async def main():
        d = Departure(num_ps=2, q_ps=1, linger=60)
        for sender in (5, 6, 0, 0):  # workers 5, 6 are no PS; PS 0 twice counts once
            d.deliver(Message(kind="done", step=0, sender=sender, tensors=[], meta={}))
        assert d.done_from == {0} and not d.all_done
        ps = ParameterServer(cfg(rank=0))
        for sender in (5, 1, 1):
            ps._on_peer_done(Message(kind="done", step=0, sender=sender, tensors=[], meta={}))
        assert ps.peers_done == {1} and not ps.all_peers_done.is_set()
        # all peers but fps = 1 done: the correct ones are (a crashed one never says so)
        ps._on_peer_done(Message(kind="done", step=0, sender=2, tensors=[], meta={}))
        assert ps.peers_done == {1, 2} and ps.all_peers_done.is_set()
    asyncio.run(main())


# ---------------------------------------------------------------------------- worker requests
def _garfield_worker():
    from byzsgd.roles.nodes import Worker

    w = Worker(cfg(rank=5))
    w.node = RecordingNode()
    w.answers = []
    return w


def test_worker_answers_each_request_once_and_only_increasing_steps():
    async def main():
        w = _garfield_worker()
        w._answer_steps = lambda steps, batch_step, state: w.answers.append(dict(steps))
        w.departure.done_from = {0, 1, 2, 3}  # leave once nothing is pending
        for _ in range(5):
            w._on_request(request(0, 0))  # copies of one request
        await w._steps()
        for step in (0, 0, 3, 2, 3):  # copies, a replay, an older step
            w._on_request(request(0, step))
        await w._steps()
        assert w.answers == [{0: 0}, {0: 3}]
        w.answered[0] = (3, 0.0, False)  # long ago: the PS's re-send is answered once more
        w._on_request(request(0, 3))
        w._on_request(request(0, 3))
        await w._steps()
        assert w.answers[2:] == [{0: 3}] and w.refused >= 7
    asyncio.run(main())


def test_a_flooding_ps_gets_at_most_its_fair_share():
    """PS 3 re-sends step-0 requests (and fresh steps) between every answer; PSes 0-2 ask
    for their next step as soon as the previous is answered.  Round-robin: PS 3 gets at most
    one answer in four, and its step-0 copies one answer in all."""
    async def main():
        w = _garfield_worker()
        served = []
        byz_step = [0]

        def answer(steps, batch_step, state):
            (ps, step), = steps.items()
            served.append((ps, step))
            if len(served) >= 40:
                w.departure.done_from = {0, 1, 2, 3}
                return
            if ps != 3:  # a correct PS steps and asks again
                w._on_request(request(ps, step + 1))
            for _ in range(3):  # the flood: copies of step 0 and a new step each time
                w._on_request(request(3, 0))
            byz_step[0] += 1
            w._on_request(request(3, byz_step[0]))

        w._answer_steps = answer
        for ps in range(4):
            w._on_request(request(ps, 0))
        await asyncio.wait_for(w._steps(), 30)
        counts = {ps: sum(1 for p, _ in served if p == ps) for ps in range(4)}
        assert counts[3] <= len(served) // 4 + 1, counts
        assert all(counts[ps] >= len(served) // 4 - 1 for ps in range(3)), counts
        assert sum(1 for p, s in served if p == 3 and s == 0) <= 1  # its copies: never again
        for ps in range(3):  # correct PSes are answered step after step, none skipped
            assert [s for p, s in served if p == ps] == list(range(counts[ps]))
    asyncio.run(main())


def test_paper_worker_replays_its_gradient_to_a_ps_behind_once_per_step():
    from byzsgd.roles.nodes import Worker

    w = Worker(cfg(rank=5, mode="paper"))
    w.node = RecordingNode()
    w.step = 10
    w.last_sent = ([torch.zeros(3)], {"loss": 1.0})
    for step in (4, 4, 4, 3, 6, 6):  # a PS behind (or a liar) re-sending old steps
        w._on_model(request(0, step, w.replica.state_size))
    assert w.node.sent == [(0, "grad", 4), (0, "grad", 6)]


# ---------------------------------------------------------------------------- gathers
def test_a_far_future_model_takes_no_seat_unless_more_than_f_peers_are_there():
    async def main():
        nm = NewestModels("ps_model", [1, 2, 3], window=8, f=1)
        nm.deliver(request(1, 10**12, kind="ps_model"))  # the liar: far ahead
        nm.deliver(request(2, 0, kind="ps_model"))
        assert not nm.ready(2, 0) and not nm.ready(1, 1) and nm.far(0) == [1]
        with pytest.raises(Exception):
            await nm.collect(2, 0, timeout=0.05)
        nm.deliver(request(3, 1, kind="ps_model"))
        got = await nm.collect(2, 0)
        assert sorted(got) == [2, 3]  # the two correct peers, not the liar first in line
        both = NewestModels("ps_model", [1, 2, 3], window=8, f=1)
        both.deliver(request(1, 500, kind="ps_model"))
        both.deliver(request(2, 400, kind="ps_model"))  # two peers far ahead: one is correct
        assert both.ready(2, 0) and sorted(await both.collect(2, 0)) == [1, 2]
    asyncio.run(main())


def _ps(**kw):
    from byzsgd.roles.nodes import ParameterServer

    ps = ParameterServer(cfg(rank=0, **kw))
    ps.node = RecordingNode()
    return ps


def _model(ps, sender, step):
    return Message(kind="ps_model", step=step, sender=sender,
                   tensors=[ps.replica.state_vector()], meta={})


def test_ps_does_not_skip_work_for_one_far_future_peer():
    ps = _ps()
    ps.models.deliver(_model(ps, 3, 2**61))
    ps.models.deliver(_model(ps, 1, 0))
    assert not ps.models.ready(ps.cfg.q_ps - 1, 1)  # step 0's gradient phase still runs


def test_a_gather_that_took_a_later_model_does_not_wait_for_it_again():
    """The last-step hang: the gather at t takes peer 1's model of t + 1; the gather at t + 1
    must be able to use it again (peer 2 is silent, peer 3 gives one model per step)."""
    async def main():
        ps = _ps()
        own = ps.replica.state_vector()
        ps.models.deliver(_model(ps, 1, 1))
        ps.models.deliver(_model(ps, 3, 0))
        assert await asyncio.wait_for(ps._gather(0, own), 5) == 1
        ps.models.deliver(_model(ps, 3, 1))
        assert await asyncio.wait_for(ps._gather(1, own), 5) == 2
        assert ps.model_quorum == [1, 3]
        ps.models.close()
    asyncio.run(main())


def test_a_ps_that_jumps_publishes_its_model_of_the_step_it_reached():
    """A PS that jumps from t to its peers' step r never computes a model of r itself: it
    sends the model it took to its peers (tagged r), or a peer still gathering at r — at the
    last step, with a crashed PS, say — waits for it forever; and answers asks for r with it."""
    async def main():
        ps = _ps()
        own = ps.replica.state_vector()
        ps.models.deliver(_model(ps, 1, 7))
        ps.models.deliver(_model(ps, 2, 7))
        assert await asyncio.wait_for(ps._gather(2, own, at_least=3), 5) == 8
        assert {(r, "ps_model", 7) for r in (1, 2, 3)} <= set(ps.node.sent)
        ps.node.sent.clear()
        ps._on_ask(Message(kind="ps_ask", step=7, sender=3, tensors=[], meta={}))
        assert ps.node.sent == [(3, "ps_model", 7)]
        ps.models.close()
    asyncio.run(main())


def test_gather_re_asks_silent_peers_and_peers_answer_asks_bounded():
    async def main():
        ps = _ps()
        own = ps.replica.state_vector()
        gather = asyncio.ensure_future(ps._gather(4, own))
        await asyncio.sleep(0.2)  # resend_after = 0.05: the silent peers are asked again
        assert {(r, "ps_ask", 4) for r in (1, 2, 3)} <= set(ps.node.sent)
        assert {(r, "ps_model", 4) for r in (1, 2, 3)} <= set(ps.node.sent)
        ps.models.deliver(_model(ps, 1, 4))
        ps.models.deliver(_model(ps, 2, 5))
        assert await asyncio.wait_for(gather, 5) == 5
        # the other side: a peer asking us
        ps.node.sent.clear()
        ask = lambda sender, step: Message(kind="ps_ask", step=step, sender=sender, tensors=[], meta={})  # noqa: E731
        ps._on_ask(ask(1, 4))
        assert ps.node.sent == [(1, "ps_model", 4)]  # the model we sent for step 4
        for _ in range(5):
            ps._on_ask(ask(2, 9))  # not there yet: nothing (our broadcast will come)
        for _ in range(5):
            ps._on_ask(ask(1, 4))  # a flood of re-asks: ASKS_PER_STEP answers in all
        ps._on_ask(ask(1, 3))  # older than what it asked: ignored
        ps._on_ask(ask(7, 4))  # a worker: not a peer
        from byzsgd.roles.ps_base import ASKS_PER_STEP
        assert ps.node.sent == [(1, "ps_model", 4)] * ASKS_PER_STEP
        ps.models.close()
    asyncio.run(main())


# ---------------------------------------------------------------------------- paper --sync
def test_one_ps_cannot_drive_the_sync_workers_clock():
    from byzsgd.roles.nodes import Worker

    async def main():
        w = Worker(cfg(rank=5, mode="paper", sync=True, pull_timeout=0.05))
        w.node = RecordingNode()
        size = w.replica.state_size
        honest = w.replica.state_vector()
        # every PS that answers answers with step t + 3: none is taken, the clock stays
        w.models.deliver(Message(kind="model", step=13, sender=0, tensors=[honest.clone()], meta={}))
        assert await w._filtered(10) == 10
        assert w.ahead == 1 and w.catch_up and not [s for s in w.node.sent if s[1] == "grad"]
        # the median decides: the Byzantine t + 3 with two PSes at t -> step t
        w.models.deliver(Message(kind="model", step=13, sender=0, tensors=[honest.clone()], meta={}))
        for ps in (1, 2):
            w.models.deliver(Message(kind="model", step=10, sender=ps, tensors=[honest.clone()], meta={}))
        assert await w._step(10) == 11 and not w.catch_up
        assert {(p, "grad", 10) for p in range(4)} <= set(w.node.sent)
        assert size == honest.numel()
        w.models.close()
    asyncio.run(main())


# ---------------------------------------------------------------------------- close drains
def test_close_drains_the_outboxes_first():
    async def main():
        d = PeerDirectory.local(1, 1)
        lim = FrameLimits(max_header_bytes=4096, max_frame_bytes=16 << 20, max_tensors=4)
        a, b = [Node(r, d.role(r), SECRET, directory=d, limits=lim, listen_host="127.0.0.1") for r in range(2)]
        a.on("m", lambda m: None)
        box = b.mailbox("m", window=8)
        try:
            for n in (a, b):
                await n.start()
            assert await a.wait_connected({1}, 10) == {1}
            big = torch.ones(3 << 20)  # 12 MB: more than the kernel takes at once
            fut = a.send(1, "m", 0, [big])
            await a.close(drain_timeout=10)
            assert fut.done() and fut.result() is True
            got = await box.collect(0, 1, timeout=10)
            assert torch.equal(got[0].tensors[0], big)
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())
