"""``stealth`` (byzsgd/attacks/stealth.py): the forgery inside the gradient check's tolerance.
Hand-computed rows, the check passing it at the PSes' tolerance and catching it at a tighter
one, and the tolerance taken from the deployment's configuration.  Fast."""
from __future__ import annotations

import math
import random

import pytest
import torch

from byzsgd import attacks
from byzsgd.attacks import catalog
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.roles.gradient_check import GradientCheck


def test_reverse_moves_the_own_gradient_against_the_honest_mean_by_margin_times_tolerance():
    # own g = (3, 4), |g| = 5; the known honest rows' mean (2, 2): u = -(1, 1)/sqrt(2);
    # push = 0.5 * 0.01 * 5 = 0.025 along u: each coordinate -0.025/sqrt(2)
    honest = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = attacks.forge("stealth", honest, 2, check_tolerance=0.01, margin=0.5)
    step = 0.025 / math.sqrt(2)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[3 - step, 4 - step]] * 2), atol=1e-6)


def test_sign_spreads_the_same_budget_over_every_coordinate():
    # alone: the mean is its own (3, 4); reverse pushes along -(0.6, 0.8), sign along -(1, 1)/sqrt(2)
    honest = torch.tensor([[3.0, 4.0]])
    rev = attacks.forge("stealth", honest, 1, check_tolerance=0.01, margin=1.0)
    sig = attacks.forge("stealth", honest, 1, check_tolerance=0.01, margin=1.0, direction="sign")
    assert torch.allclose(rev[0], torch.tensor([3 - 0.03, 4 - 0.04]), atol=1e-6)
    s = 0.05 / math.sqrt(2)
    assert torch.allclose(sig[0], torch.tensor([3 - s, 4 - s]), atol=1e-6)
    zero = attacks.forge("stealth", torch.zeros(1, 3), 1)  # nothing to push against
    assert torch.equal(zero, torch.zeros(1, 3))


@pytest.mark.parametrize("direction", ["reverse", "sign"])
def test_the_check_passes_it_at_the_ps_tolerance_and_catches_it_below(direction):
    """The point of the attack: the PS's check (the real comparison of roles/gradient_check.py)
    never bans it at the tolerance it was aimed at, and bans it at half that."""
    gen = torch.Generator().manual_seed(0)
    own = torch.randn(1000, generator=gen)
    honest = torch.stack([own, *torch.randn(4, 1000, generator=gen)])
    cfg = RunConfig(num_ps=1, fps=0, num_workers=5, fw=1, model="linear", batch=8)
    for tol, banned in ((1e-3, []), (4e-4, [1])):
        forged = attacks.forge("stealth", honest, 1, check_tolerance=1e-3, direction=direction)[0]
        rel = float((forged.double() - own.double()).norm() / own.double().norm())
        assert rel == pytest.approx(0.9e-3, rel=1e-3)
        check = GradientCheck(cfg, 1, tol, recompute=lambda r, state, step: own, rng=random.Random(0))
        assert check.check(0, torch.zeros(1), [1], forged.unsqueeze(0)) == banned


def test_the_tolerance_is_the_deployments_and_the_arguments_are_checked():
    cfg = RunConfig(num_ps=1, fps=0, num_workers=5, fw=1, rank=5, attack="stealth", check_tolerance=2e-4)
    args = catalog.parse(cfg)
    assert args == {**args, "check_tolerance": 2e-4, "margin": 0.9, "direction": "reverse"}
    for bad in ({"margin": 0}, {"margin": 1.5}, {"direction": "std"}, {"check_tolerance": -1}):
        with pytest.raises(ConfigError, match="stealth"):
            catalog.parse(RunConfig(num_ps=1, fps=0, num_workers=5, fw=1, rank=5, attack="stealth",
                                    attack_args=bad))
