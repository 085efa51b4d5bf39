"""Units of the roles: Byzantine behaviours, fork spawning, pull serving, the diameter probe,
leaving."""
from __future__ import annotations

import asyncio
import math
import os
import sys

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.net import Message
from byzsgd.net import errors as net_errors
from byzsgd.roles.byzantine import PS_ATTACKS, PSAttack, WorkerAttack, worker_attack_names


def msg(sender: int, step: int, value: float = 0.0) -> Message:
    return Message(kind="ps_model", step=step, sender=sender, tensors=[torch.full((3,), value)], meta={})


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- PS attacks
def ps_attack(name: str, **args) -> PSAttack:
    return PSAttack(RunConfig(insecure_shared_secret=True, num_ps=4, num_workers=7, fps=1, fw=1, attack=name, attack_args=args,
                              num_iter=100))


def test_every_ps_attack_is_constructible_and_unknown_refused():
    for name in PS_ATTACKS:
        ps_attack(name)
    with pytest.raises(ConfigError, match="unknown PS attack"):
        ps_attack("teleport")
    with pytest.raises(ConfigError, match="unknown arguments"):
        ps_attack("stale", lagg=3)


def test_ps_attack_models():
    state = torch.arange(1.0, 1001.0)
    assert torch.equal(ps_attack("reverse", scale=2.0).model_for(4, "model", 0, state), -2 * state)
    assert torch.isnan(ps_attack("nan").model_for(4, "model", 0, state)).all()
    dropped = ps_attack("drop", fraction=0.3).model_for(4, "model", 0, state)
    assert 0.2 < float((dropped == 0).float().mean()) < 0.4
    assert ps_attack("silent").model_for(4, "model", 0, state) is None
    eq = ps_attack("equivocate")
    a, b, c = (eq.model_for(r, "model", 3, state) for r in (4, 5, 6))
    assert not torch.equal(a, c) and not torch.equal(a, b)  # a different model to each
    assert torch.equal(a, eq.model_for(4, "model", 3, state))  # deterministic per recipient
    stale = ps_attack("stale", lag=2)
    sent = [stale.model_for(4, "model", t, torch.full((3,), float(t))) for t in range(5)]
    assert [float(m[0]) for m in sent] == [0, 0, 0, 1, 2]  # replays the model of step t - 2


# ---------------------------------------------------------------------------- worker attacks
class FakeReplica:
    def extra_gradients(self, step, count):
        return [torch.full((4,), float(k + 2)) for k in range(count)]

    def other_workers_gradients(self, step):
        return [torch.full((4,), 5.0), torch.full((4,), 7.0)]


def worker_attack(name: str, **args) -> WorkerAttack:
    cfg = RunConfig(insecure_shared_secret=True, rank=10, num_ps=4, num_workers=7, fps=1, fw=1, attack=name, attack_args=args)
    return WorkerAttack(cfg, FakeReplica())


def test_worker_attack_names_cover_library_and_role_attacks():
    names = worker_attack_names()
    for name in ("alie", "ipm", "sign_flip", "drop", "label_flip", "silent", "optimal_alie"):
        assert name in names


def test_worker_attacks_forge_from_what_they_know():
    g = torch.ones(4)
    assert torch.equal(worker_attack("sign_flip").forge(g, 0), -g)
    assert worker_attack("silent").forge(g, 0) is None
    assert torch.equal(worker_attack("label_flip").forge(g, 0), g)  # data attack: gradient as is
    # IPM uses the mean of what it knows: its own gradient plus 3 extra batches (2, 3, 4)
    ipm = worker_attack("ipm", epsilon=1.0).forge(g, 0)
    assert torch.allclose(ipm, -torch.full((4,), (1 + 2 + 3 + 4) / 4))
    colluding = worker_attack("ipm", epsilon=1.0, collude=True).forge(g, 0)
    assert torch.allclose(colluding, -torch.full((4,), (1 + 5 + 7) / 3))


def test_unknown_worker_attack_refused():
    with pytest.raises(ConfigError, match="unknown attack"):
        worker_attack("teleport")


# ---------------------------------------------------------------------------- spawning
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork spawning is Linux-only")
def test_fork_node_runs_a_target_with_its_log_and_env(tmp_path):
    from byzsgd.deploy.spawn import fork_node

    def target():  # what the launcher forks: run_role(cfg) on the config it holds
        print("argv", sys.argv, os.environ.get("PROBE"), flush=True)
        print("sid", os.getsid(0) == os.getpid(), file=sys.stderr)
        return 7

    proc = fork_node(target, str(tmp_path / "log"), {"PROBE": "yes", "PATH": os.environ.get("PATH", "")},
                     name="probe")
    assert proc.wait(30) == 7
    out = (tmp_path / "log").read_text()
    assert "argv ['probe'] yes" in out and "sid True" in out


# ---------------------------------------------------------------------------- NaN/Inf rows
def test_nonfinite_rows_are_left_out_and_f_shrinks():
    from byzsgd.roles.aggregation import aggregate_finite

    honest = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    rows = torch.cat([honest, torch.full((1, 2), float("nan"))])
    out, dropped = aggregate_finite("median", rows, 1)
    assert dropped == [3] and torch.equal(out, torch.tensor([2.0, 2.0]))  # not biased to 2.5
    out, dropped = aggregate_finite("median", rows[[3, 0, 1, 2]], 1)
    assert dropped == [0]  # the index of the row left out, wherever it is
    kept_in, dropped = aggregate_finite("median", rows, 1, drop_nonfinite=False)
    assert dropped == [] and torch.equal(kept_in, torch.tensor([2.5, 2.5]))  # NaN orders as +inf
    # every row non-finite (a diverged model): the rule gets them all, nothing blocks
    out, dropped = aggregate_finite("average", torch.full((3, 2), float("inf")), 1)
    assert dropped == [] and not torch.isfinite(out).any()
    # too few finite rows left for the rule's bound: everything goes to the rule
    out, dropped = aggregate_finite("krum", torch.cat([honest[:2], torch.full((3, 2), float("nan"))]), 1)
    assert dropped == []


# ---------------------------------------------------------------------------- paper --sync
class _RecordingNode:
    def __init__(self):
        self.sent = []

    def broadcast(self, ranks, kind, step, tensors, meta=None):
        self.sent += [(r, kind, step) for r in ranks]

    def send(self, rank, kind, step, tensors=(), meta=None):
        self.sent.append((rank, kind, step))


def test_ps_serves_pulls_once_it_reaches_the_step_and_bounds_them():
    from byzsgd.roles.nodes import ParameterServer
    from byzsgd.roles.paper_sync import PULLS_PER_STEP

    cfg = RunConfig(insecure_shared_secret=True, rank=0, mode="paper", sync=True, num_ps=4, fps=1, num_workers=7, fw=1,
                    dataset="synthetic:1x28x28:10:64:64")
    ps = ParameterServer(cfg)
    node = ps.node = _RecordingNode()
    pull = lambda sender, step: Message(kind="pull", step=step, sender=sender, tensors=[], meta={})  # noqa: E731
    ps._on_pull(pull(4, 5))  # the PS is not at step 5 yet: the pull waits
    ps._on_pull(pull(2, 0))  # a PS does not pull
    assert node.sent == []
    snap = ps.replica.state_vector()
    ps._serve(5, snap)
    assert node.sent == [(4, "model", 5)]
    ps._on_pull(pull(5, 3))  # behind: gets the newest, step 5
    for _ in range(PULLS_PER_STEP + 3):  # a Byzantine worker pulling again and again
        ps._on_pull(pull(6, 5))
    assert node.sent[1:] == [(5, "model", 5)] + [(6, "model", 5)] * PULLS_PER_STEP
    ps._on_pull(pull(4, 5))  # the median's pull of worker 4: its second of the step
    ps._on_pull(pull(4, 5))
    assert node.sent.count((4, "model", 5)) == PULLS_PER_STEP
    node.sent.clear()
    ps._on_pull(pull(6, 6))
    ps._serve(6, snap)
    assert node.sent == [(6, "model", 6)]


# ---------------------------------------------------------------------------- roles by mode
SYNTH = "synthetic:1x28x28:10:64:64"


def test_each_mode_builds_its_own_classes_with_only_their_state():
    from byzsgd.roles import garfield, paper, paper_sync
    from byzsgd.roles.nodes import ParameterServer
    from byzsgd.roles.nodes import Worker

    base = dict(num_ps=4, fps=1, num_workers=7, fw=1, dataset=SYNTH)
    modes = {"garfield": dict(), "paper": dict(mode="paper"), "sync": dict(mode="paper", sync=True)}
    expected = {"garfield": (garfield.GarfieldPS, garfield.GarfieldWorker),
                "paper": (paper.PaperPS, paper.PaperWorker),
                "sync": (paper_sync.PaperSyncPS, paper_sync.PaperSyncWorker)}
    for name, extra in modes.items():
        ps = ParameterServer(RunConfig(insecure_shared_secret=True, rank=0, **base, **extra))
        worker = Worker(RunConfig(insecure_shared_secret=True, rank=5, **base, **extra))
        assert (type(ps), type(worker)) == expected[name]
        assert hasattr(ps, "probe") == (name != "garfield")
        assert hasattr(ps, "serving") == hasattr(worker, "filters") == (name == "sync")
        assert hasattr(worker, "pending") == (name == "garfield")
        assert hasattr(worker, "models") == hasattr(worker, "last_sent") == (name != "garfield")
    with pytest.raises(ConfigError, match="is a worker"):
        ParameterServer(RunConfig(insecure_shared_secret=True, rank=5, **base))
    with pytest.raises(ConfigError, match="is a parameter server"):
        Worker(RunConfig(insecure_shared_secret=True, rank=0, **base))


def test_paper_ps_gathers_every_period_garfield_every_step():
    from byzsgd.roles.nodes import ParameterServer

    base = dict(rank=0, num_ps=4, fps=1, num_workers=7, fw=1, dataset=SYNTH)
    garfield_ps = ParameterServer(RunConfig(insecure_shared_secret=True, **base))
    paper_ps = ParameterServer(RunConfig(insecure_shared_secret=True, mode="paper", gather_period=3, **base))
    assert all(garfield_ps._gathers_after(t) for t in range(6))
    assert [t for t in range(9) if paper_ps._gathers_after(t)] == [2, 5, 8]


# ---------------------------------------------------------------------------- diameter probe
class _Metrics:
    def __init__(self):
        self.records = []

    def write(self, **record):
        self.records.append(record)


def _after(sender: int, step: int, values, released=None) -> Message:
    m = Message(kind="ps_after", step=step, sender=sender, tensors=[torch.tensor(values)], meta={})
    if released is not None:
        m.release = lambda: released.append((sender, step))
    return m


def test_diameter_probe_before_after_and_late_distances():
    from byzsgd.roles.diameter import DiameterProbe

    sent, metrics, released = [], _Metrics(), []
    probe = DiameterProbe(0, [1, 2, 3], 2, lambda ranks, kind, step, state: sent.append((list(ranks), kind, step)),
                          metrics, measure_after=True)
    own = torch.tensor([0.0, 0.0, 9.0])  # the last coordinate is a buffer: not measured
    probe.start(4, own, {})
    assert probe.before == {} and probe.late_before == {}
    rows = torch.tensor([[0.0, 0.0, 9.0], [3.0, 4.0, 0.0], [6.0, 8.0, 0.0], [0.0, 1.0, 0.0]])
    probe.gathered(4, {1: 4, 2: 4, 3: 5}, rows)  # PS 3's model is of step 5: not compared
    assert probe.before == {"0-1": 5.0, "0-2": 10.0, "1-2": 5.0}
    probe.publish_after(4, torch.tensor([1.0, 1.0, 0.0]))
    assert sent == [([1, 2, 3], "ps_after", 4)] and metrics.records == []
    probe.deliver(_after(1, 4, [1.0, 4.0, 0.0], released))  # distance 3 to ours after
    probe.deliver(_after(1, 3, [0.0, 0.0, 0.0], released))  # older than what it holds: dropped
    probe.deliver(_after(2, 2, [0.0, 0.0, 0.0], released))  # an older gather's: consumed, unused
    probe.deliver(_after(9, 4, [0.0, 0.0, 0.0], released))  # not a peer: dropped
    assert released == [(1, 3), (9, 4)] and sorted(probe.after_inbox) == [1, 2]
    # the next gather: PS 3's model of step 4 came after the quorum (the model quorum holds it)
    late = {3: Message(kind="ps_model", step=4, sender=3, tensors=[torch.tensor([3.0, 4.0, 1.0])], meta={}),
            2: Message(kind="ps_model", step=7, sender=2, tensors=[torch.tensor([0.0, 0.0, 0.0])], meta={})}
    probe.start(7, torch.tensor([5.0, 5.0, 0.0]), late)
    assert probe.late_before == {"0-3": 5.0} and probe.before == {}
    probe.publish_after(7, torch.tensor([2.0, 2.0, 0.0]))
    assert metrics.records == [dict(event="diameter_after", step=4, distances={"0-1": 3.0},
                                    distances_before={"0-3": 5.0})]
    assert released[2:] == [(1, 4), (2, 2)] and probe.after_inbox == {}
    assert sent[-1] == ([1, 2, 3], "ps_after", 7) and probe.late_before == {}
    probe.deliver(_after(3, 7, [2.0, 5.0, 0.0], released))
    probe.finish({})  # the run ended: what came of the last gather
    assert metrics.records[-1] == dict(event="diameter_after", step=7, distances={"0-3": 3.0},
                                       distances_before={})
    probe.deliver(_after(1, 9, [0.0, 0.0, 0.0], released))
    probe.close()
    assert released[-1] == (1, 9) and probe.after_inbox == {}


def test_diameter_probe_without_after_measures_only_before():
    from byzsgd.roles.diameter import DiameterProbe

    sent, metrics = [], _Metrics()
    probe = DiameterProbe(2, [0, 1], 3, lambda *a: sent.append(a), metrics, measure_after=False)
    probe.start(0, torch.zeros(3), {0: Message(kind="ps_model", step=0, sender=0, tensors=[torch.ones(3)], meta={})})
    probe.gathered(0, {0: 0, 1: 0}, torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    assert probe.before == {"0-2": 1.0, "1-2": 2.0, "0-1": math.sqrt(5.0)}
    probe.publish_after(0, torch.zeros(3))
    probe.finish({})
    assert sent == [] and metrics.records == [] and probe.late_before == {}


# ---------------------------------------------------------------------------- serving order
def test_ps_serves_the_workers_in_a_rotating_order():
    """Every rank is served first once every n steps: no rank (the launcher's Byzantine ones
    are the last) is always served first or last."""
    from types import SimpleNamespace

    from byzsgd.roles.ps_base import PSBase, serving_order

    ranks = [3, 4, 5, 6]
    orders = [serving_order(ranks, t) for t in range(8)]
    assert all(sorted(o) == ranks for o in orders)
    assert [o[0] for o in orders] == [3, 4, 5, 6, 3, 4, 5, 6]
    assert serving_order([], 5) == []
    sent = []
    stub = SimpleNamespace(cfg=SimpleNamespace(worker_ranks=ranks),
                           gradients=SimpleNamespace(banned=set()),
                           _send_model=lambda r, kind, t, snap: sent.append((list(r), t)))
    resend = PSBase._request_gradients(stub, 6, "snapshot")
    assert sent == [([5, 6, 3, 4], 6)]
    resend([4])
    assert sent[-1] == ([4], 6)
    stub.gradients.banned.add(6)  # a worker caught forging (--check_gradients) is asked no more
    PSBase._request_gradients(stub, 6, "snapshot")
    assert sent[-1] == ([3, 4, 5], 6)
