"""Garfield's workflow, as its ByzSGD README gives it: the trainer's ``--bench`` / ``--log``
lines, ``./run_exp.sh`` with ``servers`` / ``workers`` (and a config file) in the working
directory, ``./kill.sh`` with no argument, the ``--model`` / ``--dataset`` help.

The network-namespace run of a Garfield ``run_exp.sh`` parameter set (resnet18, CIFAR-10-shaped
data, cross-entropy, SGD with momentum and weight decay, median) is at the end (slow).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.deploy import cluster
from tests.test_multihost import (NetNS, clean_env, free_port, netns, run_ids_alive,  # noqa: F401
                                  wait_for)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
TINY = ["--dataset", "synthetic:1x8x8:4:256:64", "--model", "cnn", "--loss", "cross-entropy",
        "--batch", "8", "--fw", "0", "--fps", "0", "--gar", "average", "--eval_samples", "64"]


# ============================================================================ --bench / --log
STEP_TIME = re.compile(r" ps0 INFO byzsgd\.ps: step (\d+) takes (\d+\.\d+) s$")
STEP_LOSS = re.compile(r" ps0 INFO byzsgd\.ps: step (\d+) loss (\d+\.\d+) accumulated (\d+\.\d+)$")
EVAL = re.compile(r" ps0 INFO byzsgd\.ps: step (\d+)/(\d+) loss \S+ accuracy \S+%")


def ps_lines(tmp_path: Path, bench: str, log: str, steps: int = 6) -> list[str]:
    """PS 0's output in a one-PS, two-worker deployment run with --bench / --log."""
    run = tmp_path / f"run-{bench}-{log}"
    res = subprocess.run([PY, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(run),
                          "--num_ps", "1", "--num_workers", "2", *TINY, "--num_iter", str(steps),
                          "--acc_freq", "3", "--bench", bench, "--log", log, "--timeout", "120"],
                         capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return (run / "ps0.log").read_text().splitlines()


@pytest.mark.timeout(200)
def test_bench_prints_each_step_time_and_log_each_step_loss(tmp_path):
    """Garfield's README: --bench 'time elapsed in each step is printed', --log 'accumulated
    loss at each iteration is printed' -- each on its own, at every step; the evaluation lines
    are printed either way."""
    lines = ps_lines(tmp_path, "true", "false")
    times = [m for m in map(STEP_TIME.search, lines) if m]
    assert [int(m[1]) for m in times] == list(range(6)), lines
    assert all(float(m[2]) > 0 for m in times)
    assert not any(STEP_LOSS.search(line) for line in lines)
    assert [m[1] for m in map(EVAL.search, lines) if m] == ["3", "6"]  # every --acc_freq, and the last
    lines = ps_lines(tmp_path, "false", "true")
    losses = [m for m in map(STEP_LOSS.search, lines) if m]
    assert [int(m[1]) for m in losses] == list(range(6)), lines
    assert not any(STEP_TIME.search(line) for line in lines)
    # "accumulated": the mean loss of the steps so far
    step_loss = [float(m[2]) for m in losses]
    for i, m in enumerate(losses):
        assert float(m[3]) == pytest.approx(sum(step_loss[:i + 1]) / (i + 1), abs=2e-4)
    assert [m[1] for m in map(EVAL.search, lines) if m] == ["3", "6"]
    # the metrics file holds the same per-step losses
    recs = [json.loads(x) for x in (tmp_path / "run-false-true" / "metrics-ps0.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 4) for r in recs if "step_time" in r and "event" not in r] == step_loss


# ============================================================================ --model / --dataset help
HELP_PROBE = """\
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("TORCH-IMPORTED", "torch" in sys.modules)
"""


@pytest.mark.parametrize("module", ["byzsgd.trainer", "byzsgd.roles.ps", "byzsgd.launch"])
def test_model_and_dataset_help_come_from_the_registries(module):
    """--help lists every model and dataset (model_help() / dataset_help(), the registries'
    own texts); the trainer's and the launcher's --help do not import torch."""
    from byzsgd.learning.data import dataset_help
    from byzsgd.learning.models import model_help

    res = subprocess.run([PY, "-c", HELP_PROBE, module], capture_output=True, text=True,
                         cwd=ROOT, env=clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    flat = "".join(res.stdout.split())  # argparse re-wraps the text
    assert "".join(model_help().split()) in flat and "".join(dataset_help().split()) in flat
    for name in ("resnet18", "densenet121", "vgg19", "cifar100", "imagenet", "fashion-mnist"):
        assert name in res.stdout.replace("-\n", "-")
    if module != "byzsgd.roles.ps":  # the node modules import the roles (torch) at load
        assert res.stdout.strip().endswith("TORCH-IMPORTED False"), res.stdout[-300:]
