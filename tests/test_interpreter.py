"""The suite and the scripts follow the interpreter that runs them (not only the checkout's .venv).

A researcher installs byzsgd into their own environment (conda, a cluster module, a venv
outside the checkout) and runs the scripts from there: on this machine the hosts run the
launcher's interpreter, elsewhere the documented rule applies, and an interpreter that
cannot run a node is refused at once, naming the host, the interpreter and the module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.deploy.plan import default_python, runs_on_this_machine

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BYZSGD_PYTHON", "BYZSGD_RUNNER", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _bare_python(tmp_path: Path) -> Path:
    """An interpreter that exists but has none of byzsgd's dependencies (no site-packages)."""
    fake = tmp_path / "bin" / "barepy"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("runner, same", [("local", True), ("", True), ("ip netns exec", True),
                                          ("ip  netns  exec", True), ("ssh -o BatchMode=yes", False),
                                          ("ssh {host} -p 22", False)])
def test_default_python_is_this_interpreter_only_on_this_machine(runner, same):
    assert runs_on_this_machine(runner) is same
    assert default_python(runner) == (sys.executable if same else None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hosts(tmp_path: Path, server_extra: str = "") -> tuple[Path, Path]:
    (tmp_path / "servers").write_text(f"127.0.0.1{server_extra}\n")
    (tmp_path / "workers").write_text("127.0.0.1\n127.0.0.1\n")
    return tmp_path / "servers", tmp_path / "workers"


def test_dry_run_prints_the_interpreter_of_each_host(tmp_path):
    servers, workers = _hosts(tmp_path)
    common = ["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(servers), "--workers", str(workers),
              "--dry_run", "--", "--num_iter", "5"]
    local = subprocess.run(common[:2] + ["--run_dir", str(tmp_path / "a")] + common[2:], capture_output=True,
                           text=True, timeout=60, env=_env(BYZSGD_PYTHON=sys.executable, BYZSGD_RUNNER="local"))
    assert local.returncode == 0, local.stderr
    assert f"# 127.0.0.1: python {sys.executable}" in local.stdout
    remote = subprocess.run(common[:2] + ["--run_dir", str(tmp_path / "b")] + common[2:], capture_output=True,
                            text=True, timeout=60, env=_env(BYZSGD_PYTHON=sys.executable,
                                                            BYZSGD_RUNNER="ssh -o BatchMode=yes"))
    assert remote.returncode == 0, remote.stderr
    assert "# 127.0.0.1: python <repo>/.venv/bin/python if present, else python3" in remote.stdout


def test_a_host_python_without_byzsgd_fails_fast_naming_host_python_and_module(tmp_path):
    bare = _bare_python(tmp_path)
    servers, workers = _hosts(tmp_path, f" python={bare}")
    started = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(servers), "--workers",
                          str(workers), "--run_dir", str(tmp_path / "run"), "--ports", "ephemeral",
                          "--base_port", str(_free_port()), "--quiet", "--", "--num_iter", "5"],
                         capture_output=True, text=True, timeout=120,
                         env=_env(BYZSGD_PYTHON=sys.executable, BYZSGD_RUNNER="local"))
    assert res.returncode != 0
    assert f"{bare} cannot import msgpack" in res.stderr, res.stderr[-2000:]
    assert "127.0.0.1" in res.stderr  # the host
    assert time.monotonic() - started < 60


def test_scripts_refuse_an_interpreter_that_cannot_run_byzsgd(tmp_path):
    bare = _bare_python(tmp_path)
    res = subprocess.run(["bash", str(SCRIPTS / "kill.sh"), str(tmp_path / "no-run")], capture_output=True,
                         text=True, timeout=60, env=_env(BYZSGD_PYTHON=str(bare)))
    assert res.returncode == 3
    assert f"kill.sh: {bare} cannot import msgpack" in res.stderr


def test_scripts_prefer_the_active_environment(tmp_path):
    """With no $BYZSGD_PYTHON, the active venv's interpreter is the one used (not .venv)."""
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "used"
    (venv / "bin" / "python").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexec {sys.executable} \"$@\"\n")
    (venv / "bin" / "python").chmod(0o755)
    res = subprocess.run(["bash", str(SCRIPTS / "kill.sh"), str(tmp_path / "no-run")], capture_output=True,
                         text=True, timeout=60, env=_env(VIRTUAL_ENV=str(venv)))
    assert "byzsgd.deploy.stop" in marker.read_text()
    assert res.returncode == 2 and "deployment.json" in res.stderr  # the cluster module ran and refused
