"""FlatSGD: torch.optim.SGD's update on the flat vector, its checks, its state_dict (both
ways), and what it is for: a PS that steps never imports torch._dynamo."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from byzsgd.errors import ConfigError
from byzsgd.learning.flat_sgd import DEFAULTS, FlatSGD
from byzsgd.learning.models import build_model
from byzsgd.learning.flat_state import flat_state, load_grad_vector, num_parameters
from byzsgd.learning.optim import build_flat_optimizer

ROOT = Path(__file__).resolve().parent.parent

HYPER = [
    {"lr": 0.1},
    {"lr": 0.05, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 5e-4},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"lr": 0.02, "momentum": 0.5, "maximize": True},
]


def _model(seed=0):
    return build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=seed)


def test_defaults_are_torch_sgds():
    sig = inspect.signature(torch.optim.SGD.__init__).parameters
    assert {k: sig[k].default for k in DEFAULTS} == DEFAULTS


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(h))
def test_same_trajectory_as_torch_sgd(hyper):
    """Eight steps of random gradients: the flat update and torch.optim.SGD's per-parameter one
    end on the same model (element-wise the same ops; only rounding may differ)."""
    ours, theirs = _model(), _model()
    opt = FlatSGD(flat_state(ours), **hyper)
    ref = torch.optim.SGD(theirs.parameters(), **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        g = torch.randn(num_parameters(ours), generator=gen)
        load_grad_vector(ours, g)
        opt.step()
        ref.zero_grad()
        load_grad_vector(theirs, g)
        ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    moved = flat_state(ours).params - flat_state(_model()).params
    assert moved.abs().max() > 1e-3  # it did step


def test_torch_sgds_checks_as_config_errors():
    flat = flat_state(_model())
    for bad, match in (({"lr": -1.0}, "learning rate"), ({"momentum": -0.1}, "momentum"),
                       ({"weight_decay": -1.0}, "weight_decay"), ({"nesterov": True}, "nesterov"),
                       ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
                       ({"betas": (0.9, 0.99)}, "does not accept")):
        with pytest.raises(ConfigError, match=match):
            FlatSGD(flat, **bad)


def test_build_flat_optimizer_picks_flat_sgd_for_sgd_only():
    m = _model()
    opt = build_flat_optimizer("SGD", flat_state(m), '{"lr": "0.1", "momentum": "0.9"}')
    assert isinstance(opt, FlatSGD) and opt.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_flat_optimizer("adam", flat_state(m), {"lr": "1e-3"}), torch.optim.Adam)
    with pytest.raises(ConfigError, match="does not accept"):
        build_flat_optimizer("sgd", flat_state(m), {"betas": "0.9,0.99"})


def _stepped(opt, model, steps=3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        load_grad_vector(model, torch.randn(num_parameters(model), generator=gen))
        opt.step()


@pytest.mark.parametrize("direction", ["flat_to_torch", "torch_to_flat"])
def test_state_dict_interchanges_with_torch_sgd(direction):
    """A checkpoint written by either optimizer resumes in the other on the same trajectory."""
    hyper = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}
    src_model = _model()
    src = FlatSGD(flat_state(src_model), **hyper) if direction == "flat_to_torch" \
        else torch.optim.SGD(src_model.parameters(), **hyper)
    _stepped(src, src_model)
    saved = src.state_dict()
    assert len(saved["state"]) == len(list(src_model.parameters()))
    # resume: a fresh model at the same weights, the other optimizer, the saved state
    dst_model = _model()
    flat_state(dst_model).flat.copy_(flat_state(src_model).flat)
    dst = torch.optim.SGD(dst_model.parameters(), lr=1.0) if direction == "flat_to_torch" \
        else FlatSGD(flat_state(dst_model), lr=1.0)
    dst.load_state_dict(saved)
    assert dst.param_groups[0]["lr"] == 0.05 and dst.param_groups[0]["momentum"] == 0.9
    _stepped(src, src_model, seed=3)
    _stepped(dst, dst_model, seed=3)
    assert torch.allclose(flat_state(src_model).params, flat_state(dst_model).params, rtol=1e-5, atol=1e-6)


def test_load_state_dict_without_buffers():
    """No momentum (or torch's None buffers): the state loads and the next step starts afresh."""
    m = _model()
    opt = FlatSGD(flat_state(m), lr=0.1, momentum=0.9)
    _stepped(opt, m)
    k = len(list(m.parameters()))
    nones = {"state": {i: {"momentum_buffer": None} for i in range(k)},
             "param_groups": [dict(opt.state_dict()["param_groups"][0], params=list(range(k)))]}
    opt.load_state_dict(nones)
    assert opt.momentum_buffer is None
    plain = FlatSGD(flat_state(_model()), lr=0.1)
    _stepped(plain, plain.flat.model)
    assert plain.state_dict()["state"] == {}
    opt.load_state_dict(plain.state_dict())
    assert opt.momentum_buffer is None and opt.param_groups[0]["momentum"] == 0.0


def test_load_state_dict_refuses_another_model():
    small = build_model("linear", input_shape=(1, 28, 28), num_classes=10)
    opt = FlatSGD(flat_state(small), lr=0.1, momentum=0.9)
    _stepped(opt, small)
    other = FlatSGD(flat_state(_model()), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(opt.state_dict())
    for key, value in (("lr", "0.1"), ("momentum", None), ("nesterov", "yes")):
        wrong = opt.state_dict()
        wrong["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(dict(wrong, param_groups=[dict(wrong["param_groups"][0],
                                                                   params=list(range(8)))]))
    bad = opt.state_dict()
    bad["state"][0]["momentum_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        FlatSGD(flat_state(build_model("linear", input_shape=(1, 28, 28), num_classes=10)),
                lr=0.1).load_state_dict(bad)


def test_a_stepping_ps_replica_never_imports_dynamo():
    """The point of FlatSGD: a PS (roles imported, replica built, steps taken) leaves
    torch._dynamo out (~80 MB of heap and seconds of CPU per process), with the default sgd."""
    code = (
        "import sys, torch\n"
        "import byzsgd.roles.ps, byzsgd.roles.worker\n"
        "from byzsgd.config import RunConfig\n"
        "from byzsgd.roles.replica import Replica\n"
        "cfg = RunConfig(num_ps=1, num_workers=3, rank=0, dataset='synthetic:1x8x8:3:60:20', model='linear',"
        " loss='cross-entropy', opt_args={'lr': '0.1', 'momentum': '0.9'})\n"
        "rep = Replica(cfg, with_test_set=True)\n"
        "for _ in range(3): rep.apply_gradient(torch.randn(rep.grad_size))\n"
        "rep.evaluate()\n"
        "print(type(rep.optimizer).__name__, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["FlatSGD", "False"]
