"""Command-line flags generated from dataclass fields: argparse is built here and only here.

A configuration dataclass declares each flag in its field's metadata (``flag(help, ...)``):
the field's name is the flag, its type says how the text is parsed, its default is the
flag's default.  From that one declaration come the parser (:func:`build_parser`), the
values of a parsed namespace (:func:`values_from`) and the argv that starts the same
configuration in another process (:func:`to_argv`) — so a flag cannot drift between the
node, the launcher, the experiment harness and the multi-host deployment.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Iterable

from byzsgd.errors import ConfigError

GARFIELD = "Garfield trainer.py flags"
BYZSGD = "byzsgd flags"
PAPER = "paper mode (--mode paper)"
DEPLOYMENT = "deployment"


#: who sets a flag (:attr:`Flag.scope`).  SHARED: the operator, one value for every node.
#: PER_RANK: the deployment, one value per rank (a launcher refuses it in the shared flags and
#: fills it for each rank).  LAUNCHER: the launcher's own; it never reaches a node.
SHARED, PER_RANK, LAUNCHER = "shared", "per_rank", "launcher"
SCOPES = (SHARED, PER_RANK, LAUNCHER)


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line, and who sets it."""

    help: str
    group: str = BYZSGD
    choices: tuple[str, ...] | None = None
    needs: str | None = None  # "paper" / "sync": a non-default value needs that mode
    switch: bool = False  # a bool given as a bare ``--name`` (store_true), e.g. --json
    scope: str = SHARED


def flag(help: str, *, group: str = BYZSGD, choices: Iterable[str] | None = None,
         needs: str | None = None, switch: bool = False, scope: str = SHARED) -> dict[str, Flag]:
    """Field metadata declaring a flag (``field(default=..., metadata=flag(...))``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return {"flag": Flag(help, group, tuple(choices) if choices else None, needs, switch, scope)}


def parse_bool(text: str | bool) -> bool:
    """Parse a boolean flag value properly ("false" is False, unlike ``bool("false")``)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


_PARSERS = {"int": int, "float": float, "bool": parse_bool, "dict": parse_json_object, "str": str}


def kind(f: dataclasses.Field) -> str:
    """The field's base type name: int, float, bool, dict or str (``X | None`` is X)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base = [t.strip() for t in text.split("|") if t.strip() != "None"][0]
    base = base.split("[")[0]
    if base not in _PARSERS:
        raise TypeError(f"field {f.name}: no flag parser for type {text!r}")
    return base


def flag_fields(cls) -> list[tuple[dataclasses.Field, Flag]]:
    """The fields of ``cls`` that are flags, in declaration order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def scoped(cls, scope: str) -> tuple[str, ...]:
    """The names of ``cls``'s flags of ``scope`` (:data:`PER_RANK`, ...), in field order: what
    the launchers fill per rank or keep to themselves, read from the declarations."""
    return tuple(f.name for f, fl in flag_fields(cls) if fl.scope == scope)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class _RaisingParser(argparse.ArgumentParser):
    """A parser for programmatic use: a bad flag raises ConfigError instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser(prog: str, description: str, classes: Iterable[type], *,
                 defaults: dict[str, Any] | None = None, raising: bool = False) -> argparse.ArgumentParser:
    """The parser of every flag field of ``classes`` (groups in first-seen order);
    ``defaults`` overrides the fields' defaults (the launcher's main-job settings)."""
    cls_ = _RaisingParser if raising else argparse.ArgumentParser
    parser = cls_(prog=prog, description=description,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(parser, classes, defaults=defaults)
    return parser


def add_flags(parser: argparse.ArgumentParser, classes: Iterable[type], *,
              defaults: dict[str, Any] | None = None, scope: str | None = None) -> None:
    """Add the flag fields of ``classes`` (only those of ``scope`` when given) to ``parser``."""
    defaults = defaults or {}
    groups: dict[str, Any] = {}
    for cls in classes:
        for f, fl in flag_fields(cls):
            if scope is not None and fl.scope != scope:
                continue
            if fl.group not in groups:
                groups[fl.group] = parser.add_argument_group(fl.group)
            if fl.switch:
                groups[fl.group].add_argument(f"--{f.name}", action="store_true", help=fl.help)
                continue
            parse = _PARSERS[kind(f)]
            groups[fl.group].add_argument(
                f"--{f.name}", type=parse, choices=fl.choices, help=fl.help,
                default=defaults[f.name] if f.name in defaults else default_of(f))


def values_from(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The flag values of ``cls`` in ``args`` that were given or have a default (not None)."""
    return {f.name: getattr(args, f.name) for f, _ in flag_fields(cls)
            if getattr(args, f.name, None) is not None}


def format_value(value: Any) -> str:
    """A field's value as flag text that its parser reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_argv(obj: Any, *, skip: Iterable[str] = (), only: Iterable[str] | None = None) -> list[str]:
    """``--name value`` for every flag field of ``obj`` that is not None (in field order),
    but those in ``skip`` and, when given, those not in ``only``."""
    skip, only = set(skip), None if only is None else set(only)
    argv: list[str] = []
    for f, fl in flag_fields(type(obj)):
        value = getattr(obj, f.name)
        if f.name in skip or value is None or (only is not None and f.name not in only):
            continue
        if fl.switch:
            argv += [f"--{f.name}"] if value else []
        else:
            argv += [f"--{f.name}", format_value(value)]
    return argv


def flag_values(obj: Any) -> dict[str, Any]:
    """Every flag field of ``obj`` by name, None included: a configuration as data (JSON), so
    that the reader needs no default of its own to rebuild the same object."""
    return {f.name: getattr(obj, f.name) for f, _ in flag_fields(type(obj))}


def read_values(cls, values: dict[str, Any]) -> dict[str, Any]:
    """:func:`flag_values` read back: each value checked (and text parsed) as its flag's
    (:func:`coerce`), an unknown name refused."""
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    return {name: coerce(cls, name, value) for name, value in values.items()}


def coerce(cls, name: str, value: Any) -> Any:
    """A value from a config file (TOML/YAML/JSON) as field ``name`` of ``cls`` holds it:
    text goes through the flag's own parser, an int is a float where a float is due."""
    f = next((f for f, _ in flag_fields(cls) if f.name == name), None)
    if f is None:
        raise ConfigError(f"{cls.__name__} has no flag field {name!r}")
    k = kind(f)
    fl = f.metadata["flag"]
    if value is None:
        return None
    if isinstance(value, str) and k != "str":
        try:
            value = _PARSERS[k](value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            msg = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"invalid {k} value: {value!r}"
            raise ConfigError(f"{name}: {msg}") from None
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "dict": lambda v: isinstance(v, dict),
          "str": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool)}[k]
    if not ok(value):
        raise ConfigError(f"{name}: expected {'a JSON object' if k == 'dict' else 'a ' + k}, got {value!r}")
    if k == "float":
        value = float(value)
    elif k == "str":
        value = str(value)
    if fl.choices and value not in fl.choices:
        raise ConfigError(f"{name}: invalid choice {value!r} (choose from {', '.join(fl.choices)})")
    return value


def split_argv(argv: list[str]) -> dict[str, str | None]:
    """``--name value`` / ``--name=value`` pairs (last wins); a flag with no value maps to None.
    For callers that must look at a few flags of an argv they hand on whole."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("--"):
            raise ConfigError(f"expected a --flag, got {word!r} (in {' '.join(argv)!r})")
        name, sep, value = word[2:].partition("=")
        if sep:
            out[name] = value
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[name] = argv[i + 1]
            i += 2
        else:
            out[name] = None
            i += 1
    return out
