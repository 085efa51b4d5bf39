"""Value attacks: how a forging function becomes an entry of the attack catalog.

A value attack is a pure function of what a Byzantine worker can see (its honest gradient,
or the step's honest gradients when colluding) returning the f vectors it sends.  Its module
decorates it with :func:`register`; the arguments, their defaults and checks come from the
function's own signature (the annotation, or ``checks=`` where a value needs more), and what
the deployment must supply is derived from their names (``gar``/``gar_f``/``gar_params``:
the rule, ``pipeline``, ``n``: the quorum, ``seed``).  See :mod:`byzsgd.attacks.catalog`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from byzsgd.attacks import catalog
from byzsgd.attacks.catalog import Arg, Attack, Derived
from byzsgd.errors import ConfigError, UnknownNameError

ForgeFn = Callable[..., torch.Tensor]


def _quorum(cfg: Any) -> int:
    """The rows the rule sees: the quorum's, or every worker's (--wm_rows recent)."""
    return cfg.num_workers if cfg.worker_momentum and cfg.wm_rows == "recent" else cfg.q_w


def _seed(cfg: Any) -> int:
    """Scheduled (coordinated) workers forge the same rows; the others their own."""
    return cfg.seed * 1000 + (0 if cfg.rank in cfg.scheduled_ranks else cfg.rank)


#: arguments the deployment supplies by default: name -> (need, default)
SUPPLIED = {
    "gar": ("rule", Derived(lambda cfg: cfg.gar, "--gar")),
    "gar_f": ("rule", Derived(lambda cfg: cfg.fw, "--fw")),
    "gar_params": ("rule", Derived(lambda cfg: dict(cfg.gar_args) or None, "--gar_args")),
    "pipeline": ("pipeline", Derived(lambda cfg: cfg.pre_agg, "--pre_agg")),
    "n": ("quorum", Derived(_quorum, "the rule's rows: q_w, or n_w with --wm_rows recent")),
    "seed": ("seed", Derived(_seed, "seed * 1000 + rank")),
    # the PSes' gradient check tolerance: public configuration, what a check-aware forger stays inside
    "check_tolerance": (None, Derived(lambda cfg: cfg.check_tolerance, "--check_tolerance")),
}


def register(name: str, *, reference: str, params: tuple[str, ...] = (), needs_rule: bool = False,
             needs_estimate: bool = False, own_row: bool = False, checks: dict[str, Callable] | None = None,
             search: tuple[Callable[..., float], str, str] | None = None):
    """Decorator: the forging function ``fn(honest [k, d], f, **params) -> [f, d]`` as the
    worker value attack ``name``.  ``needs_estimate``: it forges from the honest rows'
    statistics (a lone attacker then estimates them, :class:`byzsgd.roles.byzantine.WorkerAttack`);
    ``own_row``: its rows are built around ``honest[0]``, the sender's own gradient, so each
    Byzantine worker forges with its own first (need ``own``); ``search``: (factor search,
    attack, argument): the role runs the search every few steps and forges ``attack`` with the
    factor found (optimal_*)."""
    checks = dict(checks or {})

    def deco(fn: ForgeFn) -> ForgeFn:
        sig = inspect.signature(fn).parameters
        args, needs = [], ({"estimate"} if needs_estimate else set()) | ({"own"} if own_row else set())
        for p in params:
            if p not in sig:
                raise RuntimeError(f"attack {name!r}: parameter {p!r} is not in its signature")
            need, default = SUPPLIED.get(p, (None, sig[p].default))
            if need == "rule" and not needs_rule:
                need, default = None, sig[p].default
            if need:
                needs.add(need)
            args.append(Arg(p, default, checks.pop(p, None) or catalog.of_annotation(sig[p].annotation)))
        if checks:
            raise RuntimeError(f"attack {name!r}: checks for unknown parameters {sorted(checks)}")
        catalog.register(Attack(name, "value", reference, ("worker",), tuple(args),
                                frozenset(needs | {"momentum"}), fn=fn, search=search))
        return fn

    return deco


def get(name: str) -> Attack:
    """The value attack ``name`` (a forging function)."""
    entry = catalog.find(name, "worker")
    if entry is None or entry.kind != "value":
        raise UnknownNameError("attack", name, names())
    return entry


def names() -> list[str]:
    """The value attacks: those with a forging function."""
    return catalog.names("worker", kinds=("value",))


def forge(name: str, honest: torch.Tensor, f: int, **params) -> torch.Tensor:
    """Return the ``f`` vectors [f, d] that attack ``name`` sends, given ``honest`` [k, d]."""
    attack = get(name)
    if not isinstance(honest, torch.Tensor) or honest.dim() != 2 or honest.shape[0] < 1:
        raise ConfigError(f"attack {name!r}: honest must be a 2-D tensor [k>=1, d], got "
                          f"{getattr(honest, 'shape', type(honest))}")
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise ConfigError(f"attack {name!r}: f must be an int >= 1, got {f!r}")
    return attack.fn(honest, f, **params)
