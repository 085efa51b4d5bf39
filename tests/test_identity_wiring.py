"""Per-rank identity above the transport: --credentials, the launchers' provisioning, the
refusal to start without credentials, the insecure shared-secret mode, and the run summary's
``rejections`` (an impostor's attempt counted by reason)."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.config import RunConfig
from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.errors import ConfigError
from byzsgd.metrics import read_metrics
from byzsgd.net.credentials import RankCredentials, credentials_path, provision
from byzsgd.net.testing import RawPeer

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FAULT = [PY, str(ROOT / "scripts" / "fault.py")]
SECRET_VARS = ("BYZSGD_SECRET", "BYZSGD_SECRET_FILE", "BYZSGD_CREDENTIALS")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


@pytest.fixture
def no_secret_env(monkeypatch):
    for var in SECRET_VARS:
        monkeypatch.delenv(var, raising=False)


# -- RunConfig.identity ---------------------------------------------------------------------
def test_identity_loads_this_ranks_credentials(tmp_path, no_secret_env, monkeypatch):
    provision(b"op", 3, tmp_path / "c")
    cfg = RunConfig(rank=2, num_ps=1, num_workers=2, credentials=str(credentials_path(tmp_path / "c", 2)))
    ident = cfg.identity()
    assert isinstance(ident, RankCredentials) and ident.rank == 2 and ident.world_size == 3
    # $BYZSGD_CREDENTIALS when the flag is absent
    monkeypatch.setenv("BYZSGD_CREDENTIALS", str(credentials_path(tmp_path / "c", 1)))
    assert RunConfig(rank=1, num_ps=1, num_workers=2).identity().rank == 1
    # another rank's file, or another world's, is refused by name
    with pytest.raises(ConfigError, match="is for rank 1, this node is rank 2"):
        RunConfig(rank=2, num_ps=1, num_workers=2).identity()
    with pytest.raises(ConfigError, match="world of 3"):
        RunConfig(rank=1, num_ps=1, num_workers=3).identity()


def test_identity_refuses_without_credentials(no_secret_env):
    with pytest.raises(ConfigError, match="no credentials: pass --credentials") as info:
        RunConfig(rank=0).identity()
    assert "--insecure_shared_secret true" in str(info.value)


def test_insecure_mode_uses_the_shared_secret_and_says_so(tmp_path, no_secret_env, monkeypatch, caplog):
    monkeypatch.setenv("BYZSGD_SECRET", "shared")
    with caplog.at_level("WARNING"):
        assert RunConfig(rank=0, insecure_shared_secret=True).identity() == b"shared"
    assert "ranks are NOT proven" in caplog.text
    (tmp_path / "s").write_text("from-file\n")
    assert RunConfig(rank=0, insecure_shared_secret=True, secret_file=str(tmp_path / "s")).identity() == b"from-file"
    with pytest.raises(ConfigError, match="exclude each other"):
        RunConfig(rank=0, insecure_shared_secret=True, credentials="/x")
    monkeypatch.setenv("BYZSGD_CREDENTIALS", "/x")
    with pytest.raises(ConfigError, match="choose one"):
        RunConfig(rank=0, insecure_shared_secret=True).identity()


NODE = ["--num_ps", "1", "--num_workers", "1", "--dataset", "synthetic:1x28x28:10", "--startup_timeout", "5"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["byzsgd.roles.worker", "byzsgd.trainer"])
def test_a_node_without_credentials_refuses_to_start(tmp_path, module):
    res = subprocess.run([PY, "-m", module, "--rank", "1", *NODE], capture_output=True, text=True,
                         cwd=ROOT, env=clean_env(), timeout=100)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "no credentials: pass --credentials" in res.stderr and "--insecure_shared_secret" in res.stderr
    # a file readable by others is refused as well (the handshake keys would be exposed)
    provision(b"op", 2, tmp_path / "c")
    path = credentials_path(tmp_path / "c", 1)
    path.chmod(0o644)
    res = subprocess.run([PY, "-m", module, "--rank", "1", *NODE, "--credentials", str(path)],
                         capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=100)
    assert res.returncode == 2 and "readable by others" in res.stderr, res.stderr[-2000:]


def test_fault_restart_checks_the_ranks_credentials(tmp_path, monkeypatch):
    from byzsgd.deploy import faults as fault

    assert fault.rank_credentials({"cmd": ["py", "--rank", "3", "--credentials", "/c/rank3.cred"]}) == "/c/rank3.cred"
    assert fault.rank_credentials({"cmd": ["py", "--credentials=/c/r.cred"]}) == "/c/r.cred"
    assert fault.rank_credentials({"cmd": ["py", "--rank", "3"]}) is None
    for var in SECRET_VARS:
        monkeypatch.setenv(var, "inherited")
    env = fault.node_env(tmp_path)  # no inherited secret or credentials reaches a restarted node
    assert not any(var in env for var in SECRET_VARS)
    (tmp_path / "secret").write_text("s")
    assert fault.node_env(tmp_path)["BYZSGD_SECRET_FILE"] == str(tmp_path / "secret")
    ranks = [dict(rank=0, role="worker", host="h", port=1, pid=None, byzantine=False, log=str(tmp_path / "w.log"),
                  metrics=None, cmd=[PY, "-c", "pass", "--rank", "0", "--credentials", str(tmp_path / "gone.cred")])]
    (tmp_path / "deployment.json").write_text(json.dumps(dict(num_ps=0, num_workers=1, ranks=ranks)))
    with pytest.raises(fault.FaultError, match="credentials file .* is gone"):
        fault.restart(tmp_path, 0)


# -- summary: rejections ----------------------------------------------------------------------
def test_rejections_from_logs_and_done_records(tmp_path):
    run = tmp_path
    ranks = [dict(rank=r, role="ps" if r < 2 else "worker", host="h", port=1, pid=None, byzantine=False,
                  attack=None, attack_args={}, log=str(run / (("ps" if r < 2 else "worker") + f"{r}.log")),
                  metrics=str(run / f"metrics-ps{r}.jsonl") if r < 2 else None) for r in range(4)]
    rundir.write_deployment(run, dict(num_ps=2, num_workers=2, run_dir=str(run), started=0.0,
                                      credentials=str(run / "credentials"), byzantine_ranks=[], ranks=ranks))
    # rank 0: its log's last net-stats line wins; rank 1: no line, its done record; rank 2: nothing
    (run / "ps0.log").write_text("x\n" + rundir.net_stats_line(0, "ps", {"auth": 1}, {}) + "\nnoise\n"
                                 + rundir.net_stats_line(0, "ps", {"auth": 2, "address": 1}, {"handler:x:E": 1}) + "\n")
    (run / "metrics-ps1.jsonl").write_text(json.dumps({"event": "done", "rejected": {"bad_rank": 3}}) + "\n")
    (run / "worker3.log").write_text(rundir.net_stats_line(3, "worker", {}, {}) + "\n")
    assert runsum.rejections(run) == {"0": {"auth": 2, "address": 1}, "1": {"bad_rank": 3}, "3": {}}
    summary = runsum.run_summary(run, "ok", started=time.time(), returncodes={})
    assert summary["rejections"]["0"] == {"auth": 2, "address": 1}


# -- whole deployments ------------------------------------------------------------------------
def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ps0_started(run: Path) -> bool:
    return any(rec.get("event") == "start" for rec in read_metrics(run / "metrics-ps0.jsonl"))


async def _impostor(port: int, creds: RankCredentials, claim: int, num_ps: int) -> dict:
    peer = await RawPeer.connect("127.0.0.1", port)
    try:
        return await peer.handshake(creds, claim, 0, num_ps)
    finally:
        await peer.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_launcher_provisions_per_rank_credentials_and_counts_an_impostor(tmp_path):
    """4 PS + 7 workers, exec'd nodes: one 0600 file per rank, no secret on disk; a member
    (rank 5's file) claiming rank 6 towards PS 0 is refused and shows in the summary's
    rejections; a worker restarted by scripts/fault.py authenticates with its own file."""
    run = tmp_path / "run"
    cmd = [PY, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(run), "--spawn", "exec",
           "--node_log", "--num_iter", "300", "--acc_freq", "300", "--eval_samples", "500",
           "--timeout", "500"]
    env = clean_env(BYZSGD_SECRET="must-not-be-used")
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _ps0_started(run) or launcher.poll() is not None, 400, "PS 0 to start")
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        # the run directory: a 0700 credentials directory with one 0600 file per rank, no secret
        cdir = run / "credentials"
        assert stat.S_IMODE(cdir.stat().st_mode) == 0o700
        assert sorted(p.name for p in cdir.iterdir()) == sorted(f"rank{r}.cred" for r in range(11))
        creds = {r: RankCredentials.load(credentials_path(cdir, r), rank=r, world_size=11) for r in range(11)}
        assert all(stat.S_IMODE(credentials_path(cdir, r).stat().st_mode) == 0o600 for r in range(11))
        assert len({c.deployment for c in creds.values()}) == 1
        assert creds[3].key(8) == creds[8].key(3) and creds[3].key(8) != creds[3].key(9)
        assert not (run / "secret").exists()
        keys = {k.hex() for c in creds.values() for k in c.keys if k}
        for path in run.rglob("*"):  # no key outside the rank files
            if path.is_file() and path.parent != cdir:
                text = path.read_text(errors="replace")
                assert not any(k in text for k in keys), path
        doc = json.loads((run / "deployment.json").read_text())
        assert doc["credentials"] == str(cdir)
        for r in doc["ranks"]:  # each rank names its own file, nobody else's
            assert r["cmd"][r["cmd"].index("--credentials") + 1] == str(credentials_path(cdir, r["rank"]))
        # a member (rank 5) claiming rank 6 towards PS 0: refused
        port0 = doc["ranks"][0]["port"]
        reply = asyncio.run(_impostor(port0, creds[5], 6, 4))
        assert reply.get("ok") is not True, reply
        # fault.py: kill worker 10, restart it from its argv (its own --credentials file);
        # once it is up (exec'd nodes import torch each: PS 0 may listen long before, and a
        # worker killed before its first line left a log with one "listening", the restart's)
        log10 = run / "worker10.log"
        _wait(lambda: (log10.exists() and "worker 10 listening" in log10.read_text())
              or launcher.poll() is not None, 300, "worker 10 to start")
        res = subprocess.run([*FAULT, str(run), "kill", "10"], capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0, res.stderr
        res = subprocess.run([*FAULT, str(run), "restart", "10"], capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0, res.stderr
        _wait(lambda: log10.read_text().count("worker 10 listening") >= 2 or launcher.poll() is not None,
              300, "the restarted worker to meet its peers")
        assert log10.read_text().count("worker 10 listening") >= 2, log10.read_text()[-3000:]
        out, err = launcher.communicate(timeout=500)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["outcome"] == "ok" and summary["restarted_ranks"] == [10]
    assert summary["rejections"]["0"].get("auth", 0) >= 1, summary["rejections"]
    assert set(summary["rejections"]) >= {str(r) for r in range(10)}
    done = [r for r in read_metrics(run / "metrics-ps0.jsonl") if r.get("event") == "done"]
    assert done and done[0]["rejected"].get("auth", 0) >= 1 and isinstance(done[0]["failures"], dict)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launcher_insecure_shared_secret_still_runs(tmp_path):
    run = tmp_path / "run"
    cmd = [PY, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(run), "--num_ps", "1",
           "--fps", "0", "--num_workers", "2", "--fw", "0", "--gar", "average", "--num_iter", "20",
           "--acc_freq", "20", "--eval_samples", "500", "--insecure_shared_secret", "true", "--node_log"]
    res = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=380)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["outcome"] == "ok"
    assert stat.S_IMODE((run / "secret").stat().st_mode) == 0o600 and not (run / "credentials").exists()
    assert "ranks are NOT proven" in (run / "ps0.log").read_text()
