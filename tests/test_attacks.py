"""Attacks: defining formulas on small examples, determinism, and effect on average vs robust rules.

The effect tests use a realistic spread: 11 honest gradients = a common gradient (|mu| ~ 11)
plus per-worker noise of the same order (RMS deviation ~ 5), f = 4 Byzantine, d = 100.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import byzsgd.attacks as A
import byzsgd.gars as G
from byzsgd.attacks.optimal import line_search
from byzsgd.attacks.statistical import alie_z
from byzsgd.errors import ConfigError, ResilienceError

torch.set_num_threads(1)

ALL = ["random", "gaussian", "reverse", "sign_flip", "drop", "inf", "nan", "mimic",
       "alie", "ipm", "empire", "optimal_alie", "optimal_ipm"]


def small(k=3, d=4, dtype=torch.float64):
    return torch.arange(1, k * d + 1, dtype=dtype).reshape(k, d) * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=dtype)


def test_all_attacks_registered_with_reference():
    assert set(ALL) <= set(A.names())
    for name in ALL:
        a = A.get(name)
        assert a.reference and a.needs_rule == name.startswith("optimal_")


# ----------------------------------------------------------------- defining formulas

def test_reverse_sign_flip_ipm_empire_mimic_formulas():
    h = small()
    g = h.mean(0)
    assert torch.equal(A.forge("reverse", h, 2), (-100.0 * g).repeat(2, 1))
    assert torch.equal(A.forge("reverse", h, 1, factor=3.0), (-3.0 * g).unsqueeze(0))
    assert torch.equal(A.forge("sign_flip", h, 3), (-g).repeat(3, 1))
    assert torch.allclose(A.forge("ipm", h, 2), (-0.1 * g).repeat(2, 1))
    assert torch.allclose(A.forge("ipm", h, 2, epsilon=0.5), (-0.5 * g).repeat(2, 1))
    assert torch.allclose(A.forge("empire", h, 1), (-10.0 * g).unsqueeze(0))
    assert torch.equal(A.forge("mimic", h, 2), h[0].repeat(2, 1))
    assert torch.equal(A.forge("mimic", h, 2, target=2), h[2].repeat(2, 1))
    with pytest.raises(ConfigError):
        A.forge("mimic", h, 1, target=3)


def test_inf_nan():
    h = small()
    assert torch.isposinf(A.forge("inf", h, 2)).all() and A.forge("inf", h, 2).shape == (2, 4)
    assert torch.isnan(A.forge("nan", h, 3)).all()


def test_drop_really_zeroes_a_fraction_of_coordinates():
    h = 1.0 + torch.rand(2, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = A.forge("drop", h, 3, p=0.3, seed=5)
    g = h.mean(0)
    for row in out:
        zero = row == 0
        assert int(zero.sum()) == 300
        assert torch.equal(row[~zero], g[~zero])
    assert not torch.equal(out[0] == 0, out[1] == 0)  # independent masks per Byzantine row
    assert torch.equal(out, A.forge("drop", h, 3, p=0.3, seed=5))
    assert torch.equal(A.forge("drop", h, 1, p=0.0, seed=1)[0], g)
    assert (A.forge("drop", h, 1, p=1.0, seed=1) == 0).all()
    with pytest.raises(ConfigError):
        A.forge("drop", h, 1, p=1.5)


def test_random_and_gaussian_distribution_and_determinism():
    h = torch.zeros(1, 20_000, dtype=torch.float32)
    r = A.forge("random", h, 2, scale=4.0, seed=3)
    assert r.dtype == torch.float32 and r.shape == (2, 20_000)
    assert float(r.min()) >= 0.0 and float(r.max()) < 4.0 and abs(float(r.mean()) - 2.0) < 0.05
    assert not torch.equal(r[0], r[1])
    assert torch.equal(r, A.forge("random", h, 2, scale=4.0, seed=3))
    gs = A.forge("gaussian", h, 2, seed=3)
    assert abs(float(gs.std()) - 200.0) < 4.0 and abs(float(gs.mean())) < 4.0
    assert torch.equal(gs, A.forge("gaussian", h, 2, seed=3))
    assert not torch.equal(gs, A.forge("gaussian", h, 2, seed=4))
    assert abs(float(A.forge("gaussian", h, 1, std=0.5, seed=0).std()) - 0.5) < 0.02


def test_alie_formula_and_z():
    # Baruch et al.: s = floor(n/2 + 1) - f, z = Phi^-1((n - s)/n); n=20, f=8 -> s=3, z=Phi^-1(0.85)
    assert alie_z(20, 8) == pytest.approx(1.0364333894937898, abs=1e-12)
    assert alie_z(15, 4) == pytest.approx(0.62293, abs=1e-5)  # s = 4, Phi^-1(11/15)
    for n, f in [(2, 1), (3, 2), (5, 4), (4, 3), (100, 1)]:
        assert math.isfinite(alie_z(n, f))  # s clamped to [1, n-1]
    h = small(5)
    mu, sd = h.numpy().mean(0), h.numpy().std(0, ddof=1)
    out = A.forge("alie", h, 2, z=1.5)
    np.testing.assert_allclose(out.numpy(), np.tile(mu + 1.5 * sd, (2, 1)), rtol=1e-12)
    default = A.forge("alie", h, 3)  # n defaults to k + f = 8
    np.testing.assert_allclose(default[0].numpy(), mu + alie_z(8, 3) * sd, rtol=1e-12)
    np.testing.assert_allclose(A.forge("alie", h, 3, n=20)[0].numpy(), mu + alie_z(20, 3) * sd, rtol=1e-12)
    with pytest.raises(ConfigError):
        A.forge("alie", h, 3, n=3)


def test_alie_single_known_gradient_is_finite():
    # Garfield's fw = 1 case: std of one sample is NaN there; here sigma = 0 -> the gradient itself.
    h = small(1)
    out = A.forge("alie", h, 1)
    assert torch.isfinite(out).all() and torch.equal(out[0], h[0])


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_and_f_rows(name):
    for dtype in (torch.float32, torch.float64):
        h = small(6, dtype=dtype)
        kw = {"gar": "median"} if name.startswith("optimal_") else {}
        out = A.forge(name, h, 2, **kw)
        assert out.shape == (2, 4) and out.dtype == dtype and out.device == h.device


# ----------------------------------------------------------------- effect: average vs robust rules

K, F, D = 11, 4, 100


@pytest.fixture(scope="module")
def honest():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(D, generator=g, dtype=torch.float64)
    return true + 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)


def errors(honest, byz, rules=("average", "median", "trimmed_mean", "krum")):
    mu = honest.mean(0)
    x = torch.cat([honest, byz])
    return {r: float((G.aggregate(r, x, F) - mu).norm()) for r in rules}


def spread(honest):
    return float((honest - honest.mean(0)).norm(dim=1).pow(2).mean().sqrt())


@pytest.mark.parametrize("name,kw", [
    ("random", {"scale": 1000.0, "seed": 0}),
    ("gaussian", {"seed": 0}),
    ("reverse", {}),
    ("empire", {}),
    ("inf", {}),
    ("nan", {}),
    ("optimal_ipm", {"gar": "median"}),
])
def test_disruptive_attacks_break_average_not_robust_rules(honest, name, kw):
    e = errors(honest, A.forge(name, honest, F, **kw))
    s = spread(honest)
    assert (not math.isfinite(e["average"])) or e["average"] > 5 * s, e
    assert e["median"] < s and e["trimmed_mean"] < s and e["krum"] < 1.5 * s, e


@pytest.mark.parametrize("name,kw,factor", [
    ("sign_flip", {}, -1.0),
    ("ipm", {}, -0.1),
    ("ipm", {"epsilon": 2.0}, -2.0),
])
def test_scaled_mean_attacks_shift_average_exactly(honest, name, kw, factor):
    mu = honest.mean(0)
    e = errors(honest, A.forge(name, honest, F, **kw))
    n = K + F
    assert e["average"] == pytest.approx(F * (1 - factor) / n * float(mu.norm()), rel=1e-9)
    s = spread(honest)
    assert e["median"] < s and e["trimmed_mean"] < s and e["krum"] < 1.5 * s, e


@pytest.mark.parametrize("name,kw", [("drop", {"seed": 1}), ("mimic", {"target": 3}), ("alie", {})])
def test_in_distribution_attacks_shift_average_by_their_offset(honest, name, kw):
    # these stay inside the honest cloud: the average moves by exactly (f/n) * (attack - mu),
    # and the robust rules stay within the honest spread
    mu = honest.mean(0)
    byz = A.forge(name, honest, F, **kw)
    e = errors(honest, byz)
    n = K + F
    assert e["average"] == pytest.approx(float((byz - mu).sum(0).norm()) / n, rel=1e-9)
    s = spread(honest)
    assert e["median"] < s and e["trimmed_mean"] < s and e["krum"] < 1.5 * s, e


@pytest.mark.parametrize("gar", ["median", "trimmed_mean", "krum", "cge"])
def test_optimal_attacks_beat_their_fixed_versions_on_the_target_rule(honest, gar):
    e_opt_alie = errors(honest, A.forge("optimal_alie", honest, F, gar=gar), rules=(gar,))[gar]
    e_alie = errors(honest, A.forge("alie", honest, F), rules=(gar,))[gar]
    e_opt_ipm = errors(honest, A.forge("optimal_ipm", honest, F, gar=gar), rules=(gar,))[gar]
    e_ipm = errors(honest, A.forge("ipm", honest, F), rules=(gar,))[gar]
    assert e_opt_alie >= e_alie - 1e-9 and e_opt_ipm >= e_ipm - 1e-9, (e_opt_alie, e_alie, e_opt_ipm, e_ipm)
    # and at least as good as every factor of the search grid, checked independently
    mu = honest.mean(0)
    sigma = honest.std(0)
    for t in [0.25, 1.0, 4.0, -1.0, 16.0]:
        byz = (mu + t * sigma).repeat(F, 1)
        assert e_opt_alie >= errors(honest, byz, rules=(gar,))[gar] - 1e-9
        assert e_opt_ipm >= errors(honest, (-t * mu).repeat(F, 1), rules=(gar,))[gar] - 1e-9


def test_optimal_attack_configuration_errors(honest):
    with pytest.raises(ConfigError, match="gar"):
        A.forge("optimal_alie", honest, F)
    with pytest.raises(ResilienceError):  # krum needs n >= 2f + 3 = 21 for f = 9; n = 11 + 9
        A.forge("optimal_ipm", honest, 9, gar="krum")
    # n larger than what the attacker knows: honest rows are reused cyclically
    out = A.forge("optimal_ipm", honest[:3], 2, gar="median", n=9)
    assert out.shape == (2, D) and torch.isfinite(out).all()
    # parameters reach the rule
    out = A.forge("optimal_alie", honest, F, gar="aksel", gar_params={"mode": "n-f"})
    assert torch.isfinite(out).all()


def test_line_search_finds_interior_optimum():
    assert line_search(lambda t: -(t - 3.7) ** 2) == pytest.approx(3.7, abs=1e-3)
    assert line_search(lambda t: -(t + 5.0) ** 2) == pytest.approx(-5.0, abs=1e-3)
    assert line_search(lambda t: 0.0 if t < 10 else math.inf) == 16.0


def test_alie_strength_is_explicit_and_the_textbook_z_is_named():
    """z = "textbook" is the paper's z_max (also what no z means); at the deployments' sizes
    it is no attack: 0.18 sigma for 7 workers, exactly the honest mean for 6."""
    h = torch.randn(5, 40, dtype=torch.float64)
    mu, sd = h.mean(0), h.std(0, correction=1)
    textbook = A.forge("alie", h, 1, n=7, z="textbook")[0]
    assert torch.allclose(textbook, A.forge("alie", h, 1, n=7)[0])
    np.testing.assert_allclose(textbook.numpy(), (mu + alie_z(7, 1) * sd).numpy(), rtol=1e-12)
    assert alie_z(7, 1) == pytest.approx(0.1800123697927051, abs=1e-9)
    assert alie_z(6, 1) == 0.0
    assert torch.allclose(A.forge("alie", h, 1, n=6, z="textbook")[0], mu)  # the honest mean
    assert torch.allclose(A.forge("alie", h, 1, z="100")[0], mu + 100 * sd)  # TOML/JSON strings
    for bad in ("strong", float("inf"), True, [1.0]):
        with pytest.raises(ConfigError, match="z must be"):
            A.forge("alie", h, 1, z=bad)


def test_a_byzantine_worker_checks_alie_z_at_start():
    from byzsgd.config import RunConfig
    from byzsgd.roles.byzantine import WorkerAttack

    def worker(**args):
        cfg = RunConfig(rank=10, num_ps=4, num_workers=7, fps=1, fw=1, gar="median", attack="alie", attack_args=args)
        return WorkerAttack(cfg, None)
    worker(z="textbook"), worker(z=100), worker()
    with pytest.raises(ConfigError, match="z must be"):
        worker(z="strong")
