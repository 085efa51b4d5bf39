"""The synchronous ByzSGD filters on crafted models, the paper's resilience conditions, and
the correct-PS diameter computed from what the PSes log."""
from __future__ import annotations

import math

import pytest
import torch

from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.metrics import gather_diameters
from byzsgd.roles.filters import LipschitzFilter, ModelFilters, OutliersFilter, SGDUpdate

D = 1000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- outliers filter ---------------------------------------------------------------------
def test_outliers_filter_passes_an_honest_step_and_rejects_a_far_model():
    prev = torch.randn(D, generator=_gen(0))
    update = torch.randn(D, generator=_gen(1))
    f = OutliersFilter(factor=5.0, lr=0.1)
    honest = prev - 0.1 * (update + 0.5 * torch.randn(D, generator=_gen(2)))  # noisy SGD step
    assert f.check(honest, prev, update, gap=1).ok
    far = prev + 10.0 * torch.randn(D, generator=_gen(3))
    verdict = f.check(far, prev, update, gap=1)
    assert not verdict.ok and verdict.reason == "outliers" and verdict.value > verdict.bound
    assert not f.check(-prev, prev, update, gap=1).ok  # the reverse attack
    assert not f.check(10 * prev, prev, update, gap=1).ok  # scaled


def test_outliers_filter_rejects_a_step_against_the_update():
    prev = torch.randn(D, generator=_gen(0))
    update = torch.randn(D, generator=_gen(1))
    f = OutliersFilter(factor=5.0, lr=0.1)
    # moving 7 steps the wrong way lies 8 lr||u|| from the expected model: more than 5
    assert not f.check(prev + 0.7 * update, prev, update, gap=1).ok
    assert f.check(prev - 0.1 * update, prev, update, gap=1).ok


def test_outliers_filter_scales_with_the_steps_missed():
    prev = torch.zeros(D)
    update = torch.ones(D)
    f = OutliersFilter(factor=2.0, lr=0.1)
    three_steps = prev - 0.3 * update
    assert f.check(three_steps, prev, update, gap=3).ok
    assert not f.check(three_steps + 0.5 * update, prev, update, gap=1).ok


def test_outliers_filter_rejects_nan_and_inf():
    prev = torch.zeros(D)
    update = torch.ones(D)
    f = OutliersFilter(factor=5.0, lr=0.1)
    for bad in (float("nan"), float("inf")):
        model = prev - 0.1 * update
        model[7] = bad
        assert not f.check(model, prev, update, gap=1).ok


def test_outliers_filter_refuses_bad_constants():
    with pytest.raises(ValueError):
        OutliersFilter(factor=0.0, lr=0.1)
    with pytest.raises(ValueError):
        OutliersFilter(factor=1.0, lr=-1.0)


# -- Lipschitz filter --------------------------------------------------------------------
def test_lipschitz_coefficient():
    x0, x1 = torch.zeros(4), torch.tensor([3.0, 4.0, 0.0, 0.0])  # moved 5
    g0, g1 = torch.zeros(4), torch.tensor([0.0, 0.0, 6.0, 8.0])  # changed 10
    assert LipschitzFilter.coefficient(g1, g0, x1, x0) == pytest.approx(2.0)
    assert LipschitzFilter.coefficient(g1, g0, x0, x0) == math.inf  # a replayed model
    assert LipschitzFilter.coefficient(g0, g0, x0, x0) == 0.0
    assert LipschitzFilter.coefficient(g1 * float("nan"), g0, x1, x0) == math.inf


def test_lipschitz_filter_warmup_then_quantile():
    f = LipschitzFilter(quantile=0.75, warmup=4, window=8)
    for k in (1.0, 2.0, 3.0):
        assert f.check(100.0).ok  # warm-up: nothing to compare with yet
        f.record(k)
    f.record(4.0)
    assert f.threshold() == 3.0  # the 0.75-quantile of 1, 2, 3, 4
    assert f.check(3.0).ok
    verdict = f.check(3.5)
    assert not verdict.ok and verdict.reason == "lipschitz" and verdict.bound == 3.0
    assert not f.check(math.inf).ok and not f.check(math.nan).ok


def test_lipschitz_filter_window_follows_drift():
    f = LipschitzFilter(quantile=0.5, warmup=2, window=4)
    for k in (1.0, 1.0, 1.0, 1.0):
        f.record(k)
    assert not f.check(5.0).ok
    for k in (5.0, 6.0, 7.0, 8.0):  # the old values slide out
        f.record(k)
    assert len(f) == 4 and f.threshold() == 6.0
    assert f.check(5.0).ok
    f.record(math.inf)  # never recorded: it would poison the quantile
    assert len(f) == 4


def test_lipschitz_filter_refuses_bad_constants():
    for kwargs in ({"quantile": 0.0}, {"quantile": 1.5}, {"quantile": 0.5, "warmup": 0},
                   {"quantile": 0.5, "warmup": 10, "window": 5}):
        with pytest.raises(ValueError):
            LipschitzFilter(**kwargs)


# -- the SGD update the outliers filter expects --------------------------------------------
@pytest.mark.parametrize("opt_args", [
    {"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.9, "nesterov": "true"},
    {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01}])
def test_sgd_update_matches_torch_sgd(opt_args):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(D))
    kwargs = {k: (v == "true" if k == "nesterov" else float(v)) for k, v in opt_args.items()}
    opt = torch.optim.SGD([param], **kwargs)
    mine = SGDUpdate(opt_args)
    for step in range(5):
        grad = torch.randn(D, generator=_gen(step))
        before = param.detach().clone()
        update = mine.advance(grad, before)
        param.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(param.detach(), before - kwargs["lr"] * update, rtol=1e-5, atol=1e-6)


# -- both filters as the worker uses them ------------------------------------------------------
def _quadratic_run(filters: ModelFilters, steps: int, lr: float, seed: int = 0):
    """SGD on 0.5 * ||A x||^2 with noisy gradients: what honest PSes send."""
    g = _gen(seed)
    A = torch.diag(torch.linspace(0.5, 2.0, D))
    x = torch.randn(D, generator=g) * 5
    sgd = SGDUpdate({"lr": lr, "momentum": 0.9})
    verdicts = []
    streak = 0
    for step in range(steps):
        grad = A @ A @ x + 0.1 * torch.randn(D, generator=g)
        ok = filters.screen(x, step).ok and filters.judge(x, grad).ok
        verdicts.append(ok)
        streak = 0 if ok else streak + 1
        if ok or streak == 4:  # as the worker: after every PS failed, the median is taken
            filters.accept(x, grad, step)
            streak = 0
        x = x - lr * sgd.advance(grad, x)
    return verdicts, x, A


def test_model_filters_accept_honest_training_mostly_and_reject_forgeries():
    filters = ModelFilters(quantile=0.75, warmup=5, window=20, factor=5.0,
                           opt_args={"lr": 0.01, "momentum": 0.9})
    verdicts, x, A = _quadratic_run(filters, 60, lr=0.01)
    assert filters.rejected["outliers"] == 0  # an honest model never looks like an outlier
    assert sum(verdicts) >= 0.6 * len(verdicts)  # the quantile test costs ~1 - q of them
    step = filters.prev.step + 1
    honest = filters.prev.model - 0.01 * filters.prev.update
    forged = {"random": torch.randn(D, generator=_gen(9)) * 10, "reverse": -honest,
              "backwards": filters.prev.model + 0.3 * filters.prev.update,
              "nan": torch.full((D,), float("nan"))}
    for name, model in forged.items():
        assert not filters.screen(model, step).ok, name
    # a model the outliers filter lets through, whose gradient jumps: the Lipschitz filter
    grad = A @ A @ honest
    assert filters.screen(honest, step).ok
    assert not filters.judge(honest, grad + 1e3 * torch.randn(D, generator=_gen(5))).ok
    assert filters.rejected["lipschitz"] >= 1


def test_model_filters_first_model_passes():
    filters = ModelFilters(quantile=0.75, warmup=5, window=20, factor=5.0, opt_args={"lr": 0.1})
    assert filters.prev is None
    x = torch.randn(D, generator=_gen(0)) * 100  # anything: the worker bootstraps from a median
    assert filters.screen(x, 0).ok and filters.judge(x, torch.ones(D)).ok
    filters.accept(x, torch.ones(D), 0)
    assert filters.prev.step == 0
    assert not filters.screen(torch.full((D,), float("nan")), 1).ok


# -- the paper's resilience conditions ---------------------------------------------------------
def _paper(**kw) -> RunConfig:
    base = dict(rank=0, mode="paper", num_ps=4, fps=1, num_workers=7, fw=1)
    base.update(kw)
    return RunConfig(**base)


def test_paper_mode_defaults_to_mda_and_the_paper_constants():
    cfg = _paper(gather_period=2)
    assert cfg.gar == "mda" and cfg.model_rule == "median"
    assert cfg.lipschitz_q == pytest.approx(0.75)  # (n_ps - fps) / n_ps
    assert cfg.outliers_k == pytest.approx(8.0)  # 3T + 2
    assert RunConfig(rank=0).gar == "median"
    cfg.check_resilience()


@pytest.mark.parametrize("kw,needs", [
    ({"num_ps": 3, "fps": 1}, "n_ps > 3 fps"),
    ({"num_workers": 3, "fw": 1, "gar": "median"}, "n_w > 3 fw"),
    ({"num_ps": 4, "fps": 1, "strict_resilience": True}, "n_ps > 3 fps + 1"),
])
def test_paper_conditions_refused_at_start(kw, needs):
    with pytest.raises(ConfigError, match="paper mode needs") as exc:
        _paper(**kw).check_resilience()
    assert needs in str(exc.value)


def test_paper_conditions_report():
    assert _paper().paper_conditions() == {"n_ps > 3 fps": True, "n_w > 3 fw": True,
                                           "n_ps > 3 fps + 1 (journal theorem)": False}
    _paper(num_ps=5, strict_resilience=True).check_resilience()


def test_sync_flag_validation():
    with pytest.raises(ConfigError, match="--mode paper"):
        RunConfig(rank=0, sync=True)
    with pytest.raises(ConfigError, match="SGD"):
        _paper(sync=True, optimizer="adam")
    with pytest.raises(ConfigError, match="lipschitz_quantile"):
        _paper(sync=True, lipschitz_quantile=1.5)
    with pytest.raises(ConfigError, match="outliers_factor"):
        _paper(sync=True, outliers_factor=-1.0)
    with pytest.raises(ConfigError, match="pull_timeout"):
        _paper(sync=True, pull_timeout=0.0)


# -- the correct PSes' diameter from the logged distances ------------------------------------------
def test_gather_diameters_excludes_byzantine_pairs_and_merges_late_pairs():
    records = {
        0: [{"step": 4, "distances_before": {"0-1": 2.0, "0-3": 99.0, "1-3": 50.0}},
            {"event": "diameter_after", "step": 4, "distances": {"0-1": 0.5, "0-2": 0.4, "0-3": 80.0},
             "distances_before": {"0-2": 3.0}}],
        1: [{"step": 4, "distances_before": {"0-1": 2.0, "1-2": 1.5}},
            {"event": "diameter_after", "step": 4, "distances": {"1-2": 0.7}}],
        3: [{"step": 4, "distances_before": {"0-3": 1000.0}}],  # the Byzantine PS's own log
    }
    rows = gather_diameters(records, correct=[0, 1, 2])
    assert rows == [dict(step=4, before=3.0, after=0.7, pairs_before=3, pairs_after=3, pairs=3)]


def test_model_filters_refuse_a_far_step():
    """A PS claiming a step far ahead would widen the outliers bound at will, and a worker
    accepting it would wait for that step forever: refused, the worker bootstraps instead."""
    filters = ModelFilters(quantile=0.75, warmup=5, window=20, factor=5.0, opt_args={"lr": 0.1})
    x = torch.zeros(D)
    filters.accept(x, torch.ones(D), 10)
    honest_next = x - 0.1 * torch.ones(D)
    assert filters.screen(honest_next, 11).ok
    for step in (10, 9, 10 + ModelFilters.max_gap + 1, 10**9):
        verdict = filters.screen(honest_next, step)
        assert not verdict.ok and verdict.reason == "step", step
