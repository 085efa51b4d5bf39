"""byzsgd.net.newest (the newest model per sender), .resend (quorum waits that re-ask) and
.race (work against a rival): no network, messages are built directly."""
from __future__ import annotations

import asyncio

import pytest
import torch

from byzsgd.net import Mailbox, Message, NewestModels, errors, race, until_quorum

pytestmark = pytest.mark.timeout(180, method="thread")


def msg(sender: int, step: int, value: float = 0.0, kind: str = "ps_model") -> Message:
    return Message(kind=kind, step=step, sender=sender, tensors=[torch.full((3,), value)], meta={})


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- NewestModels
def test_keeps_only_the_newest_model_per_sender():
    box = NewestModels("ps_model", [1, 2, 3])
    assert box.deliver(msg(1, 5))
    assert not box.deliver(msg(1, 5))  # same step twice: counted once
    assert not box.deliver(msg(1, 4))  # older: dropped
    assert box.deliver(msg(1, 7))
    assert not box.deliver(msg(9, 7))  # not a peer
    assert {s: m.step for s, m in box.newest.items()} == {1: 7}


def test_collect_completes_with_first_q_senders_at_step_or_later():
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(3, 10))
        box.deliver(msg(1, 9))  # too old for step 10
        task = asyncio.ensure_future(box.collect(2, 10))
        await asyncio.sleep(0)
        assert not task.done()
        box.deliver(msg(2, 11))
        got = await asyncio.wait_for(task, 1)
        assert sorted(got) == [2, 3] and min(m.step for m in got.values()) == 10
        assert 1 not in box.newest  # forgotten: older than the gathered step
    run(main())


def test_collect_timeout_lists_who_answered_and_keeps_them():
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(1, 4))
        with pytest.raises(errors.QuorumTimeout) as err:
            await box.collect(2, 4, timeout=0.05)
        assert sorted(err.value.received) == [1]
        box.deliver(msg(2, 4))
        got = await box.collect(2, 4, timeout=1)
        assert sorted(got) == [1, 2]
    run(main())


def test_a_byzantine_far_future_step_cannot_choose_the_jump():
    """With q > f, the step to continue from is bounded by a correct sender's step."""
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(3, 10**9))  # Byzantine
        assert not box.ready(2, 11)  # one sender ahead is not enough to jump
        box.deliver(msg(1, 40))  # a correct peer really ahead
        assert box.ready(2, 11)
        got = await box.collect(2, 11)
        assert min(m.step for m in got.values()) == 40
    run(main())


def test_wait_ready_and_close():
    async def main():
        box = NewestModels("ps_model", [1, 2])
        fut = box.wait_ready(2, 3)
        box.deliver(msg(1, 3))
        assert not fut.done()
        box.deliver(msg(2, 5))
        await asyncio.wait_for(fut, 1)
        pending = asyncio.ensure_future(box.collect(2, 100))
        await asyncio.sleep(0)
        box.close()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert not box.deliver(msg(1, 200))
    run(main())


def test_released_when_superseded():
    released = []
    box = NewestModels("ps_model", [1])
    first, stale = msg(1, 2), msg(1, 1)
    first.release = lambda: released.append("first")
    stale.release = lambda: released.append("stale")
    box.deliver(first)
    box.deliver(stale)  # older than what it holds: dropped, its buffer given back
    box.deliver(msg(1, 3))  # supersedes the first
    assert released == ["stale", "first"]


def test_collect_among_waits_for_that_sender():
    async def main():
        box = NewestModels("model", [0, 1, 2, 3])
        box.deliver(msg(1, 5))
        task = asyncio.ensure_future(box.collect(1, 5, among=(2,), forget_older=False))
        await asyncio.sleep(0)
        assert not task.done()  # PS 1's model does not answer a pull of PS 2
        box.deliver(msg(2, 4))  # too old
        await asyncio.sleep(0)
        assert not task.done()
        box.deliver(msg(2, 6))
        got = await asyncio.wait_for(task, 1)
        assert list(got) == [2] and got[2].step == 6 and 1 in box.newest
        with pytest.raises(errors.QuorumTimeout):
            await box.collect(1, 5, among=(3,), timeout=0.05)
    run(main())


def test_close_releases_what_it_holds_and_cancels_watchers():
    async def main():
        released = []
        box = NewestModels("ps_model", [1, 2])
        held = msg(1, 3)
        held.release = lambda: released.append(1)
        box.deliver(held)
        watcher = box.wait_ready(2, 3)
        box.close()
        assert released == [1] and box.newest == {} and watcher.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await box.collect(1, 0)
    run(main())


def test_collect_refuses_a_quorum_larger_than_the_senders():
    async def main():
        box = NewestModels("model", [0, 1])
        with pytest.raises(ValueError, match="exceeds"):
            await box.collect(3, 0)
        with pytest.raises(ValueError, match="exceeds"):
            await box.collect(2, 0, among=(1, 7))
    run(main())


def test_mailbox_and_newest_share_their_verbs():
    for cls in (Mailbox, NewestModels):
        assert callable(getattr(cls, "deliver")) and callable(getattr(cls, "collect"))
        assert callable(getattr(cls, "close"))


# ---------------------------------------------------------------------------- until_quorum
def test_until_quorum_resends_to_the_silent_ranks_only():
    async def main():
        box = Mailbox("grad", window=4)
        resent = []

        def resend(silent):
            resent.append(list(silent))
            if len(resent) == 2:  # the second round of re-asking brings rank 3 back
                box.deliver(Message("grad", 0, 3, [], {}))

        box.deliver(Message("grad", 0, 1, [], {}))
        got = await until_quorum(lambda: box.collect(0, 2, timeout=0.02), [1, 2, 3], resend=resend)
        assert sorted(got) == [1, 3]
        assert resent == [[2, 3], [2, 3]]  # rank 1 answered: never asked again
    run(main())


def test_until_quorum_reports_a_stall_once_and_keeps_waiting():
    async def main():
        box = NewestModels("ps_model", [1, 2])
        stalls, rounds = [], []

        def resend(silent):
            rounds.append(silent)
            if len(rounds) == 6:
                box.deliver(msg(2, 0))

        box.deliver(msg(1, 0))
        got = await until_quorum(lambda: box.collect(2, 0, timeout=0.01), [1, 2], resend=resend,
                                 stall_after=0.0, on_stall=lambda waited, answered: stalls.append(answered))
        assert sorted(got) == [1, 2] and len(rounds) == 6
        assert stalls == [[1]]  # once, with who had answered
    run(main())


def test_until_quorum_interrupt_returns_none_and_cancels_the_wait():
    async def main():
        box = NewestModels("ps_model", [1, 2])
        ahead = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(until_quorum(lambda: box.collect(2, 5, timeout=10), [1, 2],
                                                  interrupt=lambda: ahead))
        await asyncio.sleep(0.01)
        ahead.set_result(None)
        assert await asyncio.wait_for(task, 1) is None
        box.deliver(msg(1, 5))
        box.deliver(msg(2, 5))
        assert sorted(box.newest) == [1, 2]  # the abandoned collect took nothing
    run(main())


def test_until_quorum_without_a_resend_just_waits_again():
    async def main():
        box = Mailbox("grad", window=4)
        calls = []

        def wait():
            calls.append(1)
            if len(calls) == 3:
                box.deliver(Message("grad", 0, 4, [], {}))
            return box.collect(0, 1, timeout=0.01)

        got = await until_quorum(wait, [4])
        assert list(got) == [4] and len(calls) == 3
    run(main())


# ---------------------------------------------------------------------------- race
def test_race_work_wins_and_the_rival_is_cancelled():
    async def main():
        rival = asyncio.get_running_loop().create_future()
        assert await race(asyncio.sleep(0, result=7), rival) == (True, 7)
        assert rival.cancelled()
    run(main())


def test_race_rival_wins_and_the_work_is_cancelled_and_cleaned_up():
    async def main():
        cleaned = []

        async def work():
            try:
                await asyncio.sleep(10)
            finally:
                cleaned.append(True)

        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, stop.set)
        assert await race(work(), stop.wait()) == (False, None)
        assert cleaned == [True]  # its finally ran before race returned
    run(main())


def test_race_propagates_the_works_exception():
    async def main():
        async def fails():
            raise KeyError("boom")
        with pytest.raises(KeyError):
            await race(fails(), asyncio.Event().wait())
    run(main())


def test_race_a_failing_rival_still_ends_it_and_a_cancelled_caller_cancels_both():
    async def main():
        async def rival_fails():
            raise OSError("gone")
        assert await race(asyncio.Event().wait(), rival_fails()) == (False, None)
        work, rival = asyncio.Event().wait(), asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(race(work, rival))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert rival.cancelled()
    run(main())
