"""Protocol attacks: a Byzantine member that abuses the wire protocol, not the values.

The value attacks of :mod:`byzsgd.roles.byzantine` forge *what* a Byzantine node sends; the
attacks here keep its values honest and play with *how, when, to whom and under which step or
rank* it sends them (docs/design.md §5: replays, far-future or out-of-range steps, floods, withholding,
a lying rendezvous master, attempts to pass as another rank).  Each one runs inside a real node
(``--attack NAME --attack_args JSON`` on ``byzsgd.roles.ps`` / ``byzsgd.roles.worker``, or the
launcher's ``--byz_workers/--worker_attack/--worker_attack_args`` and ``--byz_ps/--ps_attack/
--ps_attack_args``) and does on the wire what it says:

Which attacks exist, their roles, arguments, defaults and references: the attack catalog
(:mod:`byzsgd.attacks.protocol`; ``python -m byzsgd.attacks`` lists it).  What each does on the
wire, one class each below: ``impersonate`` (handshakes claiming other ranks, which must fail),
``request_flood`` (duplicate and old-step requests, gradients and pulls), ``huge_step`` (steps
2**62 - 1, t + 10**6, and out-of-range 2**63 - 1 / 2**64 - 1 written raw), ``far_future``
(models labelled t + ``ahead``), ``withhold_from`` (sends nothing to some ranks),
``rendezvous_lie`` (PS 0's rendezvous hands out a directory to a trap or swapped addresses for
``for_s`` s) and ``linger`` (a PS that keeps asking the workers after its last step and never
says done: docs/design.md §3, Liveness).  README.md's protocol-attack table gives each one's
arguments in full.

How: :func:`attach` installs a send filter on the node (``Node.add_send_filter``: it sees every
send, each recipient of a broadcast too) and a close hook (``Node.add_close_hook``), so the
role's own loop stays the honest one; the extra frames go out through the node's own outboxes
(encoded and limit-checked like any frame), except the out-of-range steps, which are queued as
raw bytes (``Node.send_bytes``).  ``rendezvous_lie`` filters the directory frames its
rendezvous sends.  Extra frames are sent *after* the real one so an outbox overflow drops the
attacker's own flood first... of its older items only (the outbox drops its oldest), which the
flood sizes keep below the outbox depth.

Every attack logs, at WARNING and at most every ``report_every`` steps (default 25) and at the end
of each impersonation round, one line ``protocol attack NAME: key=value ...`` with what it
did (frames sent per label, handshakes tried/refused/succeeded, trap hits); :func:`parse_report`
reads the last one back from a node's log.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgpack

from byzsgd.attacks import catalog
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError

log = logging.getLogger("byzsgd.protocol_attack")

#: name -> the roles that may run it (each attack's entry in the attack catalog,
#: byzsgd.attacks.protocol, declares its roles, arguments and checks)
PROTOCOL_ATTACKS = {e.name: e.roles for e in catalog.entries() if e.kind == "protocol"}

MAX_FRAME_STEP = (1 << 62) - 1     # the largest step a received frame may carry
INT64_MAX = (1 << 63) - 1          # encodable, refused by every receiver
UINT64_MAX = (1 << 64) - 1         # not even encodable by byzsgd: written raw
BEYOND_WINDOW = 10 ** 6

_DATA_KINDS = ("model", "ps_model", "grad")
_REPORT = re.compile(r"protocol attack (\w+): (.*)$")


def is_protocol_attack(name: str | None) -> bool:
    return catalog.is_protocol(name)


def names(role: str) -> list[str]:
    return catalog.names(role, kinds=("protocol",))


def parse_args(cfg: RunConfig) -> dict[str, Any]:
    """The attack's arguments with defaults; :class:`ConfigError` for a role, a rank or an
    argument the attack refuses (the catalog's checks, what ``RunConfig.validate`` runs)."""
    return catalog.parse(cfg)


def parse_report(text: str, name: str | None = None) -> dict[str, int] | None:
    """The counters of the last ``protocol attack NAME: k=v ...`` line of a log, or None."""
    found = None
    for line in text.splitlines():
        m = _REPORT.search(line)
        if m and (name is None or m.group(1) == name):
            found = {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", m.group(2))}
    return found


class ProtocolAttack:
    """One protocol attack running inside ``role`` (see the module docstring)."""

    def __new__(cls, cfg: RunConfig, role: Any):
        if cls is ProtocolAttack:  # the subclass the catalog names for cfg.attack
            cls = behaviour(cfg)
        return super().__new__(cls)

    def __init__(self, cfg: RunConfig, role: Any):
        self.cfg = cfg
        self.name = cfg.attack
        self.args = parse_args(cfg)
        self.role = role
        self.node = role.node
        self.counts: dict[str, int] = {}
        # every send (each recipient of a broadcast too) passes _intercept; _send is what
        # comes after it (the wire): the attack's own extra frames go out through it
        self._send = self.node.add_send_filter(self._intercept)
        self.node.add_close_hook(self._closing)  # a last report when the node closes
        self._steps_seen: set[int] = set()
        self._last_report = -1
        self._tasks: set[asyncio.Task] = set()
        self._imp_round = -1
        self._lingered = False

    # -- what a concrete attack overrides (the subclasses below; the catalog names them) ----
    def withhold(self, rank: int, kind: str) -> str | None:
        """A counter name when the frame ``kind`` to ``rank`` must not go out (None: send it)."""
        return None

    def after_send(self, rank: int, kind: str, step: int, tensors, meta) -> None:
        """Extra frames after a real data frame (``model``/``ps_model``/``grad``) went out."""

    def on_new_step(self, step: int) -> None:
        """The role's own traffic reached a new step label."""

    async def before_close(self) -> None:
        """The node is closing (the report and the close follow)."""

    # -- bookkeeping ----------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def report(self) -> None:
        body = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        log.warning("protocol attack %s: %s", self.name, body)

    async def _closing(self) -> None:
        """The node's close hook: a last report (and, for ``linger``, lingering first)."""
        await self.before_close()
        for task in list(self._tasks):
            task.cancel()
        lie = getattr(self, "_lie", None)
        if lie is not None and lie.trap is not None:
            lie.trap.close()
        self.report()

    def _on_step(self, step: int) -> None:
        """The role's own traffic reached ``step`` (called once per new step label)."""
        if step in self._steps_seen:
            return
        self._steps_seen.add(step)
        if len(self._steps_seen) > 4096:
            self._steps_seen = set(sorted(self._steps_seen)[-1024:])
        self.count("steps")
        self.on_new_step(step)
        if self.counts["steps"] - self._last_report >= self.args["report_every"]:
            self._last_report = self.counts["steps"]
            self.report()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the send hook -----------------------------------------------------------------
    def _intercept(self, rank: int, kind: str, step: int, tensors=(), meta=None):
        send = self._send
        internal = kind.startswith("__")
        withheld = None if internal else self.withhold(rank, kind)
        if withheld:
            self.count(withheld)
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(False)
            return fut
        fut = send(rank, kind, step, tensors, meta)
        if internal or rank == self.node.rank or kind not in _DATA_KINDS:
            return fut
        self._on_step(step)
        self.after_send(rank, kind, step, tensors, meta)
        return fut

    def _flood(self, rank, kind, step, tensors, meta) -> None:
        args, send = self.args, self._send
        copies, label = args["copies"], args["step"]
        if kind == "model":  # PS -> worker: the same request again, labelled ``label``
            for _ in range(copies):
                send(rank, kind, label, tensors, meta)
            self.count("flood_requests", copies)
        elif kind == "grad":  # worker -> PS: duplicates of this step, old steps, pulls
            for _ in range(copies):
                send(rank, kind, step, tensors, meta)
                send(rank, kind, label, tensors, meta)
            self.count("flood_grads", 2 * copies)
            if args["pull"]:
                for _ in range(copies):
                    send(rank, "pull", label, [])
                self.count("flood_pulls", copies)

    def _huge(self, rank, kind, step, tensors, meta) -> None:
        send = self._send
        send(rank, kind, MAX_FRAME_STEP, tensors, meta)
        send(rank, kind, step + BEYOND_WINDOW, tensors, meta)
        self.count("sent_max_frame_step")
        self.count("sent_beyond_window")
        if self.counts.get("steps", 0) % self.args["kill_every"] == 0 and not self._killed(rank, step):
            # out of the frame range: the receiver drops the connection at the first one, so the
            # kill rounds alternate between 2**63 - 1 (encoded) and 2**64 - 1 (written raw)
            self._kill_round = getattr(self, "_kill_round", 0) + 1
            if self._kill_round % 2:
                send(rank, kind, INT64_MAX, [], meta)
                self.count("sent_int64_max")
            elif self._write_raw(rank, _raw_frame(kind, UINT64_MAX, self.node.rank)):
                self.count("sent_uint64_max")

    def _killed(self, rank: int, step: int) -> bool:
        key = (rank, step)
        done = getattr(self, "_kills", None)
        if done is None:
            done = self._kills = set()
        if key in done:
            return True
        done.add(key)
        if len(done) > 4096:
            done.clear()
        return False

    def _write_raw(self, rank: int, data: bytes) -> bool:
        """Bytes as they are to ``rank``, if connected: queued in its outbox behind the
        frames already there (so the framing before them stays intact)."""
        if rank not in self.node.connected:
            return False
        self.node.send_bytes(rank, data)
        return True

    # -- lingering -----------------------------------------------------------------------
    async def _linger(self) -> None:
        """After the PS's last step: a gradient request to every worker every ``every``
        seconds for ``for_s`` seconds, each (``stride`` > 0) for a step not asked before.
        A signal (the role's ``stop``) ends it early: then the node closes as usual."""
        role, args, cfg = self.role, self.args, self.cfg
        step = args["start"] if args["start"] is not None else int(getattr(role, "step", 0))
        state = role.replica.state_vector()
        workers = list(cfg.worker_ranks)
        stop = getattr(role, "stop", None) or asyncio.Event()
        loop = asyncio.get_running_loop()
        end = loop.time() + args["for_s"]
        log.warning("protocol attack linger: PS %d keeps asking %d workers for gradients from "
                    "step %d, every %.3g s for %.3g s", cfg.rank, len(workers), step, args["every"],
                    args["for_s"])
        while not stop.is_set() and loop.time() < end:
            for w in workers:
                self._send(w, "model", step, [state])
            self.count("linger_requests", len(workers))
            self.count("linger_rounds")
            step += args["stride"]
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, min(args["every"], end - loop.time())))
            except asyncio.TimeoutError:
                pass

    # -- impersonation -------------------------------------------------------------------
    async def _impersonate(self) -> None:
        from byzsgd.net.testing import RawPeer

        node = self.node
        me, world = node.rank, node.world_size
        creds = node.credentials
        tried = 0
        for target in range(world):
            if target == me:
                continue
            host, port = node.directory[target]
            for claim in range(target + 1, world):  # only a higher rank may dial
                if claim == me or tried >= self.args["max_claims"]:
                    continue
                tried += 1
                self.count("tried")
                peer = None
                try:
                    peer = await asyncio.wait_for(RawPeer.connect(host, port), 5.0)
                    reply = await asyncio.wait_for(
                        peer.handshake(creds, claim, target, node.num_ps), 10.0)
                except (OSError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                        Exception) as exc:  # any failure is a refusal of the attempt
                    reply = {"err": type(exc).__name__}
                finally:
                    if peer is not None:
                        await peer.close()
                if reply.get("ok") is True:
                    self.count("succeeded")
                    log.error("protocol attack impersonate: rank %d passed as rank %d towards rank %d",
                              me, claim, target)
                else:
                    self.count("refused")
        self.report()


def _raw_frame(kind: str, step: int, sender: int) -> bytes:
    """A tensor-less frame whose header carries ``step`` whatever its range (msgpack uint64)."""
    from byzsgd.net.frame import PREFIX

    header = msgpack.packb([kind, step, sender, [], {}], use_bin_type=True)
    return PREFIX.pack(len(header), 0) + header


class RendezvousLie:
    """Rank 0's rendezvous hands out a lying directory (see the module docstring): a send
    filter of its own rewrites the directory frames the rendezvous sends while it lies."""

    def __init__(self, attack: ProtocolAttack):
        from byzsgd.net.rendezvous import DIR

        self.attack = attack
        self.node = node = attack.node
        if node.master is None:
            raise ConfigError("rendezvous_lie needs a rendezvous (--master, not --peers)")
        self._dir_kind = DIR
        self._send = node.add_send_filter(self._filter)  # past this filter: the wire
        self.trap: asyncio.AbstractServer | None = None
        self.trap_addr: tuple[str, int] | None = None
        self._opening = False
        self._held: set[int] = set()  # ranks whose directory waits for the trap to listen
        self._counting = False
        self.lying = True
        self._ended = False

    def _filter(self, rank: int, kind: str, step: int, tensors=(), meta=None):
        if kind != self._dir_kind or not self.lying:
            return self._send(rank, kind, step, tensors, meta)
        if self.attack.args["to"] == "self" and self.trap_addr is None:
            self._held.add(rank)  # the trap listens before the first lie goes out
            if not self._opening:
                self._opening = True
                self.attack._spawn(self._open_trap_then_lie())
            return None
        return self._send_lie([rank])[0]

    async def _open_trap_then_lie(self) -> None:
        host = self.node.directory[0][0]
        server = await asyncio.start_server(self._trap_conn, host, 0)
        self.trap = server
        self.trap_addr = (host, server.sockets[0].getsockname()[1])
        ranks, self._held = sorted(self._held), set()
        if self.lying:
            self._send_lie(ranks)

    def _send_lie(self, ranks) -> list:
        node, args = self.node, self.attack.args
        d = node.directory
        entries = [list(d[r]) for r in range(d.world_size)]
        victims = args["ranks"]
        if args["to"] == "self":
            for r in victims:
                entries[r] = list(self.trap_addr)
        else:  # each victim gets the next victim's real address
            for i, r in enumerate(victims):
                entries[r] = list(d[victims[(i + 1) % len(victims)]])
        blob = msgpack.packb(entries, use_bin_type=True)
        futs = [self._send(r, self._dir_kind, 0, meta={"dir": blob, "num_ps": d.num_ps}) for r in ranks]
        if not self._counting:  # the rendezvous sends a directory to each rank in one go: one lie
            self._counting = True
            asyncio.get_running_loop().call_soon(self._lied)
        return futs

    def _lied(self) -> None:
        self._counting = False
        self.attack.count("lies_sent")
        self.attack.report()
        if not self._ended and self.attack.args["for_s"] > 0:
            self._ended = True
            asyncio.get_running_loop().call_later(self.attack.args["for_s"], self._repent)

    def _repent(self) -> None:
        """The true directory, to everyone."""
        self.lying = False
        d = self.node.directory
        blob = msgpack.packb([list(d[r]) for r in range(d.world_size)], use_bin_type=True)
        for r in range(1, d.world_size):
            self._send(r, self._dir_kind, 0, meta={"dir": blob, "num_ps": d.num_ps})
        self.attack.count("truth_sent")
        self.attack.report()

    async def _trap_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer a hello as the rank the dialer wants, proving it with the only key rank 0
        holds for that dialer: K(0, dialer), not K(dialer, wanted)."""
        from byzsgd.net import handshake as hs
        from byzsgd.net.peers import role_of
        from byzsgd.net.protocol import HS_PREFIX, hs_pack, hs_unpack

        node = self.node
        self.attack.count("trap_hellos")
        try:
            (n,) = HS_PREFIX.unpack(await asyncio.wait_for(reader.readexactly(HS_PREFIX.size), 5))
            hello = hs_unpack(await asyncio.wait_for(reader.readexactly(n), 5))
            want, drank, nonce_d, to = hello.get("want"), hello.get("rank"), hello.get("nonce"), hello.get("to")
            if type(want) is not int or type(drank) is not int or not 0 < drank < node.world_size:
                return
            key = node.credentials.key(drank)
            nonce_l = hs.new_nonce()
            tr = hs.transcript(node.credentials.deployment, hello.get("role"), drank, nonce_d,
                               role_of(want, node.num_ps), want, nonce_l, to, b"")
            writer.write(hs_pack({"v": hs.PROTOCOL_VERSION, "dep": node.credentials.deployment,
                                  "role": role_of(want, node.num_ps), "rank": want, "nonce": nonce_l,
                                  "mac": hs.mac(key, True, tr)}))
            await writer.drain()
            (n,) = HS_PREFIX.unpack(await asyncio.wait_for(reader.readexactly(HS_PREFIX.size), 5))
            await asyncio.wait_for(reader.readexactly(n), 5)
            self.attack.count("trap_proofs_received")  # the dialer believed the trap: an impostor
            log.error("protocol attack rendezvous_lie: rank %d's dialer accepted the trap as rank %d",
                      drank, want)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError, Exception):
            self.attack.count("trap_refused")
        finally:
            writer.close()


# -- the behaviours the catalog's protocol entries name (byzsgd.attacks.protocol) ------------
class Impersonate(ProtocolAttack):
    def on_new_step(self, step: int) -> None:
        rnd = step // self.args["every"]
        if rnd != self._imp_round:
            self._imp_round = rnd
            self._spawn(self._impersonate())


class RequestFlood(ProtocolAttack):
    def after_send(self, rank, kind, step, tensors, meta) -> None:
        self._flood(rank, kind, step, tensors, meta)


class HugeStep(ProtocolAttack):
    def after_send(self, rank, kind, step, tensors, meta) -> None:
        self._huge(rank, kind, step, tensors, meta)


class FarFuture(ProtocolAttack):
    def after_send(self, rank, kind, step, tensors, meta) -> None:
        if kind in ("model", "ps_model"):
            self._send(rank, kind, step + self.args["ahead"], tensors, meta)
            self.count(f"sent_{kind}_ahead")


class WithholdFrom(ProtocolAttack):
    def withhold(self, rank: int, kind: str) -> str | None:
        return "withheld" if rank in self.args["ranks"] else None


class LyingRendezvous(ProtocolAttack):
    def __init__(self, cfg: RunConfig, role: Any):
        super().__init__(cfg, role)
        self._lie = RendezvousLie(self)


class Linger(ProtocolAttack):
    def withhold(self, rank: int, kind: str) -> str | None:
        return "done_withheld" if kind == "done" and not self.args["say_done"] else None

    async def before_close(self) -> None:
        if not self._lingered:
            self._lingered = True
            await self._linger()


def behaviour(cfg: RunConfig) -> type[ProtocolAttack]:
    """The class that runs ``cfg.attack`` (the catalog entry names it)."""
    return catalog.get(cfg.attack, cfg.role).load()


def attach(role: Any) -> ProtocolAttack | None:
    """Start ``role``'s protocol attack (``--attack NAME``), if it has one."""
    cfg = role.cfg
    if not is_protocol_attack(cfg.attack):
        return None
    attack = behaviour(cfg)(cfg, role)
    log.warning("Byzantine %s %d runs protocol attack %s %s", cfg.role, cfg.rank, cfg.attack,
                {k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in attack.args.items()})
    return attack
