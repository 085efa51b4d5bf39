"""The adversarial schedule (test harness): a PS's gradient intake ordered as the network
adversary would, and the Byzantine worker that forges from its leaks -- real nodes over TCP
on loopback (1 PS, 4 workers, q_w = 3).

Why these tests: the scheduled deployment's claims (the Byzantine workers are in every quorum,
they know exactly its honest gradients, a silent one cannot stall the PS, the state stays
bounded, and the momentum-aware attacker puts exactly its forged row into the PS's momentum)
each rest on one mechanism checked here by hand."""
from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest
import torch

from byzsgd import attacks
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.gars.worker_momentum import WorkerMomentum
from byzsgd.net import FrameLimits, Mailbox, Message, Node, PeerDirectory, run
from byzsgd.roles.adversary_schedule import AdversarySchedule, gradient_intake
from byzsgd.roles.byzantine import WorkerAttack
from byzsgd.roles.messages import KIND_GRAD, KIND_LEAK, SENDERS
from byzsgd.roles.scheduled_attacker import ScheduledAttacker

pytestmark = pytest.mark.timeout(120, method="thread")
SECRET = b"0123456789abcdef-schedule-secret"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20, max_tensors=4)
D = 6


class Inbox:
    """Every message of one kind a node receives, in arrival order; wait for the n-th."""

    def __init__(self) -> None:
        self.messages: list = []
        self.cond = asyncio.Condition()

    async def deliver(self, msg) -> None:
        self.messages.append(msg)
        async with self.cond:
            self.cond.notify_all()

    async def wait(self, n: int, timeout: float = 10.0) -> list:
        async with self.cond:
            await asyncio.wait_for(self.cond.wait_for(lambda: len(self.messages) >= n), timeout)
        return self.messages


def cfg(**kw) -> RunConfig:
    base = dict(num_ps=1, num_workers=4, fw=1, rank=0, scheduled_byzantine="4", insecure_shared_secret=True)
    base.update(kw)
    return RunConfig(**base)


@contextlib.asynccontextmanager
async def cluster(ps_cfg: RunConfig, *, leak_ranks=(4,), attacker=None):
    """Nodes 0 (the PS, its intake from ``gradient_intake``) and 1-4 (workers); the ranks in
    ``leak_ranks`` keep their leaks in an Inbox; ``attacker(node)`` builds rank 4's side."""
    d = PeerDirectory.local(1, 4)
    nodes = [Node(r, d.role(r), SECRET, directory=d, limits=LIM, listen_host="127.0.0.1")
             for r in range(5)]
    box = gradient_intake(nodes[0], ps_cfg, KIND_GRAD, window=ps_cfg.step_window, shapes=[(D,)])
    inboxes = {}
    extra = attacker(nodes[4]) if attacker is not None else None
    for r in leak_ranks:
        if extra is None or r != 4:
            inboxes[r] = Inbox()
            nodes[r].on(KIND_LEAK, inboxes[r].deliver, shapes=[(D,)], senders="ps")
    try:
        for n in nodes:
            await n.start()
        for n in nodes:
            want = {0} if n.rank else set(range(1, 5))
            assert await n.wait_connected(want, 10) == want
        yield nodes, box, inboxes, extra
    finally:
        for n in nodes:
            await n.close()


def grad(rank: int, step: int) -> torch.Tensor:
    return torch.full((D,), float(100 * step + rank))


def test_flag_is_checked_and_refused_where_it_cannot_work():
    assert cfg().scheduled_ranks == [4]
    assert cfg(scheduled_byzantine="4, 3").scheduled_ranks == [3, 4]
    for bad in ("0", "5", "3,3", "", "x", "2,3,4,1"):  # a PS, out of range, twice, empty, text, > q_w
        with pytest.raises(ConfigError, match="scheduled_byzantine"):
            cfg(scheduled_byzantine=bad)
    with pytest.raises(ConfigError, match="garfield"):
        cfg(mode="paper", num_ps=4, fps=1, scheduled_byzantine="7")
    with pytest.raises(ConfigError, match="no --attack"):
        cfg(rank=4)
    cfg(rank=4, attack="minmax")  # a listed worker that attacks
    assert cfg(scheduled_byzantine=None).scheduled_ranks == []


class FakeNode:
    """What the schedule uses of a node: ``broadcast`` (the leaks), recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def broadcast(self, ranks, kind, step, tensors, meta=None):
        self.sent.append((list(ranks), kind, step, [t.clone() for t in tensors], dict(meta or {})))
        return []


def msg(sender: int, step: int) -> Message:
    """A received gradient as the node hands it over (owning a pooled buffer until released)."""
    return Message(KIND_GRAD, step, sender, [grad(sender, step)], {"loss": 0.5},
                   _buffer=bytearray(1), _release_to=lambda buf: None)


def test_hold_leak_and_release_in_arrival_order():
    async def main():
        node, box = FakeNode(), Mailbox(KIND_GRAD, window=8)
        sched = AdversarySchedule(node, box, [3, 4], deadline=60.0)
        for w in (2, 1):  # the correct workers first: held and leaked, in arrival order
            assert sched.deliver(msg(w, 0))
        assert sched.deliver(msg(3, 0))  # one Byzantine of two: still held
        assert box.pending(0).keys() == {3} and sched.holding == 2
        assert [(r, k, s, m) for r, k, s, _, m in node.sent] == [([3, 4], KIND_LEAK, 0, {"worker": 2}),
                                                                  ([3, 4], KIND_LEAK, 0, {"worker": 1})]
        assert torch.equal(node.sent[0][3][0], grad(2, 0)) and torch.equal(node.sent[1][3][0], grad(1, 0))
        assert not sched.deliver(msg(2, 0)) and sched.copies == 1  # a re-sent answer: dropped
        sched.deliver(msg(4, 0))  # the last Byzantine rank: released after it, in arrival order
        assert list(box.pending(0)) == [3, 4, 2, 1] and sched.holding == 0 and sched.complete == 1
        sched.deliver(msg(5, 0))  # the step is open: straight through, not leaked
        assert list(box.pending(0))[-1] == 5 and len(node.sent) == 2
        got = await box.collect(0, 3)
        assert list(got) == [3, 4, 2]
        # the Byzantine ranks first: nothing is ever held
        for w in (4, 3, 1):
            sched.deliver(msg(w, 1))
        assert list(box.pending(1)) == [4, 3, 1] and len(node.sent) == 2 and sched.held == 2
    run(main())


def test_deadline_releases_what_a_silent_byzantine_worker_would_hold():
    async def main():
        node, box = FakeNode(), Mailbox(KIND_GRAD, window=8)
        sched = AdversarySchedule(node, box, [4], deadline=0.3)
        started = time.monotonic()
        for w in (1, 3, 2):
            sched.deliver(msg(w, 0))
        got = await box.collect(0, 3, timeout=10)
        assert time.monotonic() - started >= 0.3 * 0.95
        assert list(got) == [1, 3, 2] and sched.expired == 1 and sched.steps_tracked == 0
        assert not sched.deliver(msg(4, 0))  # the late Byzantine gradient: stale, dropped
    run(main())


def test_state_is_bounded_and_old_steps_released():
    async def main():
        node, box = FakeNode(), Mailbox(KIND_GRAD, window=4)
        sched = AdversarySchedule(node, box, [4], deadline=60.0)
        held = []
        for s in range(40):  # the PS jumps ahead each step, the Byzantine worker never answers
            box.advance(s)
            held += [msg(1, s), msg(2, s)]
            sched.deliver(held[-2])
            sched.deliver(held[-1])
            assert sched.steps_tracked == 1 and sched.holding == 2, s
        assert all(m.released for m in held[:-2]) and not any(m.released for m in held[-2:])
        far = msg(3, box.floor + box.window)  # beyond the window: refused, never held nor leaked
        assert not sched.deliver(far) and sched.holding == 2 and len(node.sent) == 80
        sched.close()
        assert sched.holding == 0 and all(m.released for m in held)
    run(main())


def test_leaks_travel_to_the_byzantine_workers_and_the_quorum_is_theirs():
    """Over TCP: the leak frames' contents and order, and the quorum they announce."""
    async def main():
        async with cluster(cfg(scheduled_byzantine="3,4"), leak_ranks=(3, 4)) as (nodes, box, inboxes, _):
            for i, w in enumerate((2, 1)):
                nodes[w].send(0, KIND_GRAD, 0, [grad(w, 0)], {"loss": 0.5})
                await inboxes[4].wait(i + 1)
            await inboxes[3].wait(2)
            for r in (3, 4):
                assert [(m.kind, m.step, m.sender, m.meta) for m in inboxes[r].messages] == \
                    [(KIND_LEAK, 0, 0, {"worker": 2}), (KIND_LEAK, 0, 0, {"worker": 1})]
                assert all(torch.equal(m.tensors[0], grad(w, 0)) for m, w in zip(inboxes[r].messages, (2, 1)))
            assert len(box) == 0 and box.schedule.holding == 2
            nodes[4].send(0, KIND_GRAD, 0, [grad(4, 0)], {})
            nodes[3].send(0, KIND_GRAD, 0, [grad(3, 0)], {})
            got = await box.collect(0, 3, timeout=10)
            assert sorted(list(got)[:2]) == [3, 4] and list(got)[2] == 2
            assert all(torch.equal(m.tensors[0], grad(w, 0)) for w, m in got.items())
    run(main())


class _Replica:
    """What the attacker uses of a worker replica: its gradient of a step (no model here)."""

    grad_size = D
    buffer_size = 0
    device = torch.device("cpu")

    def gradient_at(self, state, step):
        return grad(4, step) + 0.25 * torch.arange(D, dtype=torch.float32), None, 0.5


def _attacker(worker_cfg: RunConfig):
    def build(node: Node) -> ScheduledAttacker:
        replica = _Replica()
        worker = SimpleNamespace(cfg=worker_cfg, node=node, replica=replica, served=0,
                                 behaviour=WorkerAttack(worker_cfg, replica),
                                 accept=lambda kind, h, shapes: node.on(kind, h, shapes=shapes,
                                                                        senders=SENDERS[kind]))
        return ScheduledAttacker(worker)
    return build


@pytest.mark.parametrize("momentum_aware", [False, True])
def test_attacker_forges_from_the_quorums_honest_gradients(momentum_aware):
    """The Byzantine gradient is in every quorum; without momentum it is the attack's row on
    [own, the quorum's honest gradients]; momentum-aware, the PS's own momentum row of the
    attacker (computed by the PS's WorkerMomentum from what it received) is the attack's row on
    the quorum's honest momentum rows."""
    beta = 0.9
    common = dict(worker_momentum=beta if momentum_aware else 0.0)
    ps_cfg = cfg(**common)
    w_cfg = cfg(rank=4, attack="minmax", attack_args={"momentum_aware": momentum_aware}, **common)
    gen = torch.Generator().manual_seed(3)

    async def main():
        async with cluster(ps_cfg, attacker=_attacker(w_cfg)) as (nodes, box, _, attacker):
            wm = WorkerMomentum(beta, D, [1, 2, 3, 4])
            for t in range(12):
                task = asyncio.create_task(attacker.answer(0, t, torch.zeros(1)))
                honest = {w: torch.randn(D, generator=gen) for w in (1, 2, 3)}
                for w in torch.randperm(3, generator=gen).tolist():
                    nodes[w + 1].send(0, KIND_GRAD, t, [honest[w + 1]], {"loss": 0.1})
                got = await box.collect(t, 3, timeout=10)
                await task
                assert list(got)[0] == 4 and len(got) == 3
                rows = {r: m.tensors[0].clone() for r, m in got.items()}
                quorum = sorted(r for r in rows if r != 4)
                params = attacker.behaviour.step_params(t)
                if momentum_aware:
                    wm.heavy_ball_rows(rows)
                    mom = wm.momenta / (1 - beta)
                    target = attacks.forge("minmax", mom[[r - 1 for r in quorum]], 1, **params)[0]
                    assert torch.allclose(mom[3], target, rtol=1e-4, atol=1e-5), t
                else:
                    own = _Replica().gradient_at(None, t)[0]
                    known = torch.stack([own] + [rows[r] for r in got if r != 4])
                    assert torch.allclose(rows[4], attacks.forge("minmax", known, 1, **params)[0])
                for m in got.values():
                    m.release()
            assert attacker.short == 0 and attacker.worker.served == 12
            assert attacker.leaks_kept <= 12  # answered steps are forgotten; at most a late leak each
    run(main())


def test_byzantine_worker_keeps_its_leaks_bounded():
    async def main():
        w_cfg = cfg(rank=4, attack="minmax")
        window = w_cfg.step_window
        async with cluster(cfg(resend_after=60.0), attacker=_attacker(w_cfg)) as (nodes, box, _, attacker):
            # a PS leaks for many steps nobody asks (it jumps ahead): the attacker keeps
            # step_window steps at most, one leak per correct rank and step
            last = 3 * window
            for s in range(last + 1):
                box.advance(s)
                nodes[1].send(0, KIND_GRAD, s, [grad(1, s)], {})
            nodes[2].send(0, KIND_GRAD, last, [grad(2, last)], {})
            entry = attacker._entry(0, last)
            await asyncio.wait_for(entry.ready.wait(), 10)  # both leaks of the last step are in
            assert len(attacker._leaks[0]) <= window and attacker.leaks_kept <= window + 1
            # the last step's two leaks complete it: the answer does not wait, the quorum is its
            await asyncio.wait_for(attacker.answer(0, last, torch.zeros(1)), 10)
            got = await box.collect(last, 3, timeout=10)
            assert list(got)[0] == 4 and sorted(got) == [1, 2, 4] and attacker.short == 0
            assert attacker.leaks_kept == 0  # answered: forgotten
    run(main())


def test_flag_round_trips_and_the_launcher_sets_it_on_every_node():
    from byzsgd.deploy.options import LaunchConfig

    c = cfg(rank=4, attack="minmax", scheduled_byzantine="3,4")
    assert RunConfig.from_argv(c.to_argv()) == c
    lc = LaunchConfig.from_argv(["--fw", "2", "--byz_workers", "2", "--worker_attack", "minmax",
                                 "--schedule", "adversarial"]).validate()
    assert {lc.node_config(r).scheduled_byzantine for r in range(11)} == {"9,10"}
    assert LaunchConfig.from_argv(["--byz_workers", "1", "--worker_attack", "minmax"]).node_config(0) \
        .scheduled_byzantine is None
    for argv, needle in ((["--schedule", "adversarial"], "byz_workers"),
                         (["--byz_workers", "1", "--worker_attack", "request_flood", "--schedule",
                           "adversarial"], "protocol attack"),
                         (["--byz_workers", "1", "--worker_attack", "minmax", "--scheduled_byzantine", "10"],
                          "--schedule adversarial"),
                         (["--mode", "paper", "--byz_workers", "1", "--worker_attack", "minmax", "--schedule",
                           "adversarial"], "garfield")):
        with pytest.raises(ConfigError, match=needle):
            LaunchConfig.from_argv(argv).validate()


def test_a_banned_byzantine_worker_is_not_waited_for():
    """A worker the PS banned (--check_gradients) is asked no more: waiting for it would cost
    every step the deadline (measured: 2.1 s a step before the schedule knew of bans)."""
    async def main():
        node, box = FakeNode(), Mailbox(KIND_GRAD, window=8)
        banned: set[int] = {4}
        sched = AdversarySchedule(node, box, [3, 4], deadline=60.0, excluded=lambda: banned)
        sched.deliver(msg(1, 0))  # held for 3 only, leaked to 3 only
        assert sched.holding == 1 and [r for r, *_ in node.sent] == [[3]]
        sched.deliver(msg(3, 0))
        assert list(box.pending(0)) == [3, 1] and sched.complete == 1
        sched.deliver(msg(1, 1))
        banned.add(3)  # 3 caught meanwhile: the next delivery releases what waited for it
        sched.deliver(msg(2, 1))
        assert list(box.pending(1)) == [1, 2] and sched.holding == 0 and len(node.sent) == 2
        for w in (1, 2, 5):  # every listed rank banned: nothing is held or leaked any more
            sched.deliver(msg(w, 2))
        assert list(box.pending(2)) == [1, 2, 5] and sched.held == 2 and len(node.sent) == 2
    run(main())


def test_share_counts_the_steps_with_an_eligible_byzantine_worker():
    from byzsgd.roles.adversary_schedule import byzantine_in_quorums

    records = [{"event": "start"},
               {"step": 0, "quorum": [4, 5, 9, 10]},                   # both in: hit
               {"step": 1, "quorum": [4, 5, 6, 9]},                    # 10 missing: miss
               {"event": "banned", "step": 2, "worker": 10},
               {"step": 2, "quorum": [4, 9, 10, 6], "banned": [10]},   # both in: hit, then 10 out
               {"step": 3, "quorum": [4, 5, 6, 9]},                    # 9 alone eligible: hit
               {"step": 4, "quorum": [4, 5, 6, 7], "banned": [9]},     # 9 missing: miss
               {"step": 5, "quorum": [4, 5, 6, 7]},                    # nobody eligible: not counted
               {"step": 5, "accuracy": 90.0}]
    assert byzantine_in_quorums(records, {9, 10}) == (3, 5)
