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

from byzsgd.deploy.latest import LATEST_ENV, REPO, latest_pointer, latest_run, record_latest
from byzsgd.deploy.plan import default_config, split_flags
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
    from byzsgd.learning.catalog import dataset_help, model_help

    res = subprocess.run([PY, "-c", HELP_PROBE, module], capture_output=True, text=True,
                         cwd=ROOT, env=clean_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    flat = "".join(res.stdout.split())  # argparse re-wraps the text
    assert "".join(model_help().split()) in flat and "".join(dataset_help().split()) in flat
    for name in ("resnet18", "densenet121", "vgg19", "cifar100", "imagenet", "fashion-mnist"):
        assert name in res.stdout.replace("-\n", "-")
    if module != "byzsgd.roles.ps":  # the node modules import the roles (torch) at load
        assert res.stdout.strip().endswith("TORCH-IMPORTED False"), res.stdout[-300:]


# ============================================================================ run_exp.sh / kill.sh
def _private_net_reason() -> str | None:
    """run_exp.sh with no argument listens on Garfield's port 29500 (+ rank): the test runs it
    in a network namespace of its own, so that nothing else on this machine can hold it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (a private network namespace for port 29500)"
    res = subprocess.run(["unshare", "-n", "--", "ip", "link", "set", "lo", "up"],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else f"cannot unshare a network namespace: {res.stderr.strip()}"


def garfield_dir(tmp_path: Path, steps: int) -> Path:
    """An experiment directory as Garfield's README has it: servers, workers and (ours) the
    trainer flags in exp.conf."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "servers").write_text("127.0.0.1\n")
    (exp / "workers").write_text("127.0.0.1\n127.0.0.1\n")
    (exp / "exp.conf").write_text(" ".join(TINY) + f" --num_iter {steps} --acc_freq {steps}\n"
                                  "--startup_timeout 60  # comments are fine\n")
    return exp


def run_exp_here(exp: Path, env: dict, **kw) -> subprocess.Popen:
    """``./run_exp.sh`` with no argument, from ``exp``, on a private loopback."""
    return subprocess.Popen(["unshare", "-n", "--", "sh", "-c",
                             f'ip link set lo up && exec bash {SCRIPTS / "run_exp.sh"}'],
                            cwd=exp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def kill_sh(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / "kill.sh"), *args], capture_output=True, text=True,
                          env=env, cwd="/", timeout=90)


def test_kill_without_argument_refuses_when_no_run_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(LATEST_ENV, str(tmp_path / "runs" / "latest"))
    env = clean_env(**{LATEST_ENV: str(tmp_path / "runs" / "latest")})
    res = kill_sh(env)
    assert res.returncode == 2 and "no run recorded in" in res.stderr, res.stderr
    assert str(tmp_path / "runs" / "latest") in res.stderr
    # a recorded run whose directory is gone: refused, naming it
    assert record_latest(tmp_path / "gone") == tmp_path / "runs" / "latest"
    res = kill_sh(env)
    assert res.returncode == 2 and "holds no deployment.json" in res.stderr
    assert str(tmp_path / "gone") in res.stderr


def test_latest_run_pointer(tmp_path, monkeypatch):
    pointer = tmp_path / "state" / "latest"
    monkeypatch.setenv(LATEST_ENV, str(pointer))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "deployment.json").write_text("{}")
        assert record_latest(tmp_path / name) == pointer
        assert latest_run() == tmp_path / name  # replaced, not appended
    assert [p.name for p in pointer.parent.iterdir()] == ["latest"]  # no temporary left
    monkeypatch.delenv(LATEST_ENV)
    if (REPO / "scripts" / "run_exp.sh").is_file():  # byzsgd runs from its checkout
        assert latest_pointer() == REPO / "runs" / "latest"
    else:  # an installed byzsgd: the user's state directory, never site-packages
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
        assert latest_pointer() == tmp_path / "xdg" / "byzsgd" / "latest"
    # the default config: exp.conf beside the servers file, only when it exists
    (tmp_path / "servers").write_text("h\n")
    assert default_config(tmp_path / "servers") is None
    (tmp_path / "exp.conf").write_text("--num_iter 3\n")
    assert default_config(tmp_path / "servers") == tmp_path / "exp.conf"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_exp_and_kill_without_arguments(tmp_path, monkeypatch):
    """Garfield's workflow: servers / workers / exp.conf in the working directory,
    ``run_exp.sh`` with no argument (local runner), then ``kill.sh`` with no argument, from
    elsewhere, stops that run -- and says so when the latest run is already over."""
    reason = _private_net_reason()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv(LATEST_ENV, str(tmp_path / "latest"))
    env = clean_env(BYZSGD_RUNNER="local", **{LATEST_ENV: str(tmp_path / "latest")})
    # 1. a short run to its end: flags from exp.conf, run directory under ./runs
    exp = garfield_dir(tmp_path, steps=4)
    proc = run_exp_here(exp, env)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert f"trainer flags from {exp / 'exp.conf'}" in err
    run = latest_run()
    assert run.parent == exp / "runs"
    doc = json.loads((run / "deployment.json").read_text())
    flags = split_flags(doc["flags"])
    assert (flags["num_iter"], flags["model"], flags["dataset"]) == ("4", "cnn", TINY[1])
    assert [r["port"] for r in doc["ranks"]] == [29500, 29501, 29502]  # Garfield's port
    assert json.loads((run / "summary.json").read_text())["outcome"] == "ok"
    res = kill_sh(env)
    assert res.returncode == 0 and f"the latest run: {run}" in res.stderr
    assert "no process of the run" in res.stderr
    # 2. a long run, stopped by kill.sh with no argument
    (tmp_path / "exp").rename(tmp_path / "exp1")
    exp = garfield_dir(tmp_path, steps=100000)
    proc = run_exp_here(exp, env)
    try:
        def started():
            try:
                latest = latest_run()
            except Exception:
                return None
            if latest.parent != exp / "runs":
                return None
            d = json.loads((latest / "deployment.json").read_text())
            return d if all(r.get("pid") for r in d["ranks"]) else None
        doc = wait_for(started, 120, what="the run to start")
        metrics = Path(doc["run_dir"]) / "metrics-ps0.jsonl"
        wait_for(lambda: metrics.exists() and '"step_time"' in metrics.read_text(), 180,
                 what="a first step")
        assert run_ids_alive(doc["run_id"])
        res = kill_sh(env, "--grace", "3")
        assert res.returncode == 0, res.stderr
        assert f"the latest run: {doc['run_dir']}" in res.stderr
        assert run_ids_alive(doc["run_id"]) == []
        proc.communicate(timeout=60)  # run_exp.sh sees its ranks gone and ends
        summary = json.loads((Path(doc["run_dir"]) / "summary.json").read_text())
        assert 0 < summary["steps_done"]["0"] < 100000, summary
        assert summary["outcome"] == "killed" and summary["outcome_detail"]["by"] == "kill.sh", summary
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)


# ============================================================================ Garfield's parameters, netns
#: Garfield's run_exp.sh parameter set (resnet18 / cifar10 / cross-entropy / SGD lr 0.1 with
#: momentum 0.9 and weight decay 0.0005), with median for its "average", CIFAR-10-shaped
#: synthetic data, and few steps of a small batch
GARFIELD_CONF = """\
--dataset synthetic:3x32x32:10:256:64 --model resnet18 --loss cross-entropy
--optimizer sgd --opt_args '{"lr":"0.1","momentum":"0.9","weight_decay":"0.0005"}'
--batch 4 --gar median --fw 1 --fps 1 --num_iter 3 --acc_freq 3 --eval_samples 16
--bench true --log true --startup_timeout 200 --step_timeout 300
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_garfield_parameter_set_runs_on_the_netns_bed(netns, tmp_path, monkeypatch):
    """servers / workers / exp.conf in the working directory, run_exp.sh with no argument
    over the network namespaces: 4 PS (fps=1) + 7 workers (fw=1) on 5 hosts train resnet18."""
    monkeypatch.setenv(LATEST_ENV, str(tmp_path / "latest"))
    (tmp_path / "servers").write_text(netns.servers)
    (tmp_path / "workers").write_text(netns.workers)
    (tmp_path / "exp.conf").write_text(GARFIELD_CONF)
    env = dict(netns.env, BYZSGD_RUNNER="ip netns exec", **{LATEST_ENV: str(tmp_path / "latest")})
    res = subprocess.run(["bash", str(SCRIPTS / "run_exp.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=560)
    assert res.returncode == 0, res.stderr[-4000:]
    run = latest_run()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] == "ok" and summary["steps_done"] == {str(r): 3 for r in range(4)}
    doc = json.loads((run / "deployment.json").read_text())
    assert len({r["host"] for r in doc["ranks"]}) == 5 and run_ids_alive(doc["run_id"]) == []
    flags = split_flags(doc["flags"])
    assert (flags["model"], flags["loss"], flags["gar"]) == ("resnet18", "cross-entropy", "median")
    start = next(json.loads(x) for x in (run / "metrics-ps0.jsonl").read_text().splitlines()
                 if '"start"' in x)
    assert start["config"]["opt_args"] == {"lr": "0.1", "momentum": "0.9", "weight_decay": "0.0005"} \
        or start["config"]["opt_args"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005}
    assert start["parameters"] > 11_000_000  # resnet18
    log = (run / "ps0.log").read_text()
    assert len(re.findall(r"ps0 INFO byzsgd\.ps: step \d+ takes ", log)) == 3
    assert len(re.findall(r"ps0 INFO byzsgd\.ps: step \d+ loss \d", log)) == 3
