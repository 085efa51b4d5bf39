"""TEST HARNESS: the asynchronous network's adversary, played at the PS's gradient intake.

Why: ByzSGD assumes an asynchronous network, so the adversary decides the order in which
messages arrive.  Its fw Byzantine workers can then be in **every** gradient quorum (the first
q_w = n_w - fw gradients of a step) and know that step's honest gradients (docs/design.md §5).  A
real deployment on loopback never produces that order by itself: a Byzantine worker that
computes more than the honest ones arrives after the quorum closed.  This module lets a real
deployment (real processes, real TCP) be judged against that worst case.  It is not a
protocol feature: nothing of it runs unless ``--scheduled_byzantine`` is set (the launcher's
``--schedule adversarial`` sets it on every node).

At each PS, between the node and the gradient :class:`~byzsgd.net.Mailbox`
(:class:`AdversarySchedule`), for step t:

* a listed (Byzantine) worker's gradient is delivered at once;
* a correct worker's gradient is **held**, and **leaked** at once to the listed workers
  (kind ``leak``: a copy of its gradient tensor, ``meta = {"worker": its sender}``), in the
  order the PS received them;
* when every listed rank's gradient of t was delivered, the held gradients are released in
  arrival order (so the quorum is the listed ranks plus the first q_w - len(listed) leaked
  ones: the attacker knows exactly who the quorum's honest members are), and the later
  correct gradients of t are delivered at once;
* ``deadline`` seconds (``--resend_after``) after the first hold of t, the held ones are
  released anyway: a silent or crashed Byzantine worker delays a step, never stalls the PS;
* a listed rank the PS no longer takes gradients from (``excluded()``: the workers
  ``--check_gradients`` banned) is not waited for and gets no more leaks; once every listed
  rank is excluded nothing is held: the adversary has lost its workers at that PS.

Bounded: only steps the mailbox would file are held (``[floor, floor + window)``), one
gradient per correct sender and step (copies are dropped); everything of a step below the
mailbox's floor is released and forgotten at the next delivery or deadline.

The Byzantine workers' side is :mod:`byzsgd.roles.scheduled_attacker`.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Collection

from byzsgd.net import Mailbox, Message
from byzsgd.roles.messages import KIND_GRAD, KIND_LEAK, SENDERS

__all__ = ["AdversarySchedule", "gradient_intake", "byzantine_in_quorums"]

log = logging.getLogger("byzsgd.schedule")

#: deadline releases logged in full; later ones every LOG_EVERY-th
LOG_FIRST = 5
LOG_EVERY = 100


class _Step:
    """What the schedule knows of one step: who of the listed ranks was delivered, what it holds."""

    __slots__ = ("byzantine", "held", "open", "timer")

    def __init__(self) -> None:
        self.byzantine: set[int] = set()
        self.held: dict[int, Message] = {}  # sender -> message, in arrival order
        self.open = False  # released: later correct gradients go straight through
        self.timer: asyncio.TimerHandle | None = None


class AdversarySchedule:
    """Orders one PS's gradient intake as the network adversary would (module docstring).

    ``node``: the PS's node (sends the leaks); ``box``: the mailbox the quorums are collected
    from; ``byzantine``: the listed worker ranks; ``deadline``: seconds a correct gradient is
    held at most; ``excluded()``: the ranks the PS takes no gradient from any more (banned).
    Register :meth:`deliver` as the handler of the gradient kind."""

    def __init__(self, node: Any, box: Mailbox, byzantine: Collection[int], *, deadline: float,
                 excluded: Callable[[], Collection[int]] | None = None, leak_kind: str = KIND_LEAK):
        if not deadline > 0:
            raise ValueError(f"the schedule's deadline must be > 0, got {deadline!r}")
        self.node, self.box = node, box
        self.byzantine = frozenset(int(r) for r in byzantine)
        self.deadline = float(deadline)
        self.excluded = excluded
        self.leak_kind = leak_kind
        self._steps: dict[int, _Step] = {}
        # counters, for tests and logs
        self.held = 0  # correct gradients held back
        self.leaked = 0  # leak messages sent (one per held gradient and listed rank)
        self.complete = 0  # steps released because every listed rank was in
        self.expired = 0  # steps released at the deadline
        self.copies = 0  # a correct sender's second gradient of a step it is held for: dropped

    # -- intake ------------------------------------------------------------------------
    def _awaited(self) -> frozenset:
        """The listed ranks still worth waiting for (not excluded by the PS)."""
        if self.excluded is None:
            return self.byzantine
        return self.byzantine - frozenset(self.excluded())

    def deliver(self, msg: Message) -> bool:
        """The node's handler of the gradient kind: deliver, or hold and leak (docstring)."""
        box = self.box
        self._prune()
        step, sender = msg.step, msg.sender
        if box.cancelled or not box.floor <= step < box.floor + box.window:
            return box.deliver(msg)  # refused there (stale, too far ahead): nothing to order
        st = self._steps.get(step)
        if st is None:
            st = self._steps[step] = _Step()
        awaited = self._awaited()
        if sender in self.byzantine:
            ok = box.deliver(msg)
            st.byzantine.add(sender)
            if not st.open and st.byzantine >= awaited:
                self.complete += 1
                self._release(step)
            return ok
        if st.open:
            return box.deliver(msg)
        if st.byzantine >= awaited:  # every listed rank in, or the rest excluded meanwhile
            self._release(step)
            return box.deliver(msg)
        if sender in st.held:  # the worker answered a re-sent request: one per step
            self.copies += 1
            msg.release()
            return False
        st.held[sender] = msg
        self.held += 1
        self._leak(msg, sorted(awaited))
        if st.timer is None:
            st.timer = asyncio.get_running_loop().call_later(self.deadline, self._expire, step)
        return True

    def _leak(self, msg: Message, to: list[int]) -> None:
        """A copy of the held gradient to the listed ranks ``to`` (the message's tensors are
        pool views, reused once it is released: the leak sends its own copy)."""
        try:
            self.node.broadcast(to, self.leak_kind, msg.step, [msg.tensors[0].clone()],
                                {"worker": int(msg.sender)})
            self.leaked += len(to)
        except Exception as exc:  # a closing node: the held gradient still counts
            log.debug("leak of worker %d's step %d gradient not sent: %r", msg.sender, msg.step, exc)

    def _release(self, step: int) -> None:
        """Hand the held gradients of ``step`` to the mailbox in arrival order; the step is open."""
        st = self._steps.get(step)
        if st is None:
            return
        st.open = True
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        held, st.held = st.held, {}
        for msg in held.values():
            self.box.deliver(msg)  # past the quorum, the mailbox drops (and releases) them

    def _expire(self, step: int) -> None:
        st = self._steps.get(step)
        if st is None or st.open:
            return
        st.timer = None
        self.expired += 1
        if self.expired <= LOG_FIRST or self.expired % LOG_EVERY == 0:
            missing = sorted(self._awaited() - st.byzantine)
            log.warning("step %d: adversarial schedule released %d held gradients after %.1f s "
                        "without the gradients of Byzantine ranks %s (%d such steps so far)",
                        step, len(st.held), self.deadline, missing, self.expired)
        self._release(step)
        self._prune()

    # -- bounds --------------------------------------------------------------------------
    def _prune(self) -> None:
        """Forget the steps below the mailbox's floor (they can never make a quorum again)."""
        floor = self.box.floor
        for step in [s for s in self._steps if s < floor]:
            st = self._steps.pop(step)
            if st.timer is not None:
                st.timer.cancel()
            for msg in st.held.values():
                msg.release()

    @property
    def steps_tracked(self) -> int:
        return len(self._steps)

    @property
    def holding(self) -> int:
        """Correct gradients held right now."""
        return sum(len(st.held) for st in self._steps.values())

    def close(self) -> None:
        """Release everything held and cancel the deadlines."""
        for st in self._steps.values():
            if st.timer is not None:
                st.timer.cancel()
            for msg in st.held.values():
                msg.release()
        self._steps.clear()


def gradient_intake(node: Any, cfg: Any, kind: str = KIND_GRAD, *, window: int, shapes,
                    role: str = SENDERS[KIND_GRAD],
                    excluded: Callable[[], Collection[int]] | None = None) -> Mailbox:
    """The PS's gradient mailbox, registered on ``node`` as ``node.mailbox(kind, window=...,
    shapes=..., role=...)`` would: the plain one, or under the test harness
    (``cfg.scheduled_byzantine``) one behind an :class:`AdversarySchedule` (deadline
    ``cfg.resend_after``; ``excluded``: the workers the PS no longer takes, called at each
    delivery)."""
    if not cfg.scheduled_ranks:
        return node.mailbox(kind, window=window, shapes=shapes, role=role)
    box = Mailbox(kind, window=window)
    schedule = AdversarySchedule(node, box, cfg.scheduled_ranks, deadline=cfg.resend_after,
                                 excluded=excluded)
    node.on(kind, schedule.deliver, shapes=shapes, senders=role)
    box.schedule = schedule  # reachable from the PS (tests, logs)
    log.warning("rank %d: TEST HARNESS --scheduled_byzantine %s: the PS plays the network adversary "
                "(Byzantine gradients first, correct ones held up to %.1f s and leaked to them)",
                cfg.rank, ",".join(map(str, cfg.scheduled_ranks)), cfg.resend_after)
    return box


def byzantine_in_quorums(records, byzantine: Collection[int]) -> tuple[int, int]:
    """What the schedule promises, measured on one PS's metrics records (in file order):
    ``(hits, eligible)``.  ``eligible``: the gradient phases (step records with a ``quorum``)
    at which at least one of the ``byzantine`` ranks was still eligible, i.e. not banned at an
    earlier step (a step record's ``banned`` lists the workers --check_gradients caught in
    that step's quorum); ``hits``: those whose quorum held every eligible Byzantine rank."""
    banned: set[int] = set()
    hits = eligible = 0
    for rec in records:
        if "event" in rec or not isinstance(rec.get("quorum"), list):
            continue
        expected = set(byzantine) - banned
        if expected:
            eligible += 1
            hits += expected <= set(rec["quorum"])
        banned.update(r for r in rec.get("banned") or () if isinstance(r, int))
    return hits, eligible
