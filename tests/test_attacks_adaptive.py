"""The adaptive attacks: Min-Max / Min-Sum, Fang et al., defence-aware search, momentum-aware mode.

Hand-computed cases from the papers' definitions on 3 honest rows in 2-D, the defining
constraints on random rows (satisfied, and tight within the search's tolerance), the
defence-aware search against the rule-alone one on the deployed pipeline's objective, and
the momentum-aware gradient checked against the PS's own WorkerMomentum.  All fast.
"""
from __future__ import annotations

import math

import pytest
import torch

import byzsgd.attacks as A
import byzsgd.gars as G
from byzsgd.attacks.adaptive import adaptive_gamma, perturbation
from byzsgd.attacks.defence import simulator
from byzsgd.attacks.fang import fang_interval
from byzsgd.attacks.momentum_aware import MomentumAwareAttacker
from byzsgd.attacks.optimal import optimal_alie_factor, optimal_ipm_factor
from byzsgd.attacks.statistical import honest_stats
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError, ResilienceError
from byzsgd.gars.pipeline import robust_aggregate
from byzsgd.gars.worker_momentum import WorkerMomentum
from byzsgd.roles.byzantine import WorkerAttack

torch.set_num_threads(1)

TOL = 1e-5  # the paper's (and the default) search tolerance
#: three honest gradients in 2-D: mu = (2/3, 2/3); the furthest pair h2, h3 at 2 sqrt(2)
TRIANGLE = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
#: Min-Max with p = -(1, 1)/sqrt(2): m = s (1, 1), the binding rows h2/h3:
#: (s - 2)^2 + s^2 = 8  ->  s = 1 - sqrt(3)  ->  gamma = sqrt(2) (2/3 - s) = sqrt(2) (sqrt(3) - 1/3)
MINMAX_UNIT = math.sqrt(2) * (math.sqrt(3) - 1 / 3)
#: Min-Sum: sum_i ||mu - h_i||^2 = 16/3, max_i sum_j ||h_i - h_j||^2 = 12, 3 gamma^2 = 12 - 16/3
MINSUM_UNIT = 2 * math.sqrt(5) / 3


def rows(seed: int, k: int = 7, d: int = 30) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=gen, dtype=torch.float64)
    return common + 2.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)


def minmax_ok(h: torch.Tensor, m: torch.Tensor) -> bool:
    return float((h - m).norm(dim=1).max()) <= float(torch.cdist(h, h).max()) + 1e-12


def minsum_ok(h: torch.Tensor, m: torch.Tensor, bound: str = "max") -> bool:
    scores = torch.cdist(h, h).square().sum(dim=1)
    limit = scores.max() if bound == "max" else scores.min()
    return float((h - m).square().sum()) <= float(limit) * (1 + 1e-12)


# ----------------------------------------------------------------- registry

def test_new_attacks_registered_with_reference_and_parameters():
    names = A.names()
    for name in ("minmax", "minsum", "fang"):
        assert name in names and A.get(name).reference
    assert "NDSS 2021" in A.get("minmax").reference and "USENIX Security 2020" in A.get("fang").reference
    for name in ("minmax", "minsum"):
        spec = A.get(name)
        assert spec.needs_rule and {"direction", "search", "pipeline", "gamma_init", "tol"} <= set(spec.params)
    assert "bound" in A.get("minsum").params
    assert {"variant", "b", "seed"} <= set(A.get("fang").params) and not A.get("fang").needs_rule
    for name in ("optimal_alie", "optimal_ipm"):
        assert "pipeline" in A.get(name).params


# ----------------------------------------------------------------- Min-Max / Min-Sum

def test_minmax_minsum_hand_computed_triangle():
    # unit and sign and std are all along -(1, 1) here, with ||p|| = 1, sqrt(2), 2 sqrt(2/3)
    # (sigma = 2/sqrt(3) per coordinate): gamma scales as 1/||p||
    norms = {"unit": 1.0, "sign": math.sqrt(2), "std": 2 * math.sqrt(2 / 3)}
    for direction, norm in norms.items():
        assert adaptive_gamma("minmax", TRIANGLE, 1, direction) == pytest.approx(MINMAX_UNIT / norm, abs=2 * TOL)
        assert adaptive_gamma("minsum", TRIANGLE, 1, direction) == pytest.approx(MINSUM_UNIT / norm, abs=2 * TOL)
    # the authors' code's Min-Sum bound min_i: gamma = min_i ||h_i - mu|| = ||mu|| = 2 sqrt(2)/3
    assert adaptive_gamma("minsum", TRIANGLE, 1, "unit", bound="min") == pytest.approx(2 * math.sqrt(2) / 3, abs=2 * TOL)
    out = A.forge("minmax", TRIANGLE, 3, direction="unit")
    s = 2 / 3 - MINMAX_UNIT / math.sqrt(2)
    assert out.shape == (3, 2) and torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.allclose(out[0], torch.tensor([s, s], dtype=torch.float64), atol=2 * TOL)


@pytest.mark.parametrize("direction", ["unit", "std", "sign"])
def test_constraints_hold_and_are_tight(direction):
    for seed in range(3):
        h = rows(seed)
        mu, p = perturbation(h, direction)
        for kind, ok in (("minmax", minmax_ok), ("minsum", minsum_ok)):
            m = A.forge(kind, h, 2, direction=direction)[0]
            gamma = adaptive_gamma(kind, h, 2, direction)
            assert torch.allclose(m, mu + gamma * p)
            assert ok(h, m), (kind, direction, seed)
            # the search stops within 2 tol of the largest feasible gamma
            assert not ok(h, mu + (gamma + 3 * TOL) * p), (kind, direction, seed)
        # Min-Sum's closed form: gamma* = max_i ||h_i - mu|| / ||p||  (sum_i (mu - h_i) = 0)
        closed = float((h - mu).norm(dim=1).max() / p.norm())
        assert adaptive_gamma("minsum", h, 2, direction) == pytest.approx(closed, abs=2 * TOL)


def test_perturbation_directions():
    h = rows(4)
    mu, sigma = honest_stats(h)
    d_unit = A.forge("minmax", h, 1, direction="unit")[0] - mu
    d_sign = A.forge("minmax", h, 1, direction="sign")[0] - mu
    d_std = A.forge("minmax", h, 1, direction="std")[0] - mu
    assert torch.allclose(d_unit / d_unit.norm(), -mu / mu.norm())
    assert torch.allclose(d_sign / d_sign.abs().max(), -torch.sign(mu))
    assert torch.allclose(d_std / d_std.norm(), -sigma / sigma.norm())
    assert A.get("minmax").fn.__defaults__[0] == "std"  # the default direction
    with pytest.raises(ConfigError, match="direction"):
        A.forge("minmax", h, 1, direction="north")
    # one row: no spread, no perturbation (std), or no room (unit): the honest row itself
    assert torch.equal(A.forge("minmax", h[:1], 2), h[:1].repeat(2, 1))
    assert torch.allclose(A.forge("minsum", h[:1], 1, direction="unit"), h[:1])


def test_search_cap_and_expansion():
    big = TRIANGLE * 1000.0
    # the authors' search never exceeds 2 gamma_init = 20; expanding gamma_init removes the cap
    assert adaptive_gamma("minmax", big, 1, "unit", expand=False) < 20.0
    assert adaptive_gamma("minmax", big, 1, "unit") == pytest.approx(1000 * MINMAX_UNIT, abs=2 * TOL)
    assert adaptive_gamma("minmax", TRIANGLE, 1, "unit", expand=False) == pytest.approx(MINMAX_UNIT, abs=2 * TOL)
    with pytest.raises(ConfigError):
        A.forge("minmax", TRIANGLE, 1, tol=0.0)


def test_minmax_minsum_deterministic_and_dtype():
    h = rows(5)
    for kind in ("minmax", "minsum"):
        assert torch.equal(A.forge(kind, h, 2), A.forge(kind, h, 2))
        out32 = A.forge(kind, h.float(), 2)
        assert out32.dtype == torch.float32 and torch.allclose(out32.double(), A.forge(kind, h, 2), atol=1e-4)


# ----------------------------------------------------------------- Fang et al.

#: per coordinate: mu >= 0 with g_min > 0 / g_min <= 0; mu < 0 with g_max <= 0 / g_max > 0
FANG_ROWS = torch.tensor([[1.0, -1.0, -1.0, 1.0],
                          [2.0, -3.0, 2.0, -4.0],
                          [3.0, -2.0, 5.0, -3.0]], dtype=torch.float64)
#: b = 2: [g_min/b, g_min], [g_max, g_max/b], [b g_min, g_min], [g_max, b g_max]
FANG_LO = torch.tensor([0.5, -1.0, -2.0, 1.0], dtype=torch.float64)
FANG_HI = torch.tensor([1.0, -0.5, -1.0, 2.0], dtype=torch.float64)


def test_fang_hand_computed():
    lo, hi = fang_interval(FANG_ROWS, b=2.0)
    assert torch.equal(lo, FANG_LO) and torch.equal(hi, FANG_HI)
    out = A.forge("fang", FANG_ROWS, 3, seed=7)
    assert out.shape == (3, 4) and ((out >= FANG_LO) & (out <= FANG_HI)).all()
    assert not torch.equal(out[0], out[1])  # each compromised row drawn independently
    # b = 1: the honest extremes themselves, on the side against the honest mean's sign
    assert torch.equal(A.forge("fang", FANG_ROWS, 2, b=1.0, seed=0),
                       torch.tensor([[1.0, -1.0, -1.0, 1.0]] * 2, dtype=torch.float64))
    # partial knowledge: mu -/+ [3, 4] sigma (coordinate 0: mu = 2, sigma = 1)
    plo, phi = fang_interval(FANG_ROWS, knowledge="partial")
    assert (plo[0].item(), phi[0].item()) == (-2.0, -1.0)
    with pytest.raises(ConfigError):
        A.forge("fang", FANG_ROWS, 1, b=0.5)
    with pytest.raises(ConfigError):
        A.forge("fang", FANG_ROWS, 1, variant="krum")


def test_fang_sides_factor_determinism_and_effect_on_the_median():
    h = rows(6, k=5, d=200)
    mu, g_min, g_max = h.mean(0), h.min(0).values, h.max(0).values
    b = 2.0
    out = A.forge("fang", h, 2, b=b, seed=3)
    down = mu >= 0
    below, above = out[:, down], out[:, ~down]
    assert (below <= g_min[down]).all() and (above >= g_max[~down]).all()
    # within a factor b of the extreme: |v| between |extreme| / b and b |extreme|
    for vals, ext in ((below, g_min[down]), (above, g_max[~down])):
        assert (vals.abs() <= b * ext.abs() + 1e-12).all() and (vals.abs() >= ext.abs() / b - 1e-12).all()
    assert torch.equal(out, A.forge("fang", h, 2, b=b, seed=3))
    assert torch.equal(out, A.forge("fang", h, 2, b=b, seed=3, variant="median"))  # same attack (§3.4)
    assert not torch.equal(out, A.forge("fang", h, 2, b=b, seed=4))
    # the coordinate-wise median of honest + forged moves against the honest mean's sign
    before = G.aggregate("median", h, 0)
    after = G.aggregate("median", torch.cat([h, out]), 2)
    assert (after[down] <= before[down]).all() and (after[~down] >= before[~down]).all()
    assert (after != before).float().mean() > 0.9
    assert A.forge("fang", h.float(), 2, seed=3).dtype == torch.float32


# ----------------------------------------------------------------- defence-aware search

def test_defence_aware_search_beats_the_rule_alone_search_on_the_pipeline():
    """Against nnm + median, the factor searched with the pipeline moves the deployed
    aggregate at least as far as the one searched against the rule alone (here: further)."""
    f = 3
    for seed in range(2):
        h = rows(seed, k=8, d=40)
        mu, dist = simulator(h, f, gar="median", pipeline="nnm", name="test")
        _, sigma = honest_stats(h)
        z_rule, z_pipe = (optimal_alie_factor(h, f, gar="median", pipeline=p) for p in (None, "nnm"))
        assert dist(mu + z_pipe * sigma) >= dist(mu + z_rule * sigma)
        e_rule, e_pipe = (optimal_ipm_factor(h, f, gar="median", pipeline=p) for p in (None, "nnm"))
        assert dist(-e_pipe * mu) > dist(-e_rule * mu)
        paper = A.forge("minmax", h, f)[0]
        tuned = A.forge("minmax", h, f, search="defence", gar="median", pipeline="nnm")[0]
        assert dist(tuned) > dist(paper)
        # the simulation is the PS's own call
        inputs = torch.cat([h, tuned.repeat(f, 1)])
        assert dist(tuned) == pytest.approx(float((robust_aggregate("median", inputs, f, "nnm") - mu).norm()))


def test_pipeline_none_is_the_previous_rule_alone_search():
    h = rows(9, k=8, d=40)
    for spec in (None, "none", ""):
        assert optimal_alie_factor(h, 3, gar="median", pipeline=spec) == optimal_alie_factor(h, 3, gar="median")
    assert torch.equal(A.forge("optimal_ipm", h, 3, gar="trimmed_mean", pipeline=None),
                       A.forge("optimal_ipm", h, 3, gar="trimmed_mean"))


def test_defence_search_refuses_what_the_ps_refuses():
    h = rows(1, k=4, d=10)
    with pytest.raises(ConfigError, match="gar"):
        A.forge("minsum", h, 2, search="defence")
    with pytest.raises(ResilienceError):  # bucketing s=2 needs n >= 2sf + 1 = 9
        A.forge("optimal_alie", h, 2, gar="median", pipeline="bucketing:s=2")
    with pytest.raises(ConfigError, match="search"):
        A.forge("minmax", h, 1, search="everything")


# ----------------------------------------------------------------- momentum-aware

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_momentum_aware_row_equals_the_target_at_a_real_worker_momentum(dtype):
    beta, d, honest, byz = 0.9, 16, [0, 1, 2, 3, 4], [5, 6]
    wm = WorkerMomentum(beta, d, honest + byz, dtype=dtype)
    tracker = MomentumAwareAttacker(beta, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for step in range(6):
        quorum = sorted(torch.randperm(5, generator=gen)[:3].tolist())  # honest part of the quorum
        grads = {r: (torch.randn(d, generator=gen, dtype=torch.float64) + 1).to(dtype) for r in quorum}
        tracker.observe(grads)
        rows_before = tracker.honest_rows(quorum)
        forged = tracker.forge("minmax", byz, quorum, search="defence", gar="median", pipeline="nnm")
        if step == 0:  # first step: buf = g, so the gradient is the target itself
            target0 = A.forge("minmax", rows_before, 2, search="defence", gar="median", pipeline="nnm")
            assert torch.allclose(forged[5], target0[0], rtol=rtol, atol=0)
        out = wm.heavy_ball_rows({**grads, **forged})
        # the honest rows the attacker tracks are the PS's, in the PS's own arithmetic
        assert torch.equal(out[:3], rows_before)
        target = A.forge("minmax", rows_before, 2, search="defence", gar="median", pipeline="nnm")
        assert torch.allclose(out[3:], target, rtol=rtol, atol=rtol * float(target.abs().max()))
        for r in byz:  # and it knows its own row at the PS exactly
            assert torch.equal(tracker.row(r), wm.momenta[r] / (1 - beta))
    # ranks outside the last quorums: their rows as the PS last updated them
    assert torch.equal(tracker.honest_rows(honest), wm.momenta[:5] / (1 - beta))


def test_momentum_aware_nonfinite_target_is_not_recorded():
    tracker = MomentumAwareAttacker(0.5)
    tracker.observe({0: torch.ones(3), 1: 3 * torch.ones(3)})
    g = tracker.gradient_for(9, torch.ones(3))
    assert torch.equal(g, torch.ones(3)) and torch.equal(tracker.row(9), torch.ones(3))
    bad = tracker.gradient_for(9, torch.full((3,), float("inf")))
    assert not torch.isfinite(bad).all() and torch.equal(tracker.row(9), torch.ones(3))
    with pytest.raises(ConfigError):
        MomentumAwareAttacker(1.0)


# ----------------------------------------------------------------- the worker role path

class FakeReplica:
    """The other workers' honest gradients of a step (what the colluding worker knows)."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(1)

    def other_workers_gradients(self, step):
        return [torch.randn(6, generator=self.gen) + 1.0 for _ in range(4)]


def worker(name, *, pre_agg="none", worker_momentum=0.0, **args):
    cfg = RunConfig(rank=10, num_ps=4, num_workers=7, fps=1, fw=2, gar="median", pre_agg=pre_agg,
                    worker_momentum=worker_momentum, attack=name, attack_args=args)
    return WorkerAttack(cfg, FakeReplica())


def test_worker_role_fills_the_pipeline_and_forges_the_new_attacks():
    attack = worker("optimal_alie", pre_agg="nnm")
    assert attack.params["pipeline"] == "nnm" and attack.params["gar"] == "median"
    for name in ("minmax", "minsum", "fang"):
        attack = worker(name, pre_agg="nnm", collude=True)
        out = attack.forge(torch.ones(6), 0)
        assert out.shape == (6,) and torch.isfinite(out).all()
    assert worker("minmax", pre_agg="nnm").params["pipeline"] == "nnm"
    with pytest.raises(ConfigError, match="momentum_aware"):
        worker("minmax", momentum_aware=True, collude=True)  # no --worker_momentum
    with pytest.raises(ConfigError, match="momentum_aware"):
        worker("minmax", worker_momentum=0.9, momentum_aware=True)  # not colluding


def test_worker_role_momentum_aware_mode_matches_a_real_worker_momentum():
    beta = 0.9
    attack = worker("minmax", worker_momentum=beta, momentum_aware=True, collude=True)
    replica = FakeReplica()  # the same seeded draws as the attack's own replica
    wm = WorkerMomentum(beta, 6, list(range(5)))  # rank 0: the attacker; 1..4: the others
    for step in range(4):
        sent = attack.forge(torch.ones(6), step)
        later = attack.forge(torch.ones(6), step)  # another PS's request of the same step
        others = replica.other_workers_gradients(step)
        out = wm.heavy_ball_rows({0: sent, **{i + 1: g for i, g in enumerate(others)}})
        target = A.forge("minmax", out[1:], 2, **{k: v for k, v in attack.params.items() if k != "n"},
                         n=7)[0]
        assert torch.allclose(out[0], target, rtol=1e-5, atol=1e-5)
        assert torch.allclose(later, sent)
