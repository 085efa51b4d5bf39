"""Issue 24, findings 1 and 3, and the pieces of the containment contract (docs/design.md §3):
the loss of a quorum is the median of its finite values, every field a member sends is
checked, an exception on one member's message stays with it, and every refusal reaches the
node's stats, the PS's done record and the run summary's ``rejections``."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.errors import ConfigError
from byzsgd.metrics import read_metrics
from byzsgd.net import Message
from byzsgd.roles.byzantine import WorkerAttack, check_attack
from byzsgd.roles.member_input import GradMeta, grad_meta, median_finite
from tests.member_cluster import TINY, Cluster

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------- the rules
def test_the_loss_of_a_quorum_is_the_median_of_its_finite_values():
    assert median_finite([1e308, 1e308, 0.5, 0.6, 0.7]) == 0.7  # between two correct values
    assert median_finite([1e308, 1e308]) == 1e308  # the mean of the middle pair cannot overflow
    assert median_finite([-1e308, 1e308]) == 0.0
    assert median_finite([float("nan"), float("inf"), 2.0, 1.0]) == 1.5
    assert median_finite([float("nan")]) is None and median_finite([]) is None


@pytest.mark.parametrize("meta, expected", [
    ({"loss": 0.25}, GradMeta(0.25, 0, ())),
    ({"loss": 3}, GradMeta(3.0, 0, ())),
    ({"loss": (1 << 64) - 1}, GradMeta(float((1 << 64) - 1), 0, ())),
    ({"loss": 1e308, "rejected": 2}, GradMeta(1e308, 2, ())),
    ({"loss": float("nan")}, GradMeta(None, 0, ("loss",))),
    ({"loss": float("-inf"), "rejected": 5}, GradMeta(None, 0, ("loss", "rejected"))),
    ({"loss": True, "rejected": True}, GradMeta(None, 0, ("loss", "rejected"))),
    ({"loss": "0.5", "rejected": -1}, GradMeta(None, 0, ("loss", "rejected"))),
    ({"loss": b"\x00", "rejected": 2.0}, GradMeta(None, 0, ("loss", "rejected"))),
    ({"loss": None, "other": float("nan")}, GradMeta(None, 0, ())),
    ({}, GradMeta(None, 0, ())),
    ("not a map", GradMeta(None, 0, ("meta",))),
])
def test_each_gradient_meta_field_is_checked(meta, expected):
    assert grad_meta(meta, num_ps=4) == expected


# ------------------------------------------------------------------------- finding 1
def _ps(tmp_path, **config) -> Cluster:
    return Cluster(tmp_path, 0, num_ps=1, num_workers=7, fw=2, fps=0, **config)


def test_a_step_whose_quorum_reports_two_1e308_losses_is_recorded_with_their_median(tmp_path):
    """Before: statistics.fmean([1e308, 1e308, ...]) raised OverflowError out of the step
    loop and every correct PS exited 1."""
    ps = _ps(tmp_path, num_iter=10, acc_freq=100).role
    ps._record(0, 1, 0.01, [1e308, 1e308, 0.5, 0.6, 0.7], {})
    (rec,) = [r for r in read_metrics(ps.cfg.metrics) if r.get("step") == 0]
    assert rec["loss"] == 0.7


def test_an_exception_on_one_members_message_stays_with_it(tmp_path):
    role = _ps(tmp_path, num_iter=10).role
    msg = Message("grad", 3, 5, [], {"loss": 1.0})
    for _ in range(2):
        with role.member(msg):
            raise OverflowError("intermediate overflow in fsum")
    assert role.node.stats.failures == {"member:grad:OverflowError": 2}


# ------------------------------------------------------------------------- finding 3
def test_every_refusal_reaches_the_node_the_done_record_and_the_summary(tmp_path):
    """A worker sending kinds it may not send and a loss that is not a number: counted by
    reason, kind and sender in the node's stats, the PS's done record and the summary's
    ``rejections`` (before: ``{}``, the refusals were only in ``stats.refused``)."""
    c = _ps(tmp_path, num_iter=2, acc_freq=2)
    ps = c.role
    log = tmp_path / "rank0.log"  # where deployment.json says rank 0 logs

    async def run():
        await c.start()
        for step in range(2):
            await c.wait_for(lambda: any(k == "model" and s == step for k, _, s, _, _ in c.received[1]),
                             30, f"the request of step {step}")
            if step == 0:
                for _ in range(3):
                    c.members[7].send(0, "done", 0)
                c.members[7].send(0, "ps_ask", 0)
                c.members[6].send(0, "ps_model", 0, [torch.zeros(ps.replica.state_size)])
                c.members[6].send(0, "grad", 0, [torch.zeros(ps.replica.grad_size)], {"loss": "x"})
            for r in (7, 1, 2, 3, 4, 5):  # the NaN liar first: in every quorum
                c.members[r].send(0, "grad", step, [torch.zeros(ps.replica.grad_size)],
                                  {"loss": float("nan") if r == 7 else 1.0})
        code = await asyncio.wait_for(c.task, 60)
        await c.stop()
        return code

    with open(log, "w") as fh, contextlib.redirect_stderr(fh):
        assert asyncio.run(run()) == 0
    expected = {"sender:done:7": 3, "sender:ps_ask:7": 1, "sender:ps_model:6": 1}
    stats = ps.node.stats
    assert dict(stats.refused_from) | expected == dict(stats.refused_from)
    assert stats.refused_from["meta.loss:grad:7"] >= 1  # NaN in both steps' quorums, or one
    done = [r for r in read_metrics(ps.cfg.metrics) if r.get("event") == "done"][-1]
    assert done["refused"] | expected == done["refused"]
    got = runsum.rejections(tmp_path)["0"]
    assert got == dict(stats.refused_from), got  # nothing else refused: no connection closed
    assert rundir.read_net_stats(log)["refused"] == got


# ------------------------------------------------------------------------- the attack
def _worker_cfg(**args) -> RunConfig:
    return RunConfig(insecure_shared_secret=True, rank=10, num_ps=4, num_workers=7, fps=1, fw=2,
                     attack="honest", attack_args=args, **TINY)


def test_the_meta_attack_argument_is_checked_at_start():
    assert WorkerAttack(_worker_cfg(meta={"loss": 1e308}), None).meta == {"loss": 1e308}
    for bad in ({"loss": [1]}, {"loss": 1 << 64}, {"loss": {"a": 1}}, [1], {f"k{i}": 1 for i in range(33)}):
        with pytest.raises(ConfigError, match="meta"):
            check_attack(_worker_cfg(meta=bad))
    with pytest.raises(ConfigError, match="unknown arguments"):
        check_attack(_worker_cfg(metas={}))


def test_a_byzantine_worker_sends_the_meta_it_is_told_with_its_gradients(monkeypatch):
    from byzsgd.roles.nodes import Worker

    monkeypatch.setenv("BYZSGD_SECRET", "member-input-test-secret")
    lie = {"loss": float("nan"), "rejected": (1 << 64) - 1, "extra": "x"}
    worker = Worker(_worker_cfg(meta=lie))
    sent = []
    monkeypatch.setattr(worker.node, "send", lambda *a: sent.append(a))
    grad = torch.ones(worker.replica.grad_size)
    worker._send_gradient({0: 5, 1: 6}, 5, grad, None, 0.25)
    assert [(r, k, s) for r, k, s, _, _ in sent] == [(0, "grad", 5), (1, "grad", 6)]
    meta = sent[0][4]
    assert math.isnan(meta["loss"]) and meta["rejected"] == (1 << 64) - 1 and meta["extra"] == "x"
    assert torch.equal(sent[0][3][0], grad)  # "honest": the gradient itself is the honest one
    json.dumps(meta)  # what --worker_attack_args carries (NaN included)


def test_a_metrics_record_never_ends_the_run(tmp_path):
    """A value JSON has no form for is written as its str (a record is written in the step
    loop: raising there would end the role)."""
    from byzsgd.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.write(step=1, loss=float("nan"), blob=b"\x00")
    writer.close()
    (rec,) = read_metrics(tmp_path / "m.jsonl")
    assert rec["loss"] == "nan" and rec["blob"] == "b'\\x00'"
