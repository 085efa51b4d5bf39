"""What every role shares: a model replica, a network node, and the life of a run.

:meth:`Role.run` is the same for a PS and a worker in every mode: meet the peers (unless a
signal comes first), run the mode's loop ``_steps()`` until it ends or a signal stops it,
then close.  A role fills in its loop and the hooks that say what it logs and releases.

What a member sends is handled under the containment contract (docs/design.md §3): the
node contains its handlers' exceptions; code of the loop that reads a quorum's messages reads
each one under :meth:`Role.member` (an exception stays with that message, counted in
``stats.failures["member:<kind>:<Exc>"]``) and takes its values through
:mod:`byzsgd.roles.member_input`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

from byzsgd.config import RunConfig
from byzsgd import rundir
from byzsgd.errors import ByzSGDError
from byzsgd.net import FrameLimits, Message, race
from byzsgd.roles import protocol_attacks
from byzsgd.roles.messages import SENDERS
from byzsgd.roles.process import install_stop_signals, make_node
from byzsgd.roles.replica import Replica


#: seconds a closing node lets its outboxes flush (a final gradient, model or ``done``)
DRAIN_S = 2.0

log = logging.getLogger("byzsgd.roles")


class Role:
    """A node of one role and mode: ``await role.run()`` is its process's exit code."""

    def __init__(self, cfg: RunConfig, replica: Replica):
        self.cfg = cfg
        self.replica = replica
        self.limits = FrameLimits.for_model(replica.state_size)
        self.node = make_node(cfg, self.limits, device=replica.device)
        # --attack NAME of byzsgd.roles.protocol_attacks: filters the node's sends (None otherwise)
        self.protocol_attack = protocol_attacks.attach(self)
        self.stop: asyncio.Event | None = None  # created inside the event loop
        self._logged_failures: set[str] = set()

    def accept(self, kind: str, handler, shapes) -> None:
        """Route ``kind`` to ``handler``, from the senders ``SENDERS`` allows only."""
        self.node.on(kind, handler, shapes=shapes, senders=SENDERS[kind])

    @contextlib.contextmanager
    def member(self, msg: Message):
        """Read one member's message: whatever it raises stays with that message (counted in
        ``stats.failures["member:<kind>:<Exc>"]``, logged once per reason) and the loop goes
        on without it, as the node does for its handlers."""
        try:
            yield
        except Exception as exc:
            reason = f"member:{msg.kind}:{type(exc).__name__}"
            self.node.stats.failures[reason] += 1
            if reason not in self._logged_failures:
                self._logged_failures.add(reason)
                log.error("rank %d: %s (message from rank %s, step %s); contained, counted in "
                          "stats.failures[%r] (logged once)", self.cfg.rank, reason, msg.sender,
                          msg.step, reason, exc_info=exc)

    async def run(self) -> int:
        """0 when the loop ended or a signal stopped it; 1 when it failed (logged)."""
        self.stop = asyncio.Event()
        install_stop_signals(self.stop)
        finished = True  # unless a signal stops the loop
        try:
            started, _ = await race(self.node.start(timeout=self.cfg.startup_timeout), self.stop.wait())
            if not started:  # stopped by a signal while still meeting the others
                return 0
            self._started()
            finished, _ = await race(self._steps(), self.stop.wait())
        except ByzSGDError as exc:
            self._failed(exc)
            return 1
        except Exception as exc:  # a bug of ours: member input never gets here (see member())
            log.exception("rank %d: the loop failed", self.cfg.rank)
            self._failed(exc)
            return 1
        finally:
            if not finished:
                self._stopped()
            await self._shutdown()
            self._report_net_stats()
        self._finished()
        return 0

    def _report_net_stats(self) -> None:
        """One line on stderr (the node's log), whatever the log level: what the transport
        refused (``stats.rejected``: reason -> count), what the node and the role refused of
        what members sent (``stats.refused_from``: "<reason>:<kind>:<sender>" -> count) and
        the local failures it contained (``stats.failures``); the run summary's
        ``rejections`` come from it."""
        try:
            import resource

            stats = self.node.stats
            use = resource.getrusage(resource.RUSAGE_SELF)
            print(rundir.net_stats_line(self.cfg.rank, self.cfg.role, stats.rejected, stats.failures,
                                        refused=stats.refused_from,
                                        frames_sent=stats.frames_sent, bytes_sent=stats.bytes_sent,
                                        frames_received=stats.frames_received,
                                        bytes_received=stats.bytes_received,
                                        cpu_s=round(use.ru_utime + use.ru_stime, 3),
                                        maxrss=use.ru_maxrss << 10),
                  file=sys.stderr, flush=True)
        except Exception:  # pragma: no cover - a closed stderr must not change the exit code
            pass

    # -- what a role fills in ------------------------------------------------------------
    async def _steps(self) -> None:
        """The mode's loop."""
        raise NotImplementedError

    def _started(self) -> None:
        """The node met its peers; the loop starts next."""

    def _failed(self, exc: Exception) -> None:
        """The run ends on ``exc``."""

    def _stopped(self) -> None:
        """A signal stopped the loop."""

    async def _shutdown(self) -> None:
        """Release what the role holds and close the node (always runs)."""
        await self.node.close(drain_timeout=DRAIN_S)

    def _finished(self) -> None:
        """The node is closed after a loop that ended (by itself or by a signal)."""
