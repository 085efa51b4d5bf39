"""The attack catalog (byzsgd/attacks/catalog.py): one entry per attack and role, read by
``RunConfig.validate`` and by the roles; no other list of attack names.  Fast: no node runs."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from byzsgd.attacks import catalog
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
#: arguments without a usable default (the attack refuses to guess them)
REQUIRED = {"withhold_from": {"ranks": [1]}}


def _cfg(role: str, **kw) -> RunConfig:
    base = dict(num_ps=2, num_workers=3, fw=0, fps=0, rank=0 if role == "ps" else 2)
    return RunConfig(**{**base, **kw})


def test_every_entry_declares_reference_roles_checked_arguments_and_behaviour():
    entries = catalog.entries()
    assert {e.kind for e in entries} == set(catalog.KINDS)
    for e in entries:
        assert e.reference and e.roles and set(e.roles) <= {"worker", "ps"}, e
        assert e.needs <= catalog.NEEDS, e
        for arg in e.all_args():
            assert callable(arg.check), (e.name, arg.name)
        if e.kind == "protocol":
            from byzsgd.roles.protocol_attacks import ProtocolAttack

            assert issubclass(e.load(), ProtocolAttack), e.name
        else:
            assert callable(e.fn) or e.kind == "worker", e.name
        for role in e.roles:  # the defaults pass the checks: the attack runs with {} (or REQUIRED)
            cfg = _cfg(role, attack=e.name, attack_args=REQUIRED.get(e.name, {}))
            got = catalog.parse(cfg)
            assert set(got) == {a.name for a in e.all_args()}, e.name
            cfg.validate()


def test_config_refuses_an_unknown_attack_or_argument_naming_the_catalog():
    for role, name in (("worker", "alie"), ("worker", "silent"), ("ps", "stale"), ("ps", "far_future")):
        with pytest.raises(ConfigError, match=r"unknown arguments \['nope'\].*attack catalog"):
            _cfg(role, attack=name, attack_args={"nope": 1}).validate()
    with pytest.raises(ConfigError, match="unknown worker attack 'teleport'.*attack catalog byzsgd.attacks"):
        _cfg("worker", attack="teleport").validate()
    with pytest.raises(ConfigError, match="unknown PS attack 'label_flip'.*attack catalog"):
        _cfg("ps", attack="label_flip").validate()
    with pytest.raises(ConfigError, match="'far_future' is for ps nodes"):
        _cfg("worker", attack="far_future").validate()
    with pytest.raises(ConfigError, match="'stale': bad argument lag='soon'"):
        _cfg("ps", attack="stale", attack_args={"lag": "soon"}).validate()


def test_a_name_is_one_entry_per_role():
    assert catalog.get("silent", "worker").kind == "worker" and catalog.get("silent", "ps").kind == "ps"
    assert catalog.get("random", "worker").params == ("scale", "seed")
    assert catalog.get("random", "ps").params != catalog.get("random", "worker").params
    assert catalog.get("impersonate", "worker") is catalog.get("impersonate", "ps")


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_config_and_the_catalog_import_no_role():
    for path in [ROOT / "byzsgd" / "config.py", *(ROOT / "byzsgd" / "attacks").glob("*.py")]:
        assert not [m for m in _imports(path) if m.startswith("byzsgd.roles")], path


def test_the_roles_dispatch_on_no_attack_name():
    """Behaviours find what they run in the catalog: no ``name == "..."`` in the roles."""
    for rel in ("byzsgd/roles/byzantine.py", "byzsgd/roles/protocol_attacks.py"):
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any((isinstance(s, ast.Attribute) and s.attr in ("name", "attack"))
                        or (isinstance(s, ast.Name) and s.id == "name") for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str)
                          or isinstance(s, (ast.Tuple, ast.List, ast.Set)) for s in sides)
            assert not (named and literal), f"{rel}:{node.lineno}: {ast.unparse(node)}"
