"""The model quorum: the newest model of each sender, and a wait for q of them at step >= t.

Gradients answer one request of one step, so a per-step :class:`.quorum.Mailbox` fits
them.  Models are different: a PS that fell behind (paused, partitioned, restarted) can
never get its peers' models of a step they left long ago, and a per-step window would make
it wait forever.  Here each sender's *newest* model is kept (one per sender: a Byzantine
peer cannot make us buffer more), and a gather for step t completes as soon as q distinct
senders have a model of step >= t — the normal case is all at t; a node behind simply
jumps to its peers' step.  The step to continue from is the lowest among the q chosen: with
q > f at least one of them is correct, so a Byzantine sender can neither trigger a jump on
its own nor choose how far it goes.

Far-future models.  With ``window`` set, a model of step > t + window (t: the step asked
for) is *far*: it counts only when more than ``f`` senders have one (then at least one of
them is correct and the node really is behind).  A single Byzantine sender labelling its
model with a huge step therefore neither takes a seat in every quorum nor makes the node
skip work.

Gathers that take a model of a later step (``keep_ahead``): the model of step s > t stays
the sender's newest (the caller gets a copy), so the gather at t + 1 can use it again
instead of waiting for a model the sender already sent.

Same verbs as :class:`.quorum.Mailbox`: ``deliver`` (the node's handler), ``collect`` (the
quorum wait), ``close``.  Ownership too: what it drops it releases, what ``collect`` returns
belongs to the caller.
"""
from __future__ import annotations

import asyncio
from typing import Collection

from . import errors
from .frame import Message

__all__ = ["NewestModels"]


class NewestModels:
    def __init__(self, kind: str, senders: Collection[int], *, window: int | None = None, f: int = 0):
        if window is not None and (type(window) is not int or window < 0):
            raise errors.ConfigError(f"window must be an int >= 0 or None, got {window!r}")
        self.kind = kind
        self.senders = frozenset(senders)
        self.window = window
        self.f = f
        self.newest: dict[int, Message] = {}  # insertion order = arrival order
        self._waiter: tuple[int, int, frozenset | None, asyncio.Future, bool] | None = None
        self._watchers: list[tuple[int, int, asyncio.Future]] = []
        self._closed = False
        self.dropped = 0

    def deliver(self, msg: Message) -> bool:
        """The node's handler for this kind: keep it if it is the sender's newest."""
        old = self.newest.get(msg.sender)
        if self._closed or msg.sender not in self.senders or (old is not None and old.step >= msg.step):
            self.dropped += 1
            msg.release()
            return False
        if old is not None:
            old.release()
            del self.newest[msg.sender]
        self.newest[msg.sender] = msg
        if self._waiter is not None:
            q, step, among, fut, keep = self._waiter
            if not fut.done():
                self._try(q, step, fut, among, keep)
        for q, step, fut in self._watchers:
            if not fut.done() and self.ready(q, step):
                fut.set_result(None)
        self._watchers = [w for w in self._watchers if not w[2].done()]
        return True

    def _eligible(self, step: int, among: frozenset | None = None) -> list[int]:
        ready = [s for s, m in self.newest.items() if m.step >= step and (among is None or s in among)]
        if self.window is None:
            return ready
        horizon = step + self.window
        far = [s for s in ready if self.newest[s].step > horizon]
        if len(far) > self.f:  # more than f senders are that far ahead: one of them is correct
            return ready
        return [s for s in ready if self.newest[s].step <= horizon]

    def far(self, step: int) -> list[int]:
        """The senders whose newest model is beyond ``step + window`` (not counted alone)."""
        if self.window is None:
            return []
        return [s for s, m in self.newest.items() if m.step > step + self.window]

    def _try(self, q: int, step: int, fut: asyncio.Future, among: frozenset | None = None,
             keep_ahead: bool = False) -> None:
        ready = self._eligible(step, among)
        if len(ready) >= q:
            got = {}
            for s in ready[:q]:
                m = self.newest[s]
                if keep_ahead and m.step > step:
                    # the next gather may need it again: keep it, hand out a copy
                    got[s] = Message(m.kind, m.step, m.sender, [t.clone() for t in m.tensors],
                                     dict(m.meta) if isinstance(m.meta, dict) else m.meta)
                else:
                    got[s] = self.newest.pop(s)
            fut.set_result(got)

    def forget_below(self, step: int) -> None:
        """Drop the models older than ``step`` (they can no longer count)."""
        for s in [s for s, m in self.newest.items() if m.step < step]:
            self.newest.pop(s).release()

    def ready(self, q: int, step: int) -> bool:
        return len(self._eligible(step)) >= q

    def wait_ready(self, q: int, step: int) -> asyncio.Future:
        """A future resolved once q senders have a model of step >= ``step`` (nothing taken)."""
        fut = asyncio.get_running_loop().create_future()
        if self.ready(q, step):
            fut.set_result(None)
        else:
            self._watchers = [w for w in self._watchers if not w[2].done()]
            self._watchers.append((q, step, fut))
        return fut

    async def collect(self, q: int, step: int, *, timeout: float | None = None,
                     forget_older: bool = True, among: Collection[int] | None = None,
                     keep_ahead: bool = False) -> dict[int, Message]:
        """The first q senders (arrival order) whose newest model is of step >= ``step``
        (only senders in ``among``, if given: a pull from one PS waits for that PS).
        ``keep_ahead``: models of a step > ``step`` stay here (copies are returned), so a
        collect for a later step can take them again.

        The caller owns the returned messages.  ``timeout`` raises
        :class:`errors.QuorumTimeout` listing who had a usable model."""
        if self._closed:
            raise asyncio.CancelledError(f"{self.kind} closed")
        among = None if among is None else frozenset(among)
        if q > len(self.senders if among is None else self.senders & among):
            raise ValueError(f"quorum q={q} exceeds the allowed senders")
        if forget_older:
            self.forget_below(step)
        fut = asyncio.get_running_loop().create_future()
        self._try(q, step, fut, among, keep_ahead)
        if fut.done():
            return fut.result()
        self._waiter = (q, step, among, fut, keep_ahead)
        try:
            return await asyncio.wait_for(fut, timeout) if timeout is not None else await fut
        except asyncio.TimeoutError:
            got = {s: self.newest[s] for s in self._eligible(step, among)}
            raise errors.QuorumTimeout(self.kind, step, q, got) from None
        finally:
            self._waiter = None

    def close(self) -> None:
        """Cancel the pending collect and watchers, release everything, refuse what comes."""
        self._closed = True
        for m in self.newest.values():
            m.release()
        self.newest.clear()
        if self._waiter is not None and not self._waiter[3].done():
            self._waiter[3].cancel()
        for _, _, fut in self._watchers:
            if not fut.done():
                fut.cancel()
        self._watchers.clear()

