"""What every worker attack takes, and the worker attacks that forge nothing.

Every worker attack (value or not) takes the role-wide arguments below: how a lone attacker
estimates the honest rows (``estimate``, ``estimate_batches``), ``collude`` (the omniscient
adversary), ``search_every`` (optimal_*), ``meta`` (what its frames' metadata carry instead of
the honest values) and ``momentum_aware`` (aim at the PS's per-worker momentum rows).  The
behaviour is :class:`byzsgd.roles.byzantine.WorkerAttack`.
"""
from __future__ import annotations

from typing import Any

from byzsgd.attacks import catalog
from byzsgd.attacks.catalog import Arg, Attack, number, one_of, truth
from byzsgd.errors import ConfigError


def forged_meta(meta: Any, cfg: Any = None) -> dict:
    """The ``meta`` argument: a map of str to what a frame's meta may carry (None, bool, a
    64-bit int, float, str), so that the attack fails at start, not at its first send."""
    if not isinstance(meta, dict):
        raise ConfigError(f"attack argument meta must be a JSON object, got {meta!r}")
    if len(meta) > 32:  # a frame's meta holds at most 64 (MAX_META_ITEMS), the loss included
        raise ConfigError(f"attack argument meta: {len(meta)} fields, at most 32")
    for key, value in meta.items():
        ok = value is None or type(value) in (bool, float, str) or (
            type(value) is int and -(1 << 63) <= value < (1 << 64))
        if not isinstance(key, str) or not ok:
            raise ConfigError(f"attack argument meta: {key!r}: {value!r} is not a frame's meta "
                              "value (null, bool, 64-bit int, float or string)")
    return dict(meta)


ARGS = (
    Arg("estimate", "history", one_of("history", "fresh"),
        "a lone attacker's extra rows: its previous steps' gradients, or fresh batches"),
    Arg("estimate_batches", 4, number(int, 1), "rows a lone attacker estimates from"),
    Arg("collude", False, truth, "the omniscient adversary: every worker's honest gradient"),
    Arg("search_every", 10, number(int, 1), "steps between two factor searches (optimal_*)"),
    Arg("meta", {}, forged_meta, "fields its frames' metadata carry instead of the honest ones"),
    Arg("momentum_aware", False, truth, "aim at the PS's per-worker momentum rows"),
)


def _check(args: dict, cfg: Any) -> None:
    if args["momentum_aware"]:
        entry = catalog.get(cfg.attack, "worker")
        scheduled = cfg.rank in cfg.scheduled_ranks
        if not (cfg.worker_momentum > 0 and (args["collude"] or scheduled)) or "momentum" not in entry.needs:
            raise ConfigError("attack argument momentum_aware needs --worker_momentum > 0, "
                              "collude: true or the adversarial schedule (it tracks the honest "
                              "momentums from the honest gradients) and a forging attack")


catalog.register_common("value", ARGS, _check)
catalog.register_common("worker", ARGS, _check)

catalog.register(Attack("label_flip", "worker", "Label flipping (data poisoning): the honest "
                        "computation on labels y -> C - 1 - y, e.g. Allen-Zhu et al., ICLR 2021",
                        ("worker",), needs=frozenset({"labels"}), sends="honest"))
catalog.register(Attack("silent", "worker", "Never answers: a crashed or partitioned worker",
                        ("worker",), sends="nothing"))
catalog.register(Attack("honest", "worker", "The honest gradient: with meta, a worker that lies "
                        "only in its metadata", ("worker",), sends="honest"))
