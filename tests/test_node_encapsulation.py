"""Issue 26: the transport is used through its public API, never patched from outside.

Outside ``byzsgd/net/`` (in ``byzsgd/`` and ``scripts/``) nothing assigns to a ``Node`` method
(``node.send = ...``: how protocol attacks used to intercept sends) and nothing reads a
private attribute of a ``Node`` or a ``Connection`` (``node._conns``, ``node._rdv``...).  The
private names are read from the classes themselves, so a new one is covered at once.  The scan
is checked against the patterns it must catch, and the send filter / close hook that replaced
them are exercised on live nodes.
"""
from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from byzsgd.errors import ConfigError
from byzsgd.net import FrameLimits, Node, NodeOptions
from byzsgd.net.peers import PeerDirectory, free_ports
from byzsgd.net.protocol import Connection

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"encapsulation-test-secret-bytes!"
LIMITS = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)


def _private_names() -> set[str]:
    """Every ``_name`` (not dunder) a Node or a Connection has: methods, class attributes and
    what their code assigns to ``self._name``."""
    names = {n for cls in (Node, Connection) for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
    for path in (ROOT / "byzsgd/net/node.py", ROOT / "byzsgd/net/protocol.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                names.add(node.attr)
    return names


PRIVATE = _private_names()
METHODS = {n for n in dir(Node) if not n.startswith("__") and callable(getattr(Node, n, None))}


def _node_like(expr: ast.expr) -> bool:
    """``node``, ``self.node``, ``role.node``, ``nodes[0]``, ``master_node``...: an expression
    that names a node (what a method assignment would patch)."""
    while isinstance(expr, ast.Subscript):
        expr = expr.value
    name = expr.attr if isinstance(expr, ast.Attribute) else expr.id if isinstance(expr, ast.Name) else ""
    return "node" in name.lower()


def violations(source: str, where: str = "<src>") -> list[str]:
    """What ``source`` does to a Node from outside the transport (empty: nothing)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append(f"{where}:{node.lineno}: reads private {ast.unparse(node)}")
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and el.attr in METHODS and _node_like(el.value):
                    out.append(f"{where}:{node.lineno}: assigns to the Node method {ast.unparse(el)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in METHODS and _node_like(node.args[0])):
            out.append(f"{where}:{node.lineno}: setattr on the Node method {node.args[1].value}")
    return out


def _outside_net() -> list[Path]:
    files = [p for p in (ROOT / "byzsgd").rglob("*.py") if "net" not in p.relative_to(ROOT / "byzsgd").parts[:1]]
    return files + sorted((ROOT / "scripts").rglob("*.py"))


def test_the_scan_catches_what_patching_the_transport_looks_like():
    bad = """
class Attack:
    def __init__(self, role):
        self._send = role.node.send
        role.node.send = self._intercept
        self.node.close = self._closing
        setattr(self.node, "broadcast", None)
        conn = self.node._conns.get(1)
        rdv = node._rdv
        d = nodes[0]._directory
        conn._hs_waiter.cancel()
        self._private = 1
"""
    found = violations(bad)
    assert len(found) == 7, found
    assert not violations("self.send = send\nself._tasks = set()\nnode.send(1, 'm', 0)\nx = node.connection(1).tls\n")


def test_nothing_outside_the_transport_patches_a_node_or_reads_its_privates():
    assert {"_conns", "_rdv", "_directory", "_peers", "_dispatch", "queue"} - {"queue"} <= PRIVATE
    assert {"send", "close", "broadcast", "add_send_filter"} <= METHODS
    found = [v for p in _outside_net() for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "\n".join(found)


def test_the_transport_has_no_code_for_its_attackers():
    for p in (ROOT / "byzsgd/net").glob("*.py"):
        assert "__dict__" not in p.read_text(), p


# -- the hooks that replaced the patching, on live nodes ----------------------------------------
def _pair():
    ports = free_ports(2)
    d = PeerDirectory({0: ("127.0.0.1", ports[0]), 1: ("127.0.0.1", ports[1])}, 1)
    return [Node(r, d.role(r), SECRET, directory=d, limits=LIMITS, listen_host="127.0.0.1") for r in (0, 1)]


class _Recorder:
    """A handler that keeps (step, meta) of every frame and wakes whoever waits for one."""

    def __init__(self):
        self.got: dict[int, dict] = {}
        self.changed: asyncio.Event | None = None

    def __call__(self, msg) -> None:
        self.got[msg.step] = dict(msg.meta)
        msg.release()
        self.changed.set()

    async def wait(self, step: int, timeout: float = 10.0) -> dict:
        async with asyncio.timeout(timeout):
            while step not in self.got:
                self.changed.clear()
                await self.changed.wait()
        return self.got[step]


def test_send_filters_withhold_add_and_rewrite_every_send_broadcasts_included():
    async def main():
        a, b = _pair()
        rec = _Recorder()
        rec.changed = asyncio.Event()
        b.on("m", rec)
        seen = []

        def first(rank, kind, step, tensors=(), meta=None):
            seen.append(("first", kind, step))
            if step == 13:
                return None  # withheld: the caller's future resolves False
            fut = proceed_first(rank, kind, step, tensors, meta)
            if step == 1:
                proceed_first(rank, kind, 1000 + step, tensors, meta)  # an extra frame, after it
            return fut

        def second(rank, kind, step, tensors=(), meta=None):
            seen.append(("second", kind, step))
            return proceed_second(rank, kind, step, tensors, {"tag": "second"})

        proceed_first = a.add_send_filter(first)
        proceed_second = a.add_send_filter(second)
        await a.start()
        await b.start()
        try:
            assert await a.wait_connected({1}, 10) == {1}
            assert await a.send(1, "m", 1, [])
            assert not await a.send(1, "m", 13, [])
            assert await asyncio.gather(*a.broadcast([1], "m", 2, [])) == [True]
            assert await rec.wait(1001) == {"tag": "second"}  # the extra frame passed the later filter
            assert await rec.wait(2) == {"tag": "second"}     # so did the broadcast
            assert ("first", "m", 13) in seen and ("second", "m", 13) not in seen and 13 not in rec.got
            assert ("second", "m", 1001) in seen  # proceed: the filters after it, then the wire
            a.remove_send_filter(second)
            assert await a.send(1, "m", 3, [])
            assert await rec.wait(3) == {}
            with pytest.raises(ConfigError):
                a.add_send_filter(first)  # installed once
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_a_filter_error_reaches_the_sender_and_a_bad_result_is_a_type_error():
    async def main():
        a, b = _pair()
        a.add_send_filter(lambda rank, kind, step, tensors=(), meta=None: 1 / 0 if step == 1 else True)
        await a.start()
        try:
            with pytest.raises(ZeroDivisionError):
                a.send(1, "m", 1)
            with pytest.raises(TypeError, match="not a future or None"):
                a.broadcast([1], "m", 2)
        finally:
            await a.close()
    asyncio.run(main())


def test_close_hooks_run_once_before_the_drain_and_their_errors_are_contained():
    async def main():
        a, b = _pair()
        calls = []

        async def hook():
            calls.append(("hook", a.closing))
            assert await a.send(1, "m", 5, [])  # the node still works inside its close hook

        def failing():
            raise RuntimeError("boom")

        box = b.mailbox("m")
        a.add_close_hook(failing)
        a.add_close_hook(hook)
        await a.start()
        await b.start()
        try:
            assert await a.wait_connected({1}, 10) == {1}
            await a.close(drain_timeout=1.0)
            await a.close()
            assert calls == [("hook", False)]
            assert a.stats.failures["close_hook:RuntimeError"] == 1
            assert set(await box.collect(5, 1, timeout=10)) == {0}
        finally:
            await a.close()
            await b.close()
    asyncio.run(main())


def test_options_are_checked_once_and_a_node_can_be_built_from_them():
    d = PeerDirectory({0: ("127.0.0.1", 1), 1: ("127.0.0.1", 2)}, 1)
    opts = NodeOptions(rank=1, role="worker", secret=SECRET, directory=d, limits=LIMITS, peer_roles=["ps"])
    assert opts.world_size == 2 and opts.num_ps == 1 and opts.peer_roles == frozenset({"ps"})
    assert opts.credentials.rank == 1 and opts.legacy_secret and not hasattr(opts, "secret")
    node = Node.from_options(opts)
    assert node.rank == 1 and node.world_size == 2 and node.options is opts
    with pytest.raises(ConfigError, match="outbox_depth"):
        NodeOptions(rank=1, role="worker", secret=SECRET, directory=d, limits=LIMITS, outbox_depth=0)
    with pytest.raises(ConfigError, match="is a ps"):
        Node(0, "worker", SECRET, directory=d, limits=LIMITS)
    with pytest.raises(TypeError):
        Node(0, "ps", SECRET, directory=d, limits=LIMITS, no_such_option=1)
