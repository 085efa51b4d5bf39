"""Mailbox / quorum collector semantics (no network: messages are built directly)."""
import asyncio

import pytest

from byzsgd.net import Mailbox, Message, errors

pytestmark = pytest.mark.timeout(180, method="thread")  # uvloop can delay signal-based timeouts


class Rel:
    def __init__(self):
        self.n = 0

    def __call__(self, buf):
        self.n += 1


def msg(step, sender, rel=None):
    rel = rel or Rel()
    return Message("g", step, sender, [], {}, _buffer=bytearray(1), _release_to=rel)


def run(coro):
    return asyncio.run(coro)


def test_duplicate_stale_window_and_senders():
    rel = Rel()
    mb = Mailbox("g", window=4, senders={1, 2, 3})
    assert mb.deliver(msg(0, 1, rel))
    assert not mb.deliver(msg(0, 1, rel))       # duplicate (sender, step)
    assert mb.deliver(msg(3, 1, rel))           # future step within the window
    assert not mb.deliver(msg(4, 1, rel))       # beyond the window
    assert not mb.deliver(msg(0, 9, rel))       # sender not allowed
    assert rel.n == 3
    mb.advance(2)
    assert rel.n == 4                           # step 0 dropped and released
    assert not mb.deliver(msg(1, 2, rel))       # stale
    assert mb.latest() == 3 and len(mb) == 1


def test_collect_completes_with_exactly_q_distinct_senders():
    async def main():
        mb = Mailbox("g", window=8)
        task = asyncio.create_task(mb.collect(5, 3))
        await asyncio.sleep(0)
        for s in (4, 4, 7):
            mb.deliver(msg(5, s))
        await asyncio.sleep(0)
        assert not task.done()
        mb.deliver(msg(5, 9))
        got = await asyncio.wait_for(task, 1)
        assert list(got) == [4, 7, 9]
        assert mb.floor == 6
        late = Rel()
        assert not mb.deliver(msg(5, 1, late)) and late.n == 1
    run(main())


def test_collect_from_already_buffered_and_extra_released():
    async def main():
        mb = Mailbox("g")
        rels = [Rel() for _ in range(4)]
        for s in range(4):
            mb.deliver(msg(2, s, rels[s]))
        mb.deliver(msg(3, 0))
        got = await mb.collect(2, 2)
        assert list(got) == [0, 1]
        assert [r.n for r in rels] == [0, 0, 1, 1]   # extras released
        got3 = await mb.collect(3, 1, timeout=1)
        assert list(got3) == [0]
    run(main())


def test_collect_sender_subset_and_timeout_holds_partial():
    async def main():
        mb = Mailbox("g")
        mb.deliver(msg(0, 1))
        mb.deliver(msg(0, 2))
        with pytest.raises(errors.QuorumTimeout) as ei:
            await mb.collect(0, 2, senders={2, 3}, timeout=0.05)
        assert set(ei.value.received) == {2}
        assert isinstance(ei.value, asyncio.TimeoutError)
        mb.deliver(msg(0, 3))
        got = await mb.collect(0, 2, senders={2, 3}, timeout=1)
        assert set(got) == {2, 3}
        with pytest.raises(errors.StaleStep):
            await mb.collect(0, 1)
    run(main())


def test_cancel():
    async def main():
        mb = Mailbox("g")
        rel = Rel()
        mb.deliver(msg(1, 1, rel))
        task = asyncio.create_task(mb.collect(0, 1))
        await asyncio.sleep(0)
        mb.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert rel.n == 1
        assert not mb.deliver(msg(0, 2))
    run(main())


def test_caller_cancellation_leaves_mailbox_usable():
    async def main():
        mb = Mailbox("g")
        task = asyncio.create_task(mb.collect(0, 1))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        mb.deliver(msg(0, 5))
        assert list(await mb.collect(0, 1, timeout=1)) == [5]
    run(main())


def test_window_slides_with_floor():
    async def main():
        mb = Mailbox("g", window=2)
        assert not mb.deliver(msg(2, 1))
        mb.deliver(msg(0, 1))
        await mb.collect(0, 1)
        assert mb.deliver(msg(2, 1))
    run(main())
