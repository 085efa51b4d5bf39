"""The layers of ``byzsgd``, from the code's own imports (docs/design.md, "Map").

Every ``import`` and ``from ... import`` in every module counts, at module level or inside a
function (a lazy import is still a dependency: it only moves the moment it fails), and so do
imports under ``TYPE_CHECKING``.  Two rules:

* an import never runs back up: a module imports only modules of its own layer or below;
* no circle: the module graph has no cycle (within a layer either).

Fast (``ast`` only, nothing imported): it runs on every change.
"""
from __future__ import annotations

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "byzsgd"

#: lowest first; a module may import its own layer and those below.  A module is in the layer of
#: the longest prefix listed here (``byzsgd.roles.ps`` -> ``byzsgd.roles``); ``byzsgd`` itself
#: (the package's ``__init__``) is no prefix: a new top-level module must be placed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("byzsgd", "byzsgd.errors", "byzsgd.metrics", "byzsgd.device", "byzsgd.flags",
                    "byzsgd.rundir")),
    ("net", ("byzsgd.net",)),
    ("computation", ("byzsgd.gars", "byzsgd.attacks", "byzsgd.learning")),
    ("config", ("byzsgd.identity", "byzsgd.config_checks", "byzsgd.config")),
    ("roles", ("byzsgd.roles",)),
    ("deploy", ("byzsgd.deploy",)),
    ("experiments", ("byzsgd.experiments",)),
    ("entry points", ("byzsgd.launch", "byzsgd.report", "byzsgd.experiment", "byzsgd.trainer")),
]


def modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package ``__init__`` is
    the package's name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@functools.lru_cache(maxsize=None)
def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """Module -> the byzsgd modules it imports.  ``from pkg import name`` is an edge to
    ``pkg.name`` when that is a module, else to ``pkg``; a name that is no module of ours is
    resolved to its longest existing prefix."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in mods else base_name
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = prefix != "byzsgd" and module.startswith(prefix + ".")
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
            for mod, deps in sorted(graph.items()) for dep in sorted(deps)
            if layer_of(dep) > layer_of(mod)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS (and docs/design.md §2): {unplaced}"


def test_no_import_runs_back_up():
    assert upward_imports(import_graph()) == []


#: circles known and owned, each with what removes it; an entry must go once its circle has
#: (test_known_circles_still_exist), so this list only shrinks
KNOWN_CIRCLES: dict[frozenset[str], str] = {}


def test_no_import_circle():
    assert [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN_CIRCLES] == []


def test_known_circles_still_exist():
    present = {frozenset(c) for c in cycles(import_graph())}
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in present]
    assert not gone, f"remove these from KNOWN_CIRCLES, they are gone: {gone}"


def test_the_checks_see_what_they_must(tmp_path):
    """The graph takes function-level, relative and TYPE_CHECKING imports; both checks fire."""
    pkg = tmp_path / "byzsgd"
    for sub in ("net", "roles"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "net" / "a.py").write_text("def f():\n    from byzsgd.roles import b\n")
    (pkg / "roles" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                        "if TYPE_CHECKING:\n    from . import c\n")
    (pkg / "roles" / "c.py").write_text("from byzsgd.roles.b import x\nimport byzsgd.errors\n")
    graph = import_graph(pkg)
    assert graph["byzsgd.net.a"] == {"byzsgd.roles.b"}
    assert graph["byzsgd.roles.c"] == {"byzsgd.roles.b", "byzsgd.errors"}
    assert upward_imports(graph) == ["byzsgd.net.a (net) imports byzsgd.roles.b (roles)"]
    assert cycles(graph) == [["byzsgd.roles.b", "byzsgd.roles.c"]]


@pytest.mark.parametrize("module, layer", [("byzsgd.roles.ps", "roles"), ("byzsgd.config", "config"),
                                           ("byzsgd.configuration", None), ("byzsgd", "foundation")])
def test_layer_of_takes_the_longest_prefix(module, layer):
    index = layer_of(module)
    assert (LAYERS[index][0] if index is not None else None) == layer


def test_no_module_over_500_lines():
    """One concept per module (issue 26): a module that grows past 500 lines holds several."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
