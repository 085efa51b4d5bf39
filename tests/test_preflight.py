"""One validation before any node starts (issue 27, item 3), the local runner of
``scripts/run_exp.sh`` for hosts that are this machine (item 4) and PS 0's ``--bench`` /
``--log`` lines on the launcher's terminal (item 5).

Each refusal is checked end to end, on a real process: one line naming the cause, exit 2, no
run directory.  Before :mod:`byzsgd.deploy.preflight` the launcher started every node first
(and left a run directory with their logs), a port in use was a traceback with exit 1, foreign
credentials a rendezvous timeout, and ``run_exp.sh`` with hosts 127.0.0.1 ssh-ed to port 22.
"""
from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from byzsgd.deploy import preflight
from byzsgd.net.credentials import provision
from tests.test_multihost import clean_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["--dataset", "synthetic:1x8x8:4:256:64", "--model", "cnn", "--loss", "cross-entropy",
        "--batch", "8", "--fw", "0", "--fps", "0", "--gar", "average", "--eval_samples", "64"]


def launch(tmp_path: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "byzsgd.launch", "--quiet", "--run_dir", str(tmp_path / "run"),
                           "--num_ps", "1", "--num_workers", "2", "--fw", "0", "--fps", "0", "--num_iter", "3",
                           "--timeout", "60",
                           *flags], capture_output=True, text=True, cwd=ROOT, env=clean_env(),
                          timeout=timeout)


def refused(res: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> str:
    """Exit 2, one line on stderr naming the cause (after run_exp.sh's runner line, if any),
    no run directory."""
    lines = [line for line in res.stderr.strip().splitlines() if "every host is this machine" not in line]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())
    return lines[0]


# ============================================================================ the launcher
@pytest.mark.timeout(200)
def test_launcher_refuses_a_missing_dataset_before_any_node(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    res = launch(tmp_path, "--dataset", "cifar100", "--data_root", str(empty))
    refused(res, tmp_path, "--dataset cifar100", "not found")


@pytest.mark.timeout(200)
def test_launcher_refuses_unparsable_opt_args_before_any_node(tmp_path):
    res = launch(tmp_path, *TINY, "--opt_args", '{"lr":"abc"}')
    refused(res, tmp_path, "--opt_args", "lr must be a number", "'abc'")


@pytest.mark.timeout(200)
def test_launcher_refuses_a_model_that_does_not_take_the_dataset(tmp_path):
    # torchvision's resnet34 on one-channel images: used to fail in every node after start
    res = launch(tmp_path, "--dataset", "synthetic:1x8x8:4:64:32", "--model", "resnet34",
                 "--loss", "cross-entropy")
    refused(res, tmp_path, "--model resnet34", "3-channel")


def test_check_optimizer_uses_torchs_own_ranges():
    from byzsgd.config import RunConfig

    for opt in ("sgd", "adam"):  # sgd through FlatSGD's checks, adam through torch.optim's
        with pytest.raises(preflight.PreflightError, match="(?i)invalid learning rate"):
            preflight.check_optimizer(RunConfig(optimizer=opt, opt_args={"lr": "-1"}))
        with pytest.raises(preflight.PreflightError, match="does not accept 'lrr'"):
            preflight.check_optimizer(RunConfig(optimizer=opt, opt_args={"lrr": "0.1"}))
    with pytest.raises(preflight.PreflightError, match="nesterov"):
        preflight.check_optimizer(RunConfig(opt_args={"lr": "0.1", "nesterov": "true"}, worker_momentum=0))
    preflight.check_optimizer(RunConfig(opt_args={"lr": "0.1", "momentum": "0.9"}))


def test_check_optimizer_for_sgd_leaves_torch_dynamo_unimported():
    """The launcher checks before it forks the nodes: a torch.optim.SGD built there imported
    torch._dynamo (sympy, triton: ~80 MB of heap) into the launcher, and every forked node's PSS
    carried a share of it (a worker measured 101-102 MB on CI against a 100 MB bar)."""
    code = ("import sys; from byzsgd.config import RunConfig; from byzsgd.deploy import preflight; "
            "preflight.check_optimizer(RunConfig()); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton') if m in sys.modules))")
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


# ============================================================================ the trainer
def trainer(tmp_path: Path, rank: int, creds: Path, master: str, *flags: str,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "byzsgd.trainer", "--credentials", str(creds), "--master", master,
                           "--rank", str(rank), "--num_ps", "1", "--num_workers", "1", "--num_iter", "2",
                           "--startup_timeout", "5", *TINY, *flags],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=timeout)


@pytest.mark.timeout(200)
def test_trainer_refuses_a_port_in_use(tmp_path):
    provision(secrets.token_bytes(32), 2, tmp_path / "creds")
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = trainer(tmp_path, 0, tmp_path / "creds" / "rank0.cred", f"127.0.0.1:{port}")
    refused(res, tmp_path, f"port {port}", "in use")


@pytest.mark.timeout(200)
def test_trainer_refuses_credentials_of_another_deployment(tmp_path):
    """rank1.cred left from an earlier provisioning: both ranks refuse, naming the file,
    instead of a rendezvous timeout with the cause in WARNING lines."""
    provision(secrets.token_bytes(32), 2, tmp_path / "creds")
    provision(secrets.token_bytes(32), 2, tmp_path / "old")
    shutil.copy2(tmp_path / "old" / "rank1.cred", tmp_path / "creds" / "rank1.cred")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for rank in (0, 1):
        res = trainer(tmp_path, rank, tmp_path / "creds" / f"rank{rank}.cred", f"127.0.0.1:{port}")
        line = refused(res, tmp_path, "different provisionings")
        assert "rank1.cred" in line or rank == 1, line


def test_credentials_header_never_reads_the_keys(tmp_path):
    paths = provision(secrets.token_bytes(32), 3, tmp_path)
    doc = json.loads(Path(paths[1]).read_text())
    head = preflight.credentials_header(paths[1])
    assert head == {"rank": 1, "world_size": 3, "deployment": doc["deployment"]}


@pytest.mark.parametrize("host, mine", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                        ("user@127.0.0.1", True), (socket.gethostname(), True),
                                        ("192.0.2.1", False), ("no-such-host.invalid", False)])
def test_is_this_machine(host, mine):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    assert preflight.is_this_machine(host) is mine


# ============================================================================ run_exp.sh
def experiment(tmp_path: Path, servers: str = "127.0.0.1\n", workers: str = "127.0.0.1\n127.0.0.1\n",
               steps: int = 3) -> Path:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "servers").write_text(servers)
    (exp / "workers").write_text(workers)
    (exp / "exp.conf").write_text(" ".join(TINY) + f" --num_iter {steps} --acc_freq {steps}\n")
    return exp


def run_exp(exp: Path, *args: str, timeout: float = 200, **env) -> subprocess.CompletedProcess:
    e = clean_env(BYZSGD_LATEST_RUN=str(exp / "latest"), **env)
    e.pop("BYZSGD_RUNNER", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "run_exp.sh"), *args], cwd=exp, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(200)
def test_run_exp_with_local_hosts_uses_the_local_runner(tmp_path):
    """No BYZSGD_RUNNER: hosts 127.0.0.1 are run here (`sh -s`), not over ssh to port 22."""
    exp = experiment(tmp_path)
    res = run_exp(exp, "--dry_run", "--run_dir", str(tmp_path / "dry"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "runner local" in res.stderr
    assert "# sh -s <<'EOF'" in res.stdout and "ssh" not in res.stdout.split("<<'EOF'")[0]


def test_remote_hosts_keep_ssh_and_a_given_runner_wins(tmp_path, monkeypatch):
    exp = experiment(tmp_path, workers="127.0.0.1\n192.0.2.1\n")
    monkeypatch.delenv("BYZSGD_RUNNER", raising=False)
    args = ["--servers", str(exp / "servers"), "--workers", str(exp / "workers"), "--dry_run"]
    assert preflight.run_exp(args) == ""  # one host elsewhere: ssh, as before
    exp2 = tmp_path / "two"
    exp2.mkdir()
    (exp2 / "servers").write_text("localhost\n")
    (exp2 / "workers").write_text("127.0.0.1\n")
    args = ["--servers", str(exp2 / "servers"), "--workers", str(exp2 / "workers"), "--dry_run"]
    assert preflight.run_exp(args) == "local"
    assert preflight.run_exp(args + ["--runner", "ssh"]) == ""
    monkeypatch.setenv("BYZSGD_RUNNER", "ssh -p 2222")
    assert preflight.run_exp(args) == ""


@pytest.mark.timeout(200)
def test_run_exp_refuses_a_port_in_use_and_bad_opt_args(tmp_path):
    exp = experiment(tmp_path)
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_exp(exp, "--base_port", str(port), "--run_dir", str(tmp_path / "run"))
    refused(res, tmp_path, f"port {port}", "in use", "rank 0")
    res = run_exp(exp, "--run_dir", str(tmp_path / "run"), "--", "--opt_args", '{"lr":"abc"}')
    refused(res, tmp_path, "lr must be a number")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_run_exp_garfield_path_on_this_machine_runs_without_environment(tmp_path):
    """The README's Garfield path here: servers / workers 127.0.0.1, exp.conf, run_exp.sh with
    no BYZSGD_RUNNER: the run ends with outcome ok."""
    exp = experiment(tmp_path)
    with socket.socket() as s:  # a base port whose next two are free too (checked by run_exp.sh)
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    res = run_exp(exp, "--base_port", str(base), "--run_dir", str(tmp_path / "run"), "--json",
                  timeout=360)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok", summary


# ============================================================================ the terminal tee
@pytest.mark.timeout(200)
def test_launcher_shows_ps0_bench_and_log_lines_on_the_terminal(tmp_path):
    res = subprocess.run([PY, "-m", "byzsgd.launch", "--run_dir", str(tmp_path / "run"), "--num_ps", "2",
                          "--num_workers", "2", *TINY, "--num_iter", "4", "--acc_freq", "4",
                          "--bench", "true", "--log", "true", "--timeout", "120"],
                         capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stderr.splitlines()
    for step in range(4):
        assert any(line.startswith(f"[ps0] step {step} takes ") for line in lines), res.stderr[-3000:]
        assert any(line.startswith(f"[ps0] step {step} loss ") and " accumulated " in line
                   for line in lines), res.stderr[-3000:]
    assert not any(line.startswith("[ps1]") for line in lines)  # PS 0's only
    assert any(re.match(r"\[[#.]+\] step \d+/4 ", line) for line in lines)  # the bar is still there


def test_tee_prints_only_complete_step_lines(tmp_path):
    import io

    from byzsgd.deploy.tee import Ps0Tee

    log = tmp_path / "ps0.log"
    log.write_text("2026-12-06 10:00:00,000 ps0 INFO byzsgd.ps: step 0 takes 0.123456 s\n"
                   "2026-12-06 10:00:00,001 ps0 INFO byzsgd.ps: starting\n"
                   "2026-12-06 10:00:00,002 ps0 INFO byzsgd.ps: step 0 loss 1.2 accumulated 1.2\n"
                   "2026-12-06 10:00:00,003 ps0 INFO byzsgd.ps: step 1 tak")
    out = io.StringIO()
    tee = Ps0Tee(log, out)
    tee.drain()
    assert out.getvalue() == "[ps0] step 0 takes 0.123456 s\n[ps0] step 0 loss 1.2 accumulated 1.2\n"
    with open(log, "a") as fh:
        fh.write("es 0.2 s\n")
    tee.drain()
    assert out.getvalue().endswith("[ps0] step 1 takes 0.2 s\n")
