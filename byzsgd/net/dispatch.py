"""Where a received message meets its handler, and where a handler's failure stops.

:class:`Dispatcher` is the node's table of kinds: who may send each one (``Node.on(senders=)``)
and the handler it goes to.  It routes every message, sync handlers at once, and contains
what they raise: a handler that raises never kills the node; it is counted in
``stats.failures["handler:<kind>:<ExceptionType>"]`` (the total in ``stats.handler_errors``) and
logged in full once per such reason, the same for a failure of the routing itself
(``"dispatch:<ExceptionType>"``) and of a task a handler started (``"task:<ExceptionType>"``).

:class:`HandlerQueue` belongs to one :class:`~.protocol.Connection`: the messages of that
connection waiting for an ``async`` handler (or behind one), run in arrival order by one task.
When 8 wait, the connection stops reading (the sender's frames stay in the kernel, then its
outbox) until fewer than 4 do: slow async handlers push back on the sender, not on memory.
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from typing import Callable, Iterable

from . import errors
from .frame import Message
from .peers import role_of

__all__ = ["Dispatcher", "HandlerQueue", "ROLES"]

log = logging.getLogger("byzsgd.net")

ROLES = ("ps", "worker")
_isawaitable = inspect.isawaitable


class Dispatcher:
    """The handler table of ``node`` (its ``rank``, ``world_size``, ``num_ps``, ``limits``,
    ``stats`` and running ``loop``)."""

    def __init__(self, node):
        self.node = node
        self.kinds: dict[str, list | None] = {}          # kind -> its shapes (the decoder's check)
        self.handlers: dict[str, tuple[Callable, bool]] = {}  # kind -> (handler, is async)
        self.senders: dict[str, str | frozenset] = {}    # kind -> the role or ranks that may send it
        self.tasks: set[asyncio.Task] = set()            # what sync handlers returned to await
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ the table
    def register(self, kind, handler, shapes, *, internal: bool, senders=None) -> None:
        """See :meth:`Node.on`; ``internal``: a ``__`` kind of the transport itself."""
        if not isinstance(kind, str) or not kind or len(kind) > 64:
            raise errors.ConfigError(f"kind must be a non-empty str of at most 64 chars, got {kind!r}")
        if kind.startswith("__") and not internal:
            raise errors.ConfigError(f"kinds starting with '__' are reserved, got {kind!r}")
        if kind in self.handlers:
            raise errors.ConfigError(f"a handler for kind {kind!r} is already registered")
        if not callable(handler):
            raise errors.ConfigError("handler must be callable")
        if shapes is not None:
            try:
                shapes = [tuple(int(d) for d in s) for s in shapes]
            except (TypeError, ValueError):
                raise errors.ConfigError(f"shapes must be a list of int tuples, got {shapes!r}") from None
            limits = self.node.limits
            if len(shapes) > limits.max_tensors:
                raise errors.ConfigError(f"{len(shapes)} shapes > limits.max_tensors={limits.max_tensors}")
        if senders is not None:
            self.senders[kind] = _senders(senders)
        self.kinds[kind] = shapes
        self.handlers[kind] = (handler, inspect.iscoroutinefunction(handler))

    def may_send(self, kind: str, sender: int) -> bool:
        """Whether ``sender`` may send ``kind`` (see :meth:`Node.on`); counts a refusal."""
        allowed = self.senders.get(kind)
        if allowed is None:
            return True
        node = self.node
        if isinstance(allowed, str):
            ok = type(sender) is int and 0 <= sender < node.world_size and role_of(sender, node.num_ps) == allowed
        else:
            ok = sender in allowed
        if not ok:
            node.stats.refuse("sender", kind, sender)
        return ok

    # ------------------------------------------------------------------ routing
    def route(self, conn, msg: Message) -> None:
        """A frame ``conn`` received: to its handler, through ``conn``'s queue when needed
        (:meth:`.protocol.Connection.deliver`'s rule, inline: this runs once per frame)."""
        try:
            self.node.stats.frames_received += 1
            kind = msg.kind
            entry = self.handlers.get(kind)
            if entry is None:  # cannot happen for frames (the decoder checks kinds)
                msg.release()
                return
            if kind in self.senders and not self.may_send(kind, msg.sender):
                msg.release()
                return
            handler, is_async = entry
            q = conn.queue
            if is_async or (q is not None and len(q)):
                conn.deliver(handler, msg, is_async)
                return
        except Exception as e:  # the dispatch path itself must never take the node down
            msg.release()
            self.failed(f"dispatch:{type(e).__name__}", e, msg)
            return
        try:  # self.call, inline
            r = handler(msg)
            if r is not None and _isawaitable(r):
                t = self.node.loop.create_task(self._guard(r, msg))
                self.tasks.add(t)
                t.add_done_callback(self._task_done)
        except Exception as e:
            self.failed(f"handler:{kind}:{type(e).__name__}", e, msg)

    def route_local(self, msg: Message) -> None:
        """A message the node sent to itself."""
        self.node.stats.frames_received += 1
        entry = self.handlers.get(msg.kind)
        if entry is not None and self.may_send(msg.kind, msg.sender):
            self.call(entry[0], msg)

    def call(self, handler, msg) -> None:
        """Run a handler now; what it returns to await runs as a task, contained too."""
        try:
            r = handler(msg)
            if r is not None and _isawaitable(r):
                t = self.node.loop.create_task(self._guard(r, msg))
                self.tasks.add(t)
                t.add_done_callback(self._task_done)
        except Exception as e:
            self.failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)

    async def _guard(self, awaitable, msg) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)

    def _task_done(self, t: asyncio.Task) -> None:
        self.tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:  # _guard contains all but BaseException
            self.failed(f"task:{type(t.exception()).__name__}", t.exception(), None)

    def failed(self, reason: str, exc: BaseException, msg: Message | None) -> None:
        """Count a contained failure under ``reason``; log it in full once per reason."""
        stats = self.node.stats
        stats.failures[reason] += 1
        if reason.startswith("handler:"):
            stats.handler_errors += 1
        where = f" (message {msg.kind!r} from rank {msg.sender}, step {msg.step})" if msg is not None else ""
        rank = self.node.rank
        if reason not in self._logged:
            self._logged.add(reason)
            log.error("rank %d: %s%s; contained, counted in stats.failures[%r] (logged once)",
                      rank, reason, where, reason, exc_info=exc)
        else:
            log.debug("rank %d: %s%s: %r", rank, reason, where, exc)


def _senders(senders: str | Iterable[int]) -> str | frozenset:
    if isinstance(senders, str):
        if senders not in ROLES:
            raise errors.ConfigError(f"senders must be one of {ROLES} or ranks, got {senders!r}")
        return senders
    try:
        return frozenset(int(r) for r in senders)
    except (TypeError, ValueError):
        raise errors.ConfigError(f"senders must be a role or ranks, got {senders!r}") from None


class HandlerQueue:
    """One connection's messages waiting for their handler, in arrival order (module
    docstring).  ``failed``: the dispatcher's failure count."""

    PAUSE_AT = 8
    RESUME_BELOW = 4

    def __init__(self, conn, failed: Callable):
        self.conn = conn
        self._failed = failed
        self._q: collections.deque = collections.deque()
        self._task: asyncio.Task | None = None
        self._paused = False

    def __len__(self) -> int:
        return len(self._q)

    def put(self, handler, msg: Message, loop: asyncio.AbstractEventLoop) -> None:
        self._q.append((handler, msg))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        conn = self.conn
        if len(self._q) >= self.PAUSE_AT and conn.transport is not None and not conn.closed:
            conn.transport.pause_reading()
            self._paused = True

    def cancel(self) -> None:
        """The node is closing: stop running handlers."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _drain(self) -> None:
        q, conn = self._q, self.conn
        while q:
            handler, msg = q[0]
            try:
                r = handler(msg)
                if r is not None and inspect.isawaitable(r):
                    await r
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(f"handler:{msg.kind}:{type(e).__name__}", e, msg)
            q.popleft()
            if self._paused and len(q) < self.RESUME_BELOW and not conn.closed:
                self._paused = False
                conn.transport.resume_reading()
