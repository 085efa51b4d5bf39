"""The attack catalog: every attack a Byzantine node may run, value, PS and protocol alike.

One entry per attack and role.  An entry declares what the rest of the code asks about an
attack, so that nothing else keeps a list of attack names:

* its name, a one-line reference and the roles that may run it (worker, ps or both);
* its arguments, each with its default (a value, or :class:`Derived` from the run's
  configuration) and its check;
* what it needs: ``estimate`` (an estimate of the honest rows, not only its own gradient),
  ``rule`` / ``pipeline`` / ``quorum`` / ``seed`` (filled from the deployment), ``labels``
  (flipped training labels), ``wire`` (a hook on its node's sends), ``rendezvous`` (rank 0's
  directory), ``own`` (its row is built around the sender's own gradient, so colluding workers
  each forge their own instead of sending one row f times); and whether it may aim at the
  PS's momentum rows (``momentum``);
* its behaviour: a pure function here (value and PS forgeries), or a ``"module:attr"``
  reference to the behaviour a role runs (protocol attacks, in :mod:`byzsgd.roles`; a
  string, so this package never imports the roles).

:func:`check` is what ``RunConfig.validate`` runs; the roles take their arguments from
:func:`parse` and their behaviour from :func:`get`.  ``python -m byzsgd.attacks`` prints the
catalog.  Adding an attack is one module that calls :func:`register` (value attacks through
:func:`byzsgd.attacks.registry.register`) and one import of it in ``byzsgd/attacks/__init__``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from byzsgd.errors import ConfigError, UnknownNameError

CATALOG = "the attack catalog byzsgd.attacks (python -m byzsgd.attacks lists it)"
KINDS = ("value", "worker", "ps", "protocol")
ROLES = ("worker", "ps")
NEEDS = frozenset({"estimate", "rule", "pipeline", "quorum", "seed", "labels", "wire", "rendezvous",
                   "momentum", "own"})
#: what a worker entry sends in place of its honest gradient
SENDS = ("forged", "honest", "nothing")

Check = Callable[[Any, Any], Any]  # (value, cfg) -> the value to use; raises ValueError/TypeError


@dataclass(frozen=True)
class Derived:
    """A default computed from the node's configuration (``fn(cfg)``); ``text`` says how."""

    fn: Callable[[Any], Any]
    text: str

    def __repr__(self) -> str:
        return f"<{self.text}>"


@dataclass(frozen=True)
class Arg:
    """One argument of an attack (a key of ``--attack_args``)."""

    name: str
    default: Any = None
    check: Check = field(default=lambda v, cfg: v)
    doc: str = ""


@dataclass(frozen=True)
class Attack:
    """One catalog entry (see the module docstring)."""

    name: str
    kind: str  # value (a forging function), worker (a worker role behaviour), ps, protocol
    reference: str
    roles: tuple[str, ...]
    args: tuple[Arg, ...] = ()
    needs: frozenset[str] = frozenset()
    fn: Callable[..., Any] | None = None  # value: (honest [k,d], f, **args) -> [f,d]; ps: see attacks.ps
    behaviour: str | None = None  # "module:attr" of the role behaviour (protocol attacks)
    check: Callable[[dict, Any], None] | None = None  # cross-argument / deployment conditions
    sends: str = "forged"  # worker kinds: forged, honest (label_flip, honest) or nothing (silent)
    search: tuple[Callable[..., float], str, str] | None = None  # (factor search, attack, its argument)
    timing: str | None = None  # ps: "late" (delay) or "exit" (crash)

    @property
    def params(self) -> tuple[str, ...]:
        """The names of the attack's own arguments (not the role-wide ones)."""
        return tuple(a.name for a in self.args)

    @property
    def needs_rule(self) -> bool:
        return "rule" in self.needs

    def all_args(self) -> tuple[Arg, ...]:
        return self.args + _COMMON.get(self.kind, ((), None))[0]

    def load(self) -> Any:
        """The role behaviour this entry names (imported now, not when the catalog loads)."""
        if self.behaviour is None:
            raise ConfigError(f"attack {self.name!r} has no role behaviour")
        module, _, attr = self.behaviour.partition(":")
        return getattr(importlib.import_module(module), attr)

    def parse(self, given: dict, cfg: Any) -> dict[str, Any]:
        """``given`` completed with the defaults and checked: the arguments the behaviour runs
        with.  :class:`ConfigError` names the attack and the argument."""
        what = f"{_LABEL[self.kind]} {self.name!r}"
        if not isinstance(given, dict):
            raise ConfigError(f"{what}: --attack_args must be a JSON object, got {given!r}")
        args = {a.name: a for a in self.all_args()}
        unknown = sorted(set(given) - set(args))
        if unknown:
            raise ConfigError(f"{what}: unknown arguments {unknown}; known: {', '.join(args)} "
                              f"({CATALOG})")
        out = {}
        for name, arg in args.items():
            value = given[name] if name in given else arg.default
            if isinstance(value, Derived):
                value = value.fn(cfg)
            try:
                out[name] = arg.check(value, cfg)
            except ConfigError as exc:
                raise ConfigError(f"{what}: argument {name}: {exc}") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{what}: bad argument {name}={value!r} in {given}: {exc}") from None
        try:
            for check in (self.check, _COMMON.get(self.kind, ((), None))[1]):
                if check is not None:
                    check(out, cfg)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{what}: bad arguments {given}: {exc}") from None
        return out


_LABEL = {"value": "worker attack", "worker": "worker attack", "ps": "PS attack",
          "protocol": "protocol attack"}
_ENTRIES: dict[tuple[str, str], Attack] = {}
#: kind -> (arguments every entry of that kind takes, a check of them run after the entry's own)
_COMMON: dict[str, tuple[tuple[Arg, ...], Callable[[dict, Any], None] | None]] = {}


def register(entry: Attack) -> Attack:
    """Add ``entry`` under its name for each of its roles (a name is unique per role)."""
    if entry.kind not in KINDS:
        raise RuntimeError(f"attack {entry.name!r}: kind must be one of {KINDS}")
    if not entry.roles or set(entry.roles) - set(ROLES):
        raise RuntimeError(f"attack {entry.name!r}: roles must be among {ROLES}")
    if set(entry.needs) - NEEDS or entry.sends not in SENDS:
        raise RuntimeError(f"attack {entry.name!r}: needs must be among {sorted(NEEDS)}")
    if not entry.reference:
        raise RuntimeError(f"attack {entry.name!r}: no reference")
    if (entry.kind == "protocol") != (entry.behaviour is not None):
        raise RuntimeError(f"attack {entry.name!r}: a protocol attack, and only one, names a behaviour")
    for role in entry.roles:
        if (entry.name, role) in _ENTRIES:
            raise RuntimeError(f"attack {entry.name!r} registered twice for the {role}")
        _ENTRIES[(entry.name, role)] = entry
    return entry


def register_common(kind: str, args: Iterable[Arg], check: Callable[[dict, Any], None] | None = None) -> None:
    """The arguments every attack of ``kind`` takes (e.g. a worker's ``collude``)."""
    if kind in _COMMON:
        raise RuntimeError(f"common arguments of {kind} attacks registered twice")
    _COMMON[kind] = (tuple(args), check)


def common_args(kind: str) -> tuple[Arg, ...]:
    return _COMMON.get(kind, ((), None))[0]


def entries() -> list[Attack]:
    """Every entry once (one serving both roles appears once), in registration order."""
    seen: dict[int, Attack] = {}
    for entry in _ENTRIES.values():
        seen.setdefault(id(entry), entry)
    return list(seen.values())


def names(role: str | None = None, *, kinds: Iterable[str] = KINDS) -> list[str]:
    kinds = tuple(kinds)
    return sorted({n for (n, r), e in _ENTRIES.items() if (role is None or r == role) and e.kind in kinds})


def find(name: str | None, role: str) -> Attack | None:
    return _ENTRIES.get((name, role)) if name else None


def get(name: str, role: str) -> Attack:
    """The entry ``name`` for ``role``; :class:`UnknownNameError` lists that role's attacks."""
    entry = find(name, role)
    if entry is None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
        label = "worker" if role == "worker" else "PS"
        others = [n for n in ROLES if n != role and (name, n) in _ENTRIES]
        err = UnknownNameError(f"{label} attack", name, names(role, kinds=("value", "worker", "ps")))
        hint = f" ({name!r} is a {others[0]} attack)" if others else ""
        err.args = (f"{err.args[0]}; protocol attacks: {', '.join(names(role, kinds=('protocol',)))}"
                    f"{hint}: an unknown attack in {CATALOG}",)
        raise err
    return entry


def is_protocol(name: str | None, role: str | None = None) -> bool:
    """Whether ``name`` is a protocol attack (for ``role``, or for any role)."""
    return any(e.kind == "protocol" for (n, r), e in _ENTRIES.items()
               if n == name and (role is None or r == role))


def parse(cfg: Any) -> dict[str, Any]:
    """The arguments of ``cfg.attack`` for ``cfg``'s role, with defaults, checked."""
    role = "ps" if cfg.is_ps else "worker"
    entry = find(cfg.attack, role)
    if entry is None and is_protocol(cfg.attack):
        other = next(e for (n, _), e in _ENTRIES.items() if n == cfg.attack)
        raise ConfigError(f"protocol attack {cfg.attack!r} is for {' and '.join(other.roles)} "
                          f"nodes, rank {cfg.rank} is a {role}")
    if entry is None:
        get(cfg.attack, role)  # raises, naming the known attacks
    return entry.parse(dict(cfg.attack_args), cfg)


def check(cfg: Any) -> None:
    """Refuse, before step 0, an attack ``cfg``'s role does not know or an argument it would
    refuse: what ``RunConfig.validate`` runs (the roles parse the same way, :func:`parse`)."""
    if cfg.attack:
        parse(cfg)


def describe() -> str:
    """The catalog in words: each entry, its roles, needs and arguments with defaults."""
    lines = []
    for kind in KINDS:
        group = sorted((e for e in entries() if e.kind == kind), key=lambda e: e.name)
        if not group:
            continue
        lines.append(f"{_LABEL[kind]}s ({kind}):")
        for e in group:
            needs = f" needs {', '.join(sorted(e.needs))};" if e.needs else ""
            args = ", ".join(f"{a.name}={a.default!r}" for a in e.args) or "-"
            lines.append(f"  {e.name:16} [{'+'.join(e.roles)}]{needs} args: {args}")
            lines.append(f"  {'':16} {e.reference}")
        common = common_args(kind)
        if common:
            lines.append(f"  every {kind} attack also takes: "
                         + ", ".join(f"{a.name}={a.default!r}" for a in common))
    return "\n".join(lines)


# -- argument checks (each returns the value to use) ----------------------------------------
def anything(value: Any, cfg: Any = None) -> Any:
    return value


def number(kind: type = float, lo: float | None = None, hi: float | None = None,
           *, optional: bool = False) -> Check:
    """A number (converted like ``kind(value)``), within [lo, hi] when given."""

    def check(value: Any, cfg: Any = None) -> Any:
        if value is None and optional:
            return None
        v = kind(value)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be in [{lo if lo is not None else '-inf'}, "
                             f"{hi if hi is not None else 'inf'}], got {value!r}")
        return v

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any, cfg: Any = None) -> Any:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    return check


def truth(value: Any, cfg: Any = None) -> bool:
    """A flag given as anything truthy (as ``bool(value)``)."""
    return bool(value)


def strict_bool(value: Any, cfg: Any = None) -> bool:
    if type(value) is not bool:
        raise ValueError(f"must be true or false, got {value!r}")
    return value


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,),
          "list": (list,), "None": (type(None),)}


def of_annotation(annotation: Any) -> Check:
    """The check an argument's annotation implies (``"float | None"``: a number or null);
    unannotated or unknown types accept anything (the forging function checks them)."""
    if isinstance(annotation, type) and annotation.__module__ == "builtins":
        annotation = annotation.__name__  # a module without ``from __future__ import annotations``
    elif not isinstance(annotation, str):
        annotation = str(annotation)  # int | None as a types.UnionType: "int | None"
    if not annotation:
        return anything
    parts = [p.strip().split("[")[0] for p in annotation.split("|")]
    if any(p not in _TYPES for p in parts):
        return anything
    allowed = tuple(t for p in parts for t in _TYPES[p])

    def check(value: Any, cfg: Any = None) -> Any:
        if isinstance(value, bool) and "bool" not in parts:
            raise TypeError(f"must be {annotation}, got {value!r}")
        if not isinstance(value, allowed):
            raise TypeError(f"must be {annotation}, got {value!r}")
        return value

    return check
