"""Protocol attacks: their names, roles, arguments and checks (the behaviours are roles').

A protocol attack keeps its values honest and abuses the wire (how, when, to whom, under which
step or rank it sends); what each one does is in :mod:`byzsgd.roles.protocol_attacks`, whose
behaviour class each entry names.  Every protocol attack also takes ``report_every``.
"""
from __future__ import annotations

from typing import Any

from byzsgd.attacks import catalog
from byzsgd.attacks.catalog import Arg, Attack, number, one_of, strict_bool
from byzsgd.net.frame import MAX_STEP

MAX_FRAME_STEP = MAX_STEP - 1  # the largest step a received frame may carry
_ROLES = "byzsgd.roles.protocol_attacks"
WIRE = frozenset({"wire"})


def _protocol(name: str, reference: str, roles: tuple[str, ...], behaviour: str, *args: Arg,
              needs: frozenset[str] = WIRE, check=None) -> None:
    """Register a protocol attack; ``behaviour``: a class of :mod:`byzsgd.roles.protocol_attacks`,
    or ``"module:Class"`` elsewhere (a :class:`~byzsgd.roles.protocol_attacks.ProtocolAttack`)."""
    where = behaviour if ":" in behaviour else f"{_ROLES}:{behaviour}"
    catalog.register(Attack(name, "protocol", reference, roles, args, needs,
                            behaviour=where, check=check, sends="honest"))


def _pull_default(value: Any, cfg: Any) -> bool:
    """Pulls too where PSes serve them (paper --sync), unless told."""
    return cfg.mode == "paper" and bool(getattr(cfg, "sync", False)) if value is None else bool(value)


def _other_ranks(value: Any, cfg: Any) -> frozenset[int]:
    if not isinstance(value, list) or not value or any(type(r) is not int for r in value):
        raise ValueError('needs {"ranks": [rank, ...]} (a non-empty list of ints)')
    bad = [r for r in value if not 0 <= r < cfg.world_size or r == cfg.rank]
    if bad:
        raise ValueError(f"ranks {bad} are not other ranks of this world of {cfg.world_size}")
    return frozenset(value)


def _lied_about(value: Any, cfg: Any) -> list[int]:
    ranks = value if value is not None else list(range(1, cfg.num_ps))
    if not isinstance(ranks, list) or any(type(r) is not int or not 0 < r < cfg.world_size for r in ranks):
        raise ValueError("ranks must be a list of ranks in [1, world_size)")
    return sorted(set(ranks))


def _rendezvous_master(args: dict, cfg: Any) -> None:
    if cfg.rank != 0 or cfg.peers:
        raise ValueError("only rank 0, as the rendezvous master (--master, no --peers), hands out "
                         "the directory")
    if args["to"] == "swap" and len(args["ranks"]) < 2:
        raise ValueError('"swap" needs at least two ranks')


catalog.register_common("protocol", (Arg("report_every", 25, number(int, 1),
                                          "steps between two report lines"),))

_protocol("impersonate", "Sybil / impersonation: handshakes claiming other ranks (docs/design.md §5)",
          ("ps", "worker"), "Impersonate",
          Arg("every", 50, number(int, 1), "steps between two rounds of claims"),
          Arg("max_claims", 64, number(int, 1), "claims per round"))
_protocol("request_flood", "Flooding: duplicate requests, gradients and pulls (docs/design.md §5)",
          ("ps", "worker"), "RequestFlood",
          Arg("copies", 8, number(int, 1, 64), "copies per real frame"),
          Arg("step", 0, number(int, 0, MAX_FRAME_STEP), "the step the copies are labelled"),
          Arg("pull", None, _pull_default, "worker: pulls too (default: in paper --sync mode)"))
_protocol("huge_step", "Out-of-range and far-beyond-window steps (docs/design.md §5)", ("ps", "worker"),
          "HugeStep", Arg("kill_every", 10, number(int, 1), "steps between two out-of-range frames"))
_protocol("far_future", "Models labelled with future steps (docs/design.md §5)", ("ps",), "FarFuture",
          Arg("ahead", 1000, number(int, 1, (1 << 61) - 1), "how far ahead"))
_protocol("withhold_from", "Selective omission: never sends to some ranks (docs/design.md §5)",
          ("ps", "worker"), "WithholdFrom",
          Arg("ranks", None, _other_ranks, "the ranks it never sends to"))
_protocol("rendezvous_lie", "A lying rendezvous master: a false directory (docs/design.md §5)", ("ps",),
          "LyingRendezvous",
          Arg("ranks", None, _lied_about, "the ranks lied about (default: every other PS)"),
          Arg("to", "self", one_of("self", "swap"), "where they are routed: a trap, or each other"),
          Arg("for_s", 10.0, number(float, 0.0), "seconds before the truth (0: never)"),
          needs=WIRE | {"rendezvous"}, check=_rendezvous_master)
_protocol("linger", "Liveness: a PS that keeps asking after its last step (docs/design.md §3)",
          ("ps",), "Linger",
          Arg("every", 2.0, number(float, 0.01, 3600.0), "seconds between two rounds of requests"),
          Arg("for_s", 60.0, number(float, 0.0, 86400.0), "seconds it lingers"),
          Arg("start", None, number(int, 0, MAX_FRAME_STEP - (1 << 32), optional=True),
              "the first step it asks (default: the step after its last)"),
          Arg("stride", 1, number(int, 0, 1 << 20), "steps between two requests' labels"),
          Arg("say_done", False, strict_bool, "whether its done goes out"))
