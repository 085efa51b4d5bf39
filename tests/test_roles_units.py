"""Units of the roles: the model quorum, Byzantine behaviours, fork spawning."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.net import Message
from byzsgd.net import errors as net_errors
from byzsgd.roles.byzantine import PS_ATTACKS, PSAttack, WorkerAttack, worker_attack_names
from byzsgd.roles.newest import NewestModels


def msg(sender: int, step: int, value: float = 0.0) -> Message:
    return Message(kind="ps_model", step=step, sender=sender, tensors=[torch.full((3,), value)], meta={})


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------------------- NewestModels
def test_keeps_only_the_newest_model_per_sender():
    box = NewestModels("ps_model", [1, 2, 3])
    assert box.deliver(msg(1, 5))
    assert not box.deliver(msg(1, 5))  # same step twice: counted once
    assert not box.deliver(msg(1, 4))  # older: dropped
    assert box.deliver(msg(1, 7))
    assert not box.deliver(msg(9, 7))  # not a peer
    assert {s: m.step for s, m in box.newest.items()} == {1: 7}


def test_gather_completes_with_first_q_senders_at_step_or_later():
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(3, 10))
        box.deliver(msg(1, 9))  # too old for step 10
        task = asyncio.ensure_future(box.gather(2, 10))
        await asyncio.sleep(0)
        assert not task.done()
        box.deliver(msg(2, 11))
        got = await asyncio.wait_for(task, 1)
        assert sorted(got) == [2, 3] and min(m.step for m in got.values()) == 10
        assert 1 not in box.newest  # forgotten: older than the gathered step
    run(main())


def test_gather_timeout_lists_who_answered_and_keeps_them():
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(1, 4))
        with pytest.raises(net_errors.QuorumTimeout) as err:
            await box.gather(2, 4, timeout=0.05)
        assert sorted(err.value.received) == [1]
        box.deliver(msg(2, 4))
        got = await box.gather(2, 4, timeout=1)
        assert sorted(got) == [1, 2]
    run(main())


def test_a_byzantine_far_future_step_cannot_choose_the_jump():
    """With q > f, the step to continue from is bounded by a correct sender's step."""
    async def main():
        box = NewestModels("ps_model", [1, 2, 3])
        box.deliver(msg(3, 10**9))  # Byzantine
        assert not box.ready(2, 11)  # one sender ahead is not enough to jump
        box.deliver(msg(1, 40))  # a correct peer really ahead
        assert box.ready(2, 11)
        got = await box.gather(2, 11)
        assert min(m.step for m in got.values()) == 40
    run(main())


def test_wait_ready_and_close():
    async def main():
        box = NewestModels("ps_model", [1, 2])
        fut = box.wait_ready(2, 3)
        box.deliver(msg(1, 3))
        assert not fut.done()
        box.deliver(msg(2, 5))
        await asyncio.wait_for(fut, 1)
        pending = asyncio.ensure_future(box.gather(2, 100))
        await asyncio.sleep(0)
        box.close()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert not box.deliver(msg(1, 200))
    run(main())


def test_released_when_superseded():
    released = []
    box = NewestModels("ps_model", [1])
    first, stale = msg(1, 2), msg(1, 1)
    first.release = lambda: released.append("first")
    stale.release = lambda: released.append("stale")
    box.deliver(first)
    box.deliver(stale)  # older than what it holds: dropped, its buffer given back
    box.deliver(msg(1, 3))  # supersedes the first
    assert released == ["stale", "first"]


# ---------------------------------------------------------------------------- PS attacks
def ps_attack(name: str, **args) -> PSAttack:
    return PSAttack(RunConfig(num_ps=4, num_workers=7, fps=1, fw=1, attack=name, attack_args=args,
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
    cfg = RunConfig(rank=10, num_ps=4, num_workers=7, fps=1, fw=1, attack=name, attack_args=args)
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
    assert dropped == 1 and torch.equal(out, torch.tensor([2.0, 2.0]))  # not biased to 2.5
    kept_in, dropped = aggregate_finite("median", rows, 1, drop_nonfinite=False)
    assert dropped == 0 and torch.equal(kept_in, torch.tensor([2.5, 2.5]))  # NaN orders as +inf
    # every row non-finite (a diverged model): the rule gets them all, nothing blocks
    out, dropped = aggregate_finite("average", torch.full((3, 2), float("inf")), 1)
    assert dropped == 0 and not torch.isfinite(out).any()
    # too few finite rows left for the rule's bound: everything goes to the rule
    out, dropped = aggregate_finite("krum", torch.cat([honest[:2], torch.full((3, 2), float("nan"))]), 1)
    assert dropped == 0


# ---------------------------------------------------------------------------- paper --sync
def test_gather_among_waits_for_that_sender():
    async def main():
        box = NewestModels("model", [0, 1, 2, 3])
        box.deliver(msg(1, 5))
        task = asyncio.ensure_future(box.gather(1, 5, among=(2,), forget_older=False))
        await asyncio.sleep(0)
        assert not task.done()  # PS 1's model does not answer a pull of PS 2
        box.deliver(msg(2, 4))  # too old
        await asyncio.sleep(0)
        assert not task.done()
        box.deliver(msg(2, 6))
        got = await asyncio.wait_for(task, 1)
        assert list(got) == [2] and got[2].step == 6 and 1 in box.newest
        with pytest.raises(net_errors.QuorumTimeout):
            await box.gather(1, 5, among=(3,), timeout=0.05)
    run(main())


class _RecordingNode:
    def __init__(self):
        self.sent = []

    def broadcast(self, ranks, kind, step, tensors, meta=None):
        self.sent += [(r, kind, step) for r in ranks]

    def send(self, rank, kind, step, tensors=(), meta=None):
        self.sent.append((rank, kind, step))


def test_ps_serves_pulls_once_it_reaches_the_step_and_bounds_them():
    from byzsgd.roles.ps import PULLS_PER_STEP, ParameterServer

    cfg = RunConfig(rank=0, mode="paper", sync=True, num_ps=4, fps=1, num_workers=7, fw=1,
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
