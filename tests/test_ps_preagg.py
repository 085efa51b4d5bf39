"""--pre_agg, --model_pre_agg and --worker_momentum in the parameter server.

What the PS aggregates must be exactly the library's composition on the same rows (NaN rows
dropped, then per-worker momentum in PyTorch's convention, then the stages in the given
order, then the rule); bad pipelines are refused at start naming stage, rule, n and f; the
momentum buffers survive a checkpoint/resume and old checkpoints still load.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError, ResilienceError
from byzsgd.gars.pipeline import Pipeline, robust_aggregate
from byzsgd.gars.worker_momentum import WorkerMomentum
from byzsgd.learning.checkpoint import CheckpointPolicy
from byzsgd.net.frame import Message

SYNTH = "synthetic:1x28x28:10:64:64"
NO_MOMENTUM = {"lr": "0.05", "momentum": "0"}


# ---------------------------------------------------------------------------- refused at start
def test_pipeline_resilience_refused_at_start_naming_stage_rule_n_f():
    # bucketing s=2 of q_w = 6 gradients -> 3 buckets, below 2f + 1 = 5 for fw = 2
    cfg = RunConfig(insecure_shared_secret=True, num_ps=1, num_workers=8, fw=2, pre_agg="bucketing:s=2,nnm")
    with pytest.raises(ResilienceError) as err:
        cfg.validate()
    msg = str(err.value)
    assert "bucketing:s=2" in msg and "stage 1" in msg and "median" in msg
    assert "n=6" in msg and "f=2" in msg
    # the rule after the stages: clipping passes 4 rows on, krum needs 2f + 3 = 5
    cfg = RunConfig(insecure_shared_secret=True, num_ps=1, num_workers=5, fw=1, gar="krum", pre_agg="clipping")
    with pytest.raises(ResilienceError, match=r"krum \(after pipeline clipping.*n=4; from n=4, f=1"):
        cfg.validate()
    # the models' pipeline at q_ps = 3 with fps = 1: bucketing s=2 leaves 2 rows
    cfg = RunConfig(insecure_shared_secret=True, num_ps=4, fps=1, num_workers=7, fw=1, model_pre_agg="bucketing")
    with pytest.raises(ResilienceError, match=r"q|median|n=2"):
        cfg.validate()
    # unknown stage, and a rule used as a stage
    with pytest.raises(ConfigError, match="pre-aggregation stage"):
        RunConfig(insecure_shared_secret=True, pre_agg="nmm").validate()
    RunConfig(insecure_shared_secret=True, num_ps=4, fps=1, num_workers=7, fw=2, pre_agg="clipping,nnm",
              model_pre_agg="nnm").validate()  # fine


def test_worker_momentum_refused_with_optimizer_momentum_and_out_of_range():
    with pytest.raises(ConfigError, match="momentum twice"):
        RunConfig(insecure_shared_secret=True, worker_momentum=0.9, opt_args={"lr": "0.05", "momentum": "0.5"}).validate()
    RunConfig(insecure_shared_secret=True, worker_momentum=0.9, opt_args=NO_MOMENTUM).validate()
    RunConfig(insecure_shared_secret=True, worker_momentum=0.9, opt_args={"lr": "0.05", "momentum": "0.9"}).validate()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="worker_momentum"):
            RunConfig(insecure_shared_secret=True, worker_momentum=bad)
    # the launcher refuses it too, before anything starts
    from byzsgd.deploy.options import LaunchConfig
    with pytest.raises(ConfigError, match="momentum twice"):
        LaunchConfig.from_argv(["--worker_momentum", "0.9", "--opt_args",
                                '{"lr": "0.05", "momentum": "0.5"}']).validate()


def test_optimizer_momentum_equal_to_worker_momentum_moves_to_the_workers():
    """--opt_args momentum beta with --worker_momentum beta: the PS's optimizer runs without
    momentum (applied once, per worker); without worker momentum it keeps it."""
    moved, _ = _ps(worker_momentum=0.9, opt_args={"lr": "0.05", "momentum": "0.9"})
    assert moved.replica.optimizer.param_groups[0]["momentum"] == 0
    assert moved.replica.optimizer.param_groups[0]["lr"] == 0.05
    kept, _ = _ps(opt_args={"lr": "0.05", "momentum": "0.9"})
    assert kept.replica.optimizer.param_groups[0]["momentum"] == 0.9


def test_heavy_ball_rows_are_pytorch_sgd_momentum_buffers():
    """--worker_momentum beta then SGD(lr) moves the model exactly as SGD(lr, momentum=beta)
    would on the same gradient stream (one worker, average): no lr retuning."""
    beta, lr = 0.9, 0.05
    gen = torch.Generator().manual_seed(1)
    stream = [torch.randn(6, generator=gen) for _ in range(5)]
    a = torch.zeros(6, requires_grad=True)
    b = torch.zeros(6, requires_grad=True)
    opt_a = torch.optim.SGD([a], lr=lr, momentum=beta)
    opt_b = torch.optim.SGD([b], lr=lr, momentum=0.0)
    wm = WorkerMomentum(beta, 6, [7])
    for g in stream:
        a.grad = g.clone()
        opt_a.step()
        b.grad = wm.heavy_ball_rows({7: g})[0].clone()
        opt_b.step()
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------- in the PS
class _Box:
    """A gradient mailbox that delivers prepared messages (sender -> Message) per step."""

    def __init__(self, per_step):
        self.per_step = per_step

    def advance(self, t):
        pass

    async def collect(self, t, q, *, senders, timeout):
        return dict(self.per_step[t])


def _ps(**kw):
    from byzsgd.roles.nodes import ParameterServer

    base = dict(rank=0, num_ps=1, fps=0, num_workers=7, fw=2, dataset=SYNTH, opt_args=NO_MOMENTUM)
    base.update(kw)
    ps = ParameterServer(RunConfig(insecure_shared_secret=True, **base))
    applied = []
    ps.replica.apply_gradient = lambda g, buffers=None: applied.append(g.clone())
    ps._request_gradients = lambda t, snapshot: None
    return ps, applied


@pytest.mark.parametrize("mode", ["garfield", "paper"])
def test_ps_aggregate_is_momentum_then_stages_in_order_then_rule(mode):
    spec = "clipping:tau=0.5,nnm"
    ps, applied = _ps(mode=mode, gar="median", pre_agg=spec, worker_momentum=0.9)
    d = ps.replica.grad_size
    gen = torch.Generator().manual_seed(3)
    workers = ps.cfg.worker_ranks  # 1..7
    steps = []
    for t in range(3):
        quorum = workers[t:t + 5]  # a different quorum each step
        grads = {w: torch.randn(d, generator=gen) * (1 + w) for w in quorum}
        if t == 2:
            grads[quorum[0]][3] = float("nan")  # a non-finite gradient: dropped, no momentum
        steps.append(grads)
    ps.grad_box = _Box([{w: Message("grad", t, w, [g.clone()], {"loss": 1.0}) for w, g in s.items()}
                        for t, s in enumerate(steps)])
    ref = WorkerMomentum(0.9, d, workers)
    pipe = Pipeline.parse(spec)
    records = []
    for t, grads in enumerate(steps):
        record = {}
        ps.step = t
        assert asyncio.run(ps._gradient_phase(t, record)) == [1.0] * 5
        records.append(record)
        finite = {w: g for w, g in sorted(grads.items()) if torch.isfinite(g).all()}
        rows = ref.heavy_ball_rows(finite)
        f = ps.cfg.fw - (len(grads) - len(finite))
        expected = robust_aggregate("median", rows, f, pipe, step=t, seed=0)
        assert torch.equal(applied[t], expected), t
        # the order of the stages matters, so a PS applying them in another order fails here
        other = robust_aggregate("median", rows, f, "nnm,clipping:tau=0.5")
        assert not torch.allclose(other, expected)
        assert record["quorum"] == sorted(grads)
    assert records[2]["nonfinite"] == [3]
    assert torch.equal(ps.worker_momentum.momenta, ref.momenta)
    assert ps.worker_momentum.updates.tolist() == ref.updates.tolist()
    # rank 1: step 0 only; rank 3: steps 0 and 1, its NaN of step 2 never entered its momentum
    assert ps.worker_momentum.updates.tolist() == [1, 2, 2, 3, 3, 2, 1]


def test_ps_model_pipeline_is_applied_to_the_gathered_models():
    ps, _ = _ps(num_ps=4, fps=1, fw=1, model_pre_agg="clipping:tau=2,nnm")
    gen = torch.Generator().manual_seed(5)
    M = torch.randn(ps.cfg.q_ps, ps.replica.state_size, generator=gen)
    out = ps._aggregate_models(M.clone())
    assert torch.equal(out, robust_aggregate("median", M, 1, "clipping:tau=2,nnm"))
    assert not torch.equal(out, robust_aggregate("median", M, 1))


def test_no_worker_momentum_no_pipeline_is_the_rule_alone():
    ps, applied = _ps(gar="median")
    assert ps.worker_momentum is None and not ps.gradients.pipeline
    d = ps.replica.grad_size
    grads = {w: torch.randn(d) for w in ps.cfg.worker_ranks[:5]}
    ps.grad_box = _Box([{w: Message("grad", 0, w, [g.clone()], {}) for w, g in grads.items()}])
    asyncio.run(ps._gradient_phase(0, {}))
    assert torch.equal(applied[0], robust_aggregate("median", torch.stack([grads[w] for w in sorted(grads)]), 2))


# ---------------------------------------------------------------------------- checkpoints
def test_worker_momentum_buffers_survive_checkpoint_and_resume(tmp_path):
    kw = dict(worker_momentum=0.9, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    ps, _ = _ps(**kw)
    d = ps.replica.grad_size
    ps.worker_momentum.heavy_ball_rows({r: torch.randn(d) for r in ps.cfg.worker_ranks[:5]})
    ps.worker_momentum.heavy_ball_rows({r: torch.randn(d) for r in ps.cfg.worker_ranks[2:]})
    saved = ps.worker_momentum.state_dict()
    assert ps.checkpoints.maybe_save(2, ps.replica) is not None
    back, _ = _ps(resume=True, **kw)
    assert back.step == 2
    assert torch.equal(back.worker_momentum.momenta, saved["momenta"])
    assert back.worker_momentum.updates.tolist() == saved["updates"].tolist()
    # the same next step from both
    g = {r: torch.randn(d) for r in ps.cfg.worker_ranks[:5]}
    assert torch.equal(ps.worker_momentum.heavy_ball_rows(g), back.worker_momentum.heavy_ball_rows(g))
    # another beta: refused, naming the file and the component
    with pytest.raises(ConfigError, match="worker_momentum.*beta"):
        _ps(resume=True, worker_momentum=0.5, checkpoint_dir=str(tmp_path), checkpoint_every=2)


def test_checkpoint_without_momentum_buffers_still_loads(tmp_path):
    ps, _ = _ps()
    CheckpointPolicy(tmp_path, 2, 0).save(4, ps.replica)  # as written before the buffers existed
    back, _ = _ps(worker_momentum=0.9, checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)
    assert back.step == 4
    assert torch.equal(back.replica.state_vector(), ps.replica.state_vector())
    assert not back.worker_momentum.momenta.any() and not back.worker_momentum.updates.any()
