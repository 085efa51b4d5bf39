"""Termination (issue 24, finding 2): a correct worker leaves within a stated bound once the
correct PSes are done, whatever a Byzantine PS sends (docs/design.md §3, Liveness).

The rules of :class:`byzsgd.roles.departure.Departure` are driven in-process on a fake clock;
the end-to-end test starts real node processes on loopback through
:func:`byzsgd.deploy.local.start` and watches them itself: no launcher kills a lingering
worker, so a worker that does not leave on its own is seen running.
"""
from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from byzsgd.net import Message
from byzsgd.roles.base import DRAIN_S
from byzsgd.roles.departure import LEAVE_BY_S, LINGER_S, Departure
from tests.test_request_discipline import RecordingNode


def done(sender: int, step: int = 10) -> Message:
    return Message(kind="done", step=step, sender=sender, tensors=[], meta={})


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def departure(**kw) -> tuple[Departure, Clock]:
    clock = Clock()
    args = dict(num_ps=4, q_ps=3, num_iter=10, linger=5.0, leave_by=30.0, clock=clock)
    args.update(kw)
    return Departure(**args), clock


# ---------------------------------------------------------------------------- the rules
def test_never_leaves_before_q_ps_dones_however_long_the_silence():
    d, clock = departure()
    d.deliver(done(0))
    d.deliver(done(1))
    clock.now += 10_000
    assert d.due() is None and not d.leaving()
    d.deliver(done(1))  # the same PS again counts once
    assert d.due() is None and d.done_from == {0, 1}
    d.deliver(done(2))  # q_ps = 3: the end begins now
    assert d.due() == clock.now + 5.0
    clock.now += 4.9
    assert not d.leaving()
    clock.now += 0.1
    assert d.leaving() and "no work" in d.why


def test_all_dones_leave_at_once():
    d, clock = departure()
    for ps in range(4):
        d.deliver(done(ps))
    assert d.leaving() and "all 4" in d.why


def test_a_byzantine_ps_cannot_extend_the_stay():
    """After the correct PSes 0-2 said done, PS 3 (never done) sends what it likes: steps at
    or beyond num_iter, steps it asked before, fresh steps below num_iter.  Only the fresh
    ones count as work, and even they stop counting at leave_by after the end began."""
    d, clock = departure()
    for step in range(6):  # during the run: its requests are work (the end has not begun)
        assert d.arrived(3, step)
        d.served(3, step)
    for ps in range(3):
        d.deliver(done(ps))
    start = clock.now
    for _ in range(20):  # beyond the last step, or a step it asked already: never work
        clock.now += 1.0
        assert not d.arrived(3, 10) and not d.arrived(3, 2 ** 62) and not d.arrived(3, 5)
        d.served(3, 5)  # answering a step asked before does not extend either
        if clock.now - start >= 5.0:
            break
    assert d.leaving() and clock.now - start == 5.0
    # the strongest: fresh steps below num_iter every 4.9 s would keep it forever, but
    # leave_by caps the stay at 30 s after the end began
    d, clock = departure(num_iter=10 ** 6)
    for ps in range(3):
        d.deliver(done(ps))
    start, step = clock.now, 0
    while not d.leaving():
        clock.now += 4.9
        step += 1
        assert d.arrived(3, step)  # work: it does extend the quiet period ...
        d.served(3, step)
        assert d.due() <= start + 30.0  # ... never beyond leave_by
    assert step == 7 and "30 s ago" in d.why


def test_requests_of_a_ps_that_said_done_are_no_work():
    """A Byzantine PS says done early and keeps asking fresh steps: no work."""
    d, clock = departure()
    d.deliver(done(3))
    for ps in (0, 1):
        d.deliver(done(ps))
    assert d.due() == clock.now + 5.0
    for step in range(1, 5):
        clock.now += 1.0
        assert not d.arrived(3, step)
    clock.now += 1.0
    assert d.leaving()


def test_a_slow_correct_ps_is_served_while_it_asks():
    """PS 3 is correct and behind: each fresh step it asks (and each answer) starts a new
    quiet period, until it is done or leave_by passes."""
    d, clock = departure()
    for ps in range(3):
        d.deliver(done(ps))
    start = clock.now
    for step in range(6, 10):  # one step every 3 s: never 5 s of silence
        clock.now += 3.0
        assert d.arrived(3, step)
        clock.now += 1.0  # the gradient takes a second to compute
        d.served(3, step)
        assert not d.leaving()
    d.deliver(done(3))
    assert d.leaving() and clock.now - start == 16.0


def test_serving_the_last_step_to_q_ps_begins_the_end():
    """Dones may be lost (a PS's last frames in a dead outbox): having answered the last
    step to q_ps PSes begins the end as q_ps dones would; a Byzantine PS alone cannot."""
    d, clock = departure()
    d.served(3, 9)
    d.served(3, 2 ** 40)  # the same PS again, beyond: once
    d.served(0, 9)
    assert d.due() is None
    d.served(1, 8)  # not the last step
    assert d.due() is None
    d.served(1, 9)
    assert d.due() == clock.now + 5.0


def test_only_ps_ranks_count():
    d, clock = departure()
    for sender in (4, 5, -1, 99):  # workers, nonsense: nothing
        d.deliver(done(sender))
        assert not d.arrived(sender, 1)
        d.served(sender, 9)
    assert d.done_from == set() and d.due() is None


def test_idle_waits_for_an_arrival_and_returns_false_when_it_is_time():
    async def main():
        d, clock = departure()
        waiting = asyncio.ensure_future(d.idle())
        for _ in range(5):
            await asyncio.sleep(0)  # let it reach its wait
        assert not waiting.done()  # nobody is done: it waits however long
        d.arrived(0, 0)
        assert await asyncio.wait_for(waiting, 5) is True
        for ps in range(3):
            d.deliver(done(ps))
        clock.now += 5.0
        assert await asyncio.wait_for(d.idle(), 5) is False  # due: no wait at all
        assert await asyncio.wait_for(d.wait(), 5) is None

    asyncio.run(main())


def test_idle_leaves_on_the_real_clock_while_a_byzantine_ps_keeps_asking():
    """The real-time path: a PS asking every 10 ms (fresh steps) keeps a worker no longer
    than leave_by after the end began."""
    async def main():
        d = Departure(num_ps=2, q_ps=1, num_iter=10 ** 9, linger=0.1, leave_by=0.3)
        d.deliver(done(0))
        began = time.monotonic()

        async def attacker():
            step = 0
            while True:
                step += 1
                d.arrived(1, step)
                await asyncio.sleep(0.01)  # the attacker's pace, not a synchronisation

        task = asyncio.ensure_future(attacker())
        try:
            await asyncio.wait_for(d.wait(), 5)
        finally:
            task.cancel()
        assert 0.3 <= time.monotonic() - began < 2.0

    asyncio.run(main())


# ---------------------------------------------------------------------------- the worker loops
SYNTH = "synthetic:1x8x8:4:64:16"




def worker(clock: Clock, **kw):
    """Worker 5 of 4 PS (fps = 1) + 4 workers, its node a recorder, its departure on ``clock``."""
    from byzsgd.config import RunConfig
    from byzsgd.roles.nodes import Worker

    args = dict(num_ps=4, fps=1, num_workers=4, fw=1, dataset=SYNTH, model="linear",
                loss="cross-entropy", rank=5, num_iter=10)
    args.update(kw)
    w = Worker(RunConfig(insecure_shared_secret=True, **args))
    w.node = RecordingNode()
    w.departure.clock = clock
    return w


def model(sender: int, step: int, w) -> Message:
    import torch

    return Message(kind="model", step=step, sender=sender, meta={},
                   tensors=[torch.zeros(w.replica.state_size)])


def test_garfield_worker_leaves_though_a_byzantine_ps_always_has_a_request_pending():
    """PS 3 asks a fresh step below num_iter each time it is answered, so a request of it is
    always pending and each is work: the loop never idles, and must still leave at leave_by."""
    async def main():
        clock = Clock()
        w = worker(clock, num_iter=10 ** 6)
        answers = []

        def answer(steps, batch_step, state):
            (ps, step), = steps.items()
            answers.append((ps, step))
            clock.now += 1.0  # a gradient takes a second
            w._on_request(model(3, step + 1, w))

        w._answer_steps = answer
        for ps in range(3):
            w.departure.deliver(done(ps))
        w._on_request(model(3, 0, w))
        w._on_request(model(3, 10 ** 6, w))  # beyond the last step: refused, never pending
        await asyncio.wait_for(w._steps(), 10)
        assert len(answers) == 30 and all(ps == 3 for ps, _ in answers)
        assert "30 s ago" in w.departure.why

    asyncio.run(main())


def test_garfield_worker_refuses_requests_beyond_the_last_step():
    async def main():
        w = worker(Clock())
        refused = w.refused
        w._on_request(model(0, 10, w))
        w._on_request(model(0, 2 ** 40, w))
        assert not w.pending and w.refused == refused + 2
        w._on_request(model(0, 9, w))
        assert list(w.pending) == [0]

    asyncio.run(main())


@pytest.mark.parametrize("sync", [False, True], ids=["paper", "paper-sync"])
def test_paper_worker_leaves_though_a_byzantine_ps_keeps_sending_models(sync):
    """The paper workers wait for q_ps models of their next step; after the correct PSes said
    done, PS 3 keeps sending models (beyond the last step, and old ones): they wake the loop
    but are no work, and it leaves LINGER after the third done."""
    async def main():
        clock = Clock()
        w = worker(clock, mode="paper", sync=sync)
        w.step = 10  # it served every step; what it sent last answers old requests
        w.last_sent = ([], {})
        steps = asyncio.ensure_future(w._steps())
        w._on_model(model(3, 2, w))  # during the run, an old step: the last gradient answers it
        for ps in range(3):
            w.departure.deliver(done(ps))
        for k in range(4):
            clock.now += 1.0
            w._on_model(model(3, 10 + k, w))
            w._on_model(model(3, 2, w))  # the same old step again: not answered, no work ...
            for _ in range(3):
                await asyncio.sleep(0)
            assert not steps.done()
        clock.now += 1.0
        w._on_model(model(3, 2 ** 40, w))  # ... nor this: 5 s after the third done, it leaves
        await asyncio.wait_for(steps, 10)
        assert "no work for 5 s" in w.departure.why
        assert [s for r, k, s in w.node.sent if k == "grad"] == [2]  # the old step, once

    asyncio.run(main())


def test_the_linger_attack_is_a_ps_protocol_attack_with_checked_arguments():
    from byzsgd.config import RunConfig
    from byzsgd.errors import ConfigError
    from byzsgd.roles import byzantine, protocol_attacks

    def cfg(**kw):
        return RunConfig(**dict(dict(num_ps=2, num_workers=2, fw=0, fps=0, rank=1, attack="linger"), **kw))

    assert "linger" in protocol_attacks.names("ps") and "linger" not in protocol_attacks.names("worker")
    byzantine.check_attack(cfg())
    assert protocol_attacks.parse_args(cfg(attack_args={"every": 0.5, "start": 3, "say_done": True})) \
        == {"every": 0.5, "for_s": 60.0, "start": 3, "stride": 1, "say_done": True, "report_every": 25}
    with pytest.raises(ConfigError, match="for ps nodes"):
        byzantine.check_attack(cfg(rank=3))
    for bad in ({"every": 0}, {"for_s": -1}, {"start": -1}, {"stride": -2}, {"say_done": "yes"},
                {"often": 1}):
        with pytest.raises(ConfigError, match="linger"):
            byzantine.check_attack(cfg(attack_args=bad))


# ---------------------------------------------------------------------------- end to end
#: what docs/design.md §3 states: the loop ends at most LEAVE_BY_S after the end began, the
#: node closes within DRAIN_S; SLACK for a gradient in progress and the process exit
SLACK_S = 3.0
BOUND_S = LEAVE_BY_S + DRAIN_S + SLACK_S


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lingering_byzantine_ps_keeps_no_correct_worker_running(tmp_path):
    """4 PS (fps = 1; PS 3 runs ``linger``: never says done, and after its last step asks
    every worker for a fresh step every 0.5 s for 5 minutes) + 3 workers, 6 steps.  Nothing
    kills the workers: each must exit 0 on its own within BOUND_S of the last correct PS's
    exit (measured here: LINGER_S after the third done)."""
    from byzsgd.deploy import local
    from byzsgd.deploy.options import LaunchConfig
    from byzsgd.roles import protocol_attacks

    lc = LaunchConfig.from_argv([
        "--num_ps", "4", "--fps", "1", "--num_workers", "3", "--fw", "0", "--gar", "median",
        "--dataset", "synthetic:1x8x8:4:96:32", "--model", "linear", "--loss", "cross-entropy",
        "--batch", "8", "--num_iter", "6", "--acc_freq", "6", "--resend_after", "1",
        "--byz_ps", "1", "--ps_attack", "linger", "--ps_attack_args", '{"every": 0.5, "for_s": 300}',
        "--spawn", "exec", "--run_dir", str(tmp_path / "run")])
    dep = local.plan(lc)
    local.start(dep, "exec")
    try:
        byz = [n for n in dep.nodes if n.byzantine]
        ps = dep.correct_ps
        workers = [n for n in dep.correct if n.role == "worker"]
        assert [n.rank for n in byz] == [3] and len(ps) == 3 and len(workers) == 3
        for n in ps:
            assert n.proc.wait(timeout=180) == 0, n.log_path.read_text()[-3000:]
        ps_exited = time.monotonic()
        late = {}
        for n in workers:
            try:
                n.proc.wait(timeout=max(0.0, ps_exited + BOUND_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                late[n.rank] = n.log_path.read_text()[-1500:]
        assert not late, (f"workers {sorted(late)} still running {BOUND_S:.0f} s after the "
                          f"correct PSes exited (a Byzantine PS keeps them):\n"
                          + "\n".join(f"--- {r}\n{t}" for r, t in late.items()))
        waited = time.monotonic() - ps_exited
        for n in workers:
            assert n.proc.returncode == 0, n.log_path.read_text()[-3000:]
            # the attack's requests (steps beyond the last, from a PS that never said done)
            # were no work: the worker left LINGER_S after the third done, not at the bound
            assert "then no work for" in n.log_path.read_text(), n.log_path.read_text()[-2000:]
        # the attack was on all along: the Byzantine PS is still asking
        assert byz[0].proc.poll() is None, byz[0].log_path.read_text()[-3000:]
        local.stop_all(dep, grace=10)
        report = protocol_attacks.parse_report(byz[0].log_path.read_text(), "linger")
        assert report and report["linger_rounds"] >= 2 and report["done_withheld"] > 0, report
        print(f"\nFIGURES termination: workers exited within {waited:.1f} s of the last correct "
              f"PS (bound {BOUND_S:.0f} s, linger {LINGER_S:.0f} s); the Byzantine PS sent "
              f"{report['linger_requests']} requests in {report['linger_rounds']} rounds")
    finally:
        local.stop_all(dep, grace=3)
