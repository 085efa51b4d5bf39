"""Paper mode as the ByzSGD authors wrote it (their byzWorker.py): the outliers bound, T from
the learning rate, the Lipschitz history, and the all-PS pull at gather steps."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from byzsgd.config import RunConfig, auto_gather_period
from byzsgd.errors import ConfigError
from byzsgd.roles.filters import AuthorsLipschitzHistory, ModelFilters, authors_outliers_bound, filters_for

SYNTH = "synthetic:1x28x28:10:64:64"


# ---------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("lr, g, T, n_w, f_w, t, want", [
    (0.1, 2.0, 1, 7, 1, 1, 0.1 * 2.0 * (5 * 6 / 4)),            # T = 1: (t - 1) mod T = 0
    (0.1, 2.0, 3, 7, 1, 5, 0.1 * 2.0 * (11 * 6 / 4 + 2 * 1)),    # (5 - 1) mod 3 = 1
    (0.05, 1.0, 2, 7, 2, 2, 0.05 * (8 * 5 / 8 + 2 * 1)),         # f_w = 2
    (0.01, 3.0, 4, 10, 3, 4, 0.01 * 3.0 * (14 * 7 / 12 + 2 * 3)),  # (4 - 1) mod 4 = 3
    (0.1, 2.0, 3, 7, 0, 5, math.inf),                            # f_w = 0: not run
])
def test_authors_outliers_bound_by_hand(lr, g, T, n_w, f_w, t, want):
    got = authors_outliers_bound(lr, g, T, n_w, f_w, t)
    assert got == pytest.approx(want) if math.isfinite(want) else got == math.inf


def _filters(**kw) -> ModelFilters:
    base = dict(quantile=1.0, warmup=1, window=5, factor=5.0, opt_args={"lr": 0.1},
                outliers_bound="authors", lipschitz_history="authors", T=3, n_w=7, f_w=1)
    base.update(kw)
    return ModelFilters(**base)


def _remember(f: ModelFilters, step: int = 0, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(d)
    g = torch.ones(d)  # ||g|| = sqrt(8); momentum 0: the update is g
    f.accept(x, g, step)
    return x, g


def test_authors_bound_accepts_within_and_rejects_beyond_with_the_gradient_just_computed():
    f = _filters()
    x, g = _remember(f)
    expected = x - 0.1 * g  # the worker's own local model after its update
    grad = torch.ones(8) * 2  # the gradient at the pulled model: ||grad|| = 2 sqrt(8)
    bound = authors_outliers_bound(0.1, float(grad.norm()), 3, 7, 1, 1)
    direction = torch.zeros(8)
    direction[0] = 1.0
    near, far = expected + 0.9 * bound * direction, expected + 1.1 * bound * direction
    assert f.judge(near, grad, 1).ok
    v = f.judge(far, grad, 1)
    assert not v.ok and v.reason == "outliers" and v.bound == pytest.approx(bound)
    assert f.rejected["outliers"] == 1


def test_authors_bound_grows_within_a_period():
    """(t - 1) mod T > 0 widens the bound: a model refused right after a gather passes later."""
    grad = torch.ones(8)
    b1 = authors_outliers_bound(0.1, float(grad.norm()), 3, 7, 1, 1)
    b3 = authors_outliers_bound(0.1, float(grad.norm()), 3, 7, 1, 3)
    assert b3 > b1
    direction = torch.zeros(8)
    direction[0] = 1.0
    f = _filters()
    x, g = _remember(f, step=0)
    at1 = x - 0.1 * g + (b1 + b3) / 2 * direction
    assert not f.judge(at1, grad, 1).ok
    f = _filters()
    x, g = _remember(f, step=2)
    at3 = x - 0.1 * g + (b1 + b3) / 2 * direction
    assert f.judge(at3, grad, 3).ok


def test_authors_bound_is_not_run_without_byzantine_workers():
    f = _filters(f_w=0)
    _remember(f)
    far = torch.full((8,), 1e6)
    assert f.judge(far, torch.ones(8), 1).ok  # the Lipschitz history's first value passes too
    assert f.rejected == {"outliers": 0, "lipschitz": 0}


def test_update_form_is_kept_as_a_named_variant():
    f = _filters(outliers_bound="update", factor=5.0)
    x, g = _remember(f)
    assert f.screen(x - 0.1 * g, 1).ok
    v = f.screen(x + 100.0, 1)
    assert not v.ok and v.reason == "outliers"


# ---------------------------------------------------------------------------- Lipschitz history
def test_authors_lipschitz_history_includes_the_current_value_and_trims():
    h = AuthorsLipschitzHistory(0.75)
    assert h.test(10.0).ok  # alone it is its own quantile
    rng = np.random.default_rng(0)
    values = [10.0] + list(rng.uniform(0, 5, size=40))
    for k in values[1:]:
        h.test(k)
    k = 4.0
    v = h.test(k)
    assert v.bound == pytest.approx(np.percentile(values + [k], 75))  # the current one included
    big = AuthorsLipschitzHistory(0.5)
    for i in range(99):
        big.record(float(i))
    assert len(big) == 99
    big.record(99.0)  # reaching 100 keeps the last 50
    assert len(big) == 50 and big.history[0] == 50.0
    assert not big.test(float("nan")).ok and len(big) == 50  # NaN is never recorded


# ---------------------------------------------------------------------------- T from lr
@pytest.mark.parametrize("lr, l, num_iter, want", [(1e-3, 1.0, 1000, 333), (0.05, 1.0, 1000, 6),
                                                   (1.0, 1.0, 1000, 1), (1e-3, 1.0, 100, 100),
                                                   (1e-3, 10.0, 1000, 33)])
def test_auto_gather_period(lr, l, num_iter, want):
    assert auto_gather_period(lr, l, num_iter) == want
    cfg = RunConfig(mode="paper", gather_period="auto", opt_args={"lr": str(lr)}, lipschitz_l=l,
                    num_iter=num_iter, num_ps=4, fps=1, num_workers=7, fw=1)
    assert cfg.gather_every == want
    assert RunConfig.from_argv(cfg.to_argv()) == cfg  # "auto" round-trips as "auto"


@pytest.mark.parametrize("bad", ["0", "-2", "x", "1.5"])
def test_bad_gather_period_refused(bad):
    with pytest.raises(ConfigError, match="--gather_period"):
        RunConfig(mode="paper", gather_period=bad)


def test_explicit_gather_period_stays_an_integer():
    cfg = RunConfig(mode="paper", gather_period=5, num_iter=50)
    assert cfg.gather_period == "5" and cfg.gather_every == 5


# ---------------------------------------------------------------------------- the sync worker
def _sync_worker(**kw):
    from byzsgd.roles.nodes import Worker

    cfg = RunConfig(rank=4, mode="paper", sync=True, num_ps=4, fps=1, num_workers=7, fw=1,
                    dataset=SYNTH, insecure_shared_secret=True, **kw)
    return Worker(cfg)


def test_sync_worker_filters_follow_the_configuration():
    w = _sync_worker(gather_period="3", outliers_bound="authors")
    f = w.filters
    assert (f.outliers_bound, f.T, f.n_w, f.f_w) == ("authors", 3, 7, 1)
    assert _sync_worker().filters.outliers_bound == "update"  # the default (see the flag's help)
    assert isinstance(f.lipschitz, AuthorsLipschitzHistory)
    w2 = _sync_worker(outliers_bound="update", lipschitz_history="window")
    assert w2.filters.outliers_bound == "update" and not isinstance(w2.filters.lipschitz, AuthorsLipschitzHistory)
    assert filters_for(w.cfg).T == w.cfg.gather_every


def test_sync_worker_pulls_every_ps_at_gather_steps():
    """t mod T == 0: the median of the models of all the PSes (the authors' gather step);
    between gathers: one PS, filtered."""
    w = _sync_worker(gather_period="3")
    w.filters.accept(torch.zeros(w.replica.grad_size), torch.zeros(w.replica.grad_size), 0)
    taken = []

    async def bootstrap(t):
        taken.append(("all", t))
        return t + 1

    async def filtered(t):
        taken.append(("one", t))
        return t + 1

    w._bootstrap, w._filtered = bootstrap, filtered

    async def run():
        t = 1
        while t < 8:
            t = await w._step(t)

    asyncio.run(run())
    assert taken == [("one", 1), ("one", 2), ("all", 3), ("one", 4), ("one", 5), ("all", 6), ("one", 7)]


def test_sync_bootstrap_asks_every_ps():
    from tests.test_roles_units import _RecordingNode

    w = _sync_worker(gather_period="2")
    w.node = _RecordingNode()
    state = w.replica.state_vector().clone()

    async def median(t):
        return state, {p: t for p in w.cfg.ps_ranks[:3]}

    w._median_of_models = median
    assert asyncio.run(w._bootstrap(4)) == 5
    pulls = [r for r, kind, step in w.node.sent if kind == "pull" and step == 4]
    assert pulls == w.cfg.ps_ranks  # every PS, not one
    grads = [r for r, kind, step in w.node.sent if kind == "grad"]
    assert grads == w.cfg.ps_ranks
