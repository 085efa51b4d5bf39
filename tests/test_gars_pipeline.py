"""Pre-aggregation pipelines (byzsgd.gars.pipeline) and per-worker momentum (worker_momentum)."""
from __future__ import annotations

import math

import pytest
import torch

import byzsgd.gars as gars
from byzsgd.errors import ConfigError, ResilienceError, UnknownNameError
from byzsgd.gars import preagg
from byzsgd.gars.pipeline import Pipeline, parse, robust_aggregate, stage_seed
from byzsgd.gars.worker_momentum import WorkerMomentum, check_worker_momentum

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _x(n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    x *= torch.linspace(0.5, 4.0, n, dtype=torch.float64).unsqueeze(1)  # varied norms
    x[0] = 20.0  # one far, large row
    return x


# ----------------------------------------------------------------------------- parsing

def test_parse_forms_and_canonical_text():
    assert parse("").stages == () and parse("none").stages == () and parse(None).stages == ()
    assert str(parse("nnm")) == "nnm"
    p = parse(" clipping:tau=5 , nnm ")
    assert [s.name for s in p.stages] == ["clipping", "nnm"] and p.stages[0].params == {"tau": 5.0}
    assert parse("bucketing:s=3").stages[0].params == {"bucket_size": 3}
    assert parse("bucketing,s=3,nnm") == parse("bucketing:s=3,nnm")  # key=value after a comma
    assert str(parse("bucketing:s=3,nnm")) == "bucketing:s=3,nnm"
    assert parse(str(parse("clipping:tau=2.5,arc"))) == parse("clipping:tau=2.5,arc")
    assert parse(parse("arc")) == parse("arc")


@pytest.mark.parametrize("spec,words", [
    ("nmm", ["nmm", "nnm", "bucketing", "clipping", "arc"]),
    ("bucketing:size=2", ["size", "known parameters: s"]),
    ("bucketing:s=0", ["'s'", "integer >= 1", "'0'"]),
    ("bucketing:s=two", ["'s'", "'two'"]),
    ("bucketing:s=2.5", ["'s'", "'2.5'"]),
    ("clipping:tau=-1", ["'tau'", "> 0", "'-1'"]),
    ("clipping:tau=nan", ["'tau'", "'nan'"]),
    ("clipping:tau=inf", ["'tau'", "'inf'"]),
    ("clipping:tau", ["'tau'", "key=value"]),
    ("nnm:k=1", ["'nnm' has no parameter 'k'", "known parameters: none"]),
    ("clipping:tau=1:tau=2", ["given twice"]),
    ("nnm,,arc", ["empty stage"]),
    ("s=2,nnm", ["before any stage"]),
    ("median", ["median", "known"]),
])
def test_parse_errors_name_the_problem(spec, words):
    with pytest.raises(ConfigError) as e:
        parse(spec)
    for w in words:
        assert w in str(e.value), (spec, str(e.value))


def test_unknown_stage_is_unknown_name_error():
    with pytest.raises(UnknownNameError):
        parse("krum")
    with pytest.raises(ConfigError):
        parse(3)


# ----------------------------------------------------------------------------- resilience

def test_check_propagates_n_through_stages():
    p = parse("bucketing:s=2")
    assert p.output(7, 1) == (4, 1)
    assert p.shapes(9, 1) == [(9, 1), (5, 1)]
    p.check("median", 7, 1)           # median at 4 buckets, f=1: 4 >= 3
    with pytest.raises(ResilienceError) as e:
        p.check("krum", 7, 1)          # krum needs 5 at 4 buckets
    msg = str(e.value)
    for w in ("krum", "bucketing:s=2", "n=4", "f=1", "n=5", "n >= 2f + 3", "from n=7"):
        assert w in msg, msg


def test_check_stage_own_bound_and_rule_bound():
    # bucketing s=3 at n=7, f=1: needs 2*3*1+1 = 7 -> ok; median at ceil(7/3) = 3 -> ok.
    parse("bucketing:s=3").check("median", 7, 1)
    with pytest.raises(ResilienceError) as e:
        parse("bucketing:s=3").check("median", 6, 1)
    msg = str(e.value)
    for w in ("bucketing:s=3", "stage 1", "median", "n=6", "f=1", "n=7", "2sf + 1"):
        assert w in msg, msg
    with pytest.raises(ResilienceError) as e:
        parse("clipping,nnm").check("median", 4, 2)
    assert "nnm" in str(e.value) and "stage 2" in str(e.value) and "n=5" in str(e.value)
    with pytest.raises(ResilienceError):
        parse("nnm").check("bulyan", 6, 1)
    parse("nnm").check("bulyan", 7, 1)
    with pytest.raises(ConfigError, match="pre-aggregation stage, not a rule"):
        parse("nnm").check("nnm", 7, 1)
    with pytest.raises(ConfigError):
        parse("nnm").check("median", 7, -1)


# ----------------------------------------------------------------------------- application

@pytest.mark.parametrize("device", DEVICES)
def test_stages_equal_library_functions(device):
    x = _x().to(device)
    f = 1
    torch.testing.assert_close(parse("nnm")(x, f), preagg.nnm(x, f), rtol=0, atol=0)
    torch.testing.assert_close(parse("arc")(x, f), preagg.arc(x, f), rtol=0, atol=0)
    torch.testing.assert_close(parse("clipping")(x, f), preagg.clipping(x, f), rtol=0, atol=0)
    torch.testing.assert_close(parse("clipping:tau=2")(x, f), preagg.clipping(x, f, tau=2.0),
                               rtol=0, atol=0)
    s = stage_seed(5, 11, 0)
    torch.testing.assert_close(parse("bucketing:s=2")(x, f, step=11, seed=5),
                               preagg.bucketing(x, f, bucket_size=2, seed=s), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_order_matters_and_is_respected(device):
    x = _x().to(device)
    f = 1
    a = parse("clipping,nnm")(x, f)
    b = parse("nnm,clipping")(x, f)
    torch.testing.assert_close(a, preagg.nnm(preagg.clipping(x, f), f), rtol=0, atol=0)
    torch.testing.assert_close(b, preagg.clipping(preagg.nnm(x, f), f), rtol=0, atol=0)
    assert (a - b).abs().max() > 1e-3
    ra = robust_aggregate("median", x, f, "clipping,nnm")
    rb = robust_aggregate("median", x, f, "nnm,clipping")
    torch.testing.assert_close(ra, gars.aggregate("median", a, f))
    assert (ra - rb).abs().max() > 1e-3


def test_bucketing_reproducible_per_step_and_seed():
    x = _x(n=9)
    p = parse("bucketing:s=2,nnm")
    assert p(x, 1, step=3, seed=1).shape == (5, 5)
    assert torch.equal(p(x, 1, step=3, seed=1), p(x, 1, step=3, seed=1))
    outs = {tuple(p(x, 1, step=t, seed=1).flatten().tolist()) for t in range(6)}
    assert len(outs) > 1  # a fresh permutation across steps
    assert not torch.equal(p(x, 1, step=3, seed=1), p(x, 1, step=3, seed=2))


def test_robust_aggregate_checks_and_empty_pipeline():
    x = _x()
    assert torch.equal(robust_aggregate("median", x, 1), gars.aggregate("median", x, 1))
    assert torch.equal(robust_aggregate("median", x, 1, "none"), gars.aggregate("median", x, 1))
    with pytest.raises(ResilienceError):
        robust_aggregate("krum", x, 1, "bucketing:s=2")
    with pytest.raises(ConfigError):
        robust_aggregate("median", x[0], 1, "nnm")


def test_nnm_pipeline_defeats_alie_on_median():
    """Why the pipeline exists: NNM makes a small-shift attack count less."""
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + torch.randn(6, 200, dtype=torch.float64, generator=g)
    mu, sd = honest.mean(0), honest.std(0)
    x = torch.cat([honest, (mu - 1.0 * sd).unsqueeze(0)])
    err = lambda y: float((y - mu).norm())  # noqa: E731
    assert err(robust_aggregate("median", x, 1, "nnm")) < err(gars.aggregate("median", x, 1))


def test_nonfinite_rows_do_not_reach_the_output():
    x = _x()
    x[2, 1] = math.nan
    x[4] = math.inf
    out = robust_aggregate("median", x, 2, "clipping,nnm")
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- worker momentum

def test_worker_momentum_matches_hand_loop_with_partial_quorums():
    g = torch.Generator().manual_seed(0)
    ranks = [4, 5, 6, 7, 8]
    beta, d = 0.9, 6
    wm = WorkerMomentum(beta, d, ranks, dtype=torch.float64)
    hand = {r: torch.zeros(d, dtype=torch.float64) for r in ranks}
    for step in range(12):
        quorum = [r for r in ranks if (r + step) % 5 != 0]  # one rank skips each step
        grads = {r: torch.randn(d, dtype=torch.float64, generator=g) for r in reversed(quorum)}
        out = wm.rows(grads)
        for r in quorum:
            hand[r] = beta * hand[r] + (1 - beta) * grads[r]
        torch.testing.assert_close(out, torch.stack([hand[r] for r in reversed(quorum)]))
    torch.testing.assert_close(wm.momenta, torch.stack([hand[r] for r in ranks]))
    assert wm.updates.tolist() == [sum((r + t) % 5 != 0 for t in range(12)) for r in ranks]


def test_worker_momentum_state_dict_round_trip():
    g = torch.Generator().manual_seed(1)
    a = WorkerMomentum(0.5, 4, [0, 1, 2])
    for _ in range(3):
        a.rows({r: torch.randn(4, generator=g) for r in (0, 2)})
    state = a.state_dict()
    b = WorkerMomentum(0.5, 4, [0, 1, 2])
    b.load_state_dict(state)
    grads = {r: torch.randn(4, generator=g) for r in (0, 1)}
    assert torch.equal(a.rows(dict(grads)), b.rows(dict(grads)))
    assert torch.equal(a.momenta, b.momenta) and torch.equal(a.updates, b.updates)
    assert not torch.equal(state["momenta"], a.momenta)  # the state was a copy
    with pytest.raises(ConfigError, match="beta=0.5"):
        WorkerMomentum(0.9, 4, [0, 1, 2]).load_state_dict(state)
    with pytest.raises(ConfigError, match="ranks"):
        WorkerMomentum(0.5, 4, [0, 1, 3]).load_state_dict(state)
    with pytest.raises(ConfigError, match="shape"):
        WorkerMomentum(0.5, 5, [0, 1, 2]).load_state_dict(state)
    with pytest.raises(ConfigError, match="lacks"):
        b.load_state_dict({"beta": 0.5})


def test_worker_momentum_refuses_bad_input():
    wm = WorkerMomentum(0.9, 3, [1, 2])
    with pytest.raises(ValueError, match="non-finite gradient from rank"):
        wm.rows({1: torch.tensor([1.0, math.nan, 0.0])})
    assert torch.equal(wm.momenta, torch.zeros(2, 3))  # nothing entered
    with pytest.raises(ValueError, match="unknown worker rank 9"):
        wm.rows({9: torch.zeros(3)})
    with pytest.raises(ValueError, match="size 4"):
        wm.rows({1: torch.zeros(4)})
    for bad in (1.0, -0.1, "x", True, math.nan):
        with pytest.raises(ConfigError, match="beta"):
            WorkerMomentum(bad, 3, [1])
    with pytest.raises(ConfigError, match="distinct"):
        WorkerMomentum(0.9, 3, [1, 1])


def test_check_worker_momentum():
    assert check_worker_momentum(0.9, {"lr": "0.05", "momentum": "0"}) == 0.9
    assert check_worker_momentum(0.9, {"lr": 0.05}) == 0.9
    assert check_worker_momentum(0, {"momentum": 0.9}) == 0.0  # off: optimizer momentum is fine
    # the same momentum: moved to the workers, not stacked (optimizer_args drops it)
    assert check_worker_momentum(0.9, {"lr": "0.05", "momentum": "0.9"}) == 0.9
    with pytest.raises(ConfigError) as e:
        check_worker_momentum(0.9, {"lr": "0.05", "momentum": "0.5"})
    assert "--worker_momentum 0.9" in str(e.value) and "momentum 0.5" in str(e.value)
    with pytest.raises(ConfigError, match="nesterov"):
        check_worker_momentum(0.9, {"lr": "0.05", "momentum": "0.9", "nesterov": "true"})
    from byzsgd.gars.worker_momentum import optimizer_args
    assert optimizer_args(0.9, {"lr": "0.05", "momentum": "0.9"}) == {"lr": "0.05"}
    assert optimizer_args(0, {"lr": "0.05", "momentum": "0.9"}) == {"lr": "0.05", "momentum": "0.9"}
    for bad in (1.0, 1.5, -0.5):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            check_worker_momentum(bad, {})
    with pytest.raises(ConfigError, match="momentum must be a number"):
        check_worker_momentum(0.5, {"momentum": "lots"})
