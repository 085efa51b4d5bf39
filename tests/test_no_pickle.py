"""No pickle on the wire (README): nothing a peer sends is unpickled, unmarshalled, evaluated
or torch.load-ed.  The net package's source does not call them (nor marshal, eval, exec),
and a real deployment (the role classes, in this process) runs its steps with pickle and
torch.load made to raise (marshal and eval are left alone there: imports and the standard
library use them on code, not on what peers send; the source scan covers them)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

from byzsgd.metrics import read_metrics
from tests import inprocess

NET = Path(__file__).resolve().parent.parent / "byzsgd" / "net"
FORBIDDEN = re.compile(r"\b(pickle|cPickle|marshal|dill|shelve|torch\.load|numpy\.load|np\.load|eval|exec)\b")


def _code_lines(path: Path):
    """(line number, code) of a source file, comments and docstrings left out."""
    import ast
    import io
    import tokenize
    tree = ast.parse(path.read_text())
    doc_lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc_lines |= set(range(first.lineno, first.end_lineno + 1))
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.OP) and tok.start[0] not in doc_lines:
            yield tok.start[0], tok.string


def test_the_net_package_calls_no_deserializer_of_code():
    found = []
    for path in sorted(NET.glob("*.py")):
        names = [(n, s) for n, s in _code_lines(path)]
        for i, (line, name) in enumerate(names):
            dotted = name + "".join(s for _, s in names[i + 1:i + 3]) if name in ("torch", "np", "numpy") else name
            if FORBIDDEN.fullmatch(name) or FORBIDDEN.fullmatch(dotted):
                found.append(f"{path.name}:{line}: {dotted}")
    assert not found, found


def test_the_checker_finds_one(tmp_path):
    """The scan above is not blind: it finds a call in code (not in a docstring)."""
    bad = tmp_path / "bad.py"
    bad.write_text('"""pickle in a docstring is fine"""\nimport pickle\n\ndef f(b):\n    return pickle.loads(b)\n')
    assert [line for line, name in _code_lines(bad) if FORBIDDEN.fullmatch(name)] == [2, 5]


@pytest.mark.timeout(400)
def test_a_deployment_exchanges_steps_with_every_deserializer_disabled(tmp_path, monkeypatch):
    # the dataset is read (and cached in the process) before anything is patched: reading it
    # from disk is not the wire
    from byzsgd.learning import data
    data.load_dataset("mnist", train=True), data.load_dataset("mnist", train=False)
    calls = []

    def refuse(what):
        def raiser(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} called during a deployment")
        return raiser
    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, refuse(f"pickle.{name}"))

    class RefusingUnpickler(pickle.Unpickler):  # a class still (libraries subclass it at import)
        load = refuse("pickle.Unpickler.load")
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse("torch.load"))

    roles, codes = inprocess.deploy(tmp_path, monkeypatch, num_ps=2, num_workers=4, fw=1, fps=0,
                                    gar="median", num_iter=6, acc_freq=6, eval_samples=500)
    assert codes == {r: 0 for r in roles}, codes
    assert calls == []
    for ps in (0, 1):
        recs = [r for r in read_metrics(tmp_path / f"metrics-ps{ps}.jsonl") if "quorum" in r]
        assert [r["step"] for r in recs] == list(range(6))
        assert all(len(r["quorum"]) == 3 for r in recs)  # q_w = 4 - 1 gradients crossed the wire
        assert all(r.get("model_quorum") == [1 - ps] for r in recs)  # and the peer's model
