"""One fork server per host (byzsgd.deploy.fork_server): ``run_exp.sh --spawn fork``.

Real processes and real TCP on loopback.  The fast tests drive the server itself (its files per
rank, a rank that fails on its own, a signal to the server) and the per-host script; the slow
ones run ``scripts/run_exp.sh`` with the local runner, two "hosts" (127.0.0.1 and localhost),
hence two fork servers: it trains, and kill.sh and byzsgd-fault act on forked ranks as on
exec'd ones (found by their pid files and the run's id in their environment).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.config import RunConfig
from byzsgd.deploy import fork_server, host_scripts, rank_procs
from byzsgd.deploy.plan import make_plan
from byzsgd.net.credentials import credentials_path, provision
from tests.test_multihost import clean_env, free_port, plan_args, run_ids_alive, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
#: a light model: the tests are about processes, not learning
LIGHT = ["--dataset", "synthetic:784:10", "--model", "linear", "--loss", "cross-entropy",
         "--opt_args", '{"lr":"0.1"}', "--eval_samples", "200", "--log", "false", "--batch", "16"]


def children(pid: int) -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and rank_procs.ppid(int(p.name)) == pid and rank_procs.alive(int(p.name))}


# ============================================================================ fast
def test_command_line_one_spec_per_rank():
    specs = fork_server.parse(["/r/ps0", "/r/ps0.config.json", "--next", "/r/worker3", "/r/c.json",
                               "--rank", "3"])
    assert [(s.stem, s.node_args) for s in specs] == [("/r/ps0", ["/r/ps0.config.json"]),
                                                       ("/r/worker3", ["/r/c.json", "--rank", "3"])]
    for bad in ([], ["/r/ps0"], ["/r/ps0", "c.json", "--next"], ["--rank", "3"]):
        with pytest.raises(fork_server.UsageError):
            fork_server.parse(bad)
    assert host_scripts.NEXT == fork_server.NEXT


def test_exit_status_is_what_the_wrapper_recorded():
    """The wrapper's ``$?``: the code, or 128 + N for signal N."""
    assert fork_server.exit_status(3 << 8) == 3
    assert fork_server.exit_status(signal.SIGKILL) == 137
    assert fork_server.exit_status(signal.SIGTERM) == 143


@pytest.mark.parametrize("spawn", ["fork", "exec"])
def test_the_host_script_starts_one_fork_server_or_one_wrapper_per_rank(tmp_path, spawn):
    args = plan_args(tmp_path, "127.0.0.1\n", "127.0.0.1\nlocalhost\n", runner="local",
                     flags=["--spawn", spawn], extra=["--fps", "0", "--gar", "average", "--fw", "0"])
    plan = make_plan(args)
    assert plan.spawn == spawn and plan.describe()["spawn"] == spawn
    hosts = plan.hosts()
    script = host_scripts.start_script(plan, hosts["127.0.0.1"], None, "probe", redact=True)
    servers = [line for line in script.splitlines() if "-m byzsgd.deploy.fork_server" in line]
    wrappers = [line for line in script.splitlines() if "setsid sh -c" in line]
    if spawn == "fork":  # one server naming both ranks of the host; a non-Linux host execs
        assert len(servers) == 1 and len(wrappers) == 2
        assert f"{plan.run_dir}/ps0 {plan.run_dir}/ps0.config.json --next {plan.run_dir}/worker1" in servers[0]
        assert f"BYZSGD_RUN_ID={plan.run_id}" in servers[0]
        assert 'if [ "$(uname -s)" = Linux ]' in script
    else:
        assert servers == [] and len(wrappers) == 2


def _config(tmp_path: Path, rank: int, port: int, **kw) -> Path:
    cfg = RunConfig.from_argv(["--num_ps", "1", "--num_workers", "1", "--fw", "0", "--fps", "0",
                               "--gar", "average", *LIGHT, "--rank", "0"])
    cfg = dataclasses.replace(cfg, rank=rank, master=f"127.0.0.1:{port}", port=port if rank == 0 else 0,
                              credentials=str(credentials_path(tmp_path / "creds", rank)), **kw)
    path = tmp_path / f"rank{rank}.config.json"
    path.write_text(cfg.to_json() + "\n")
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_failing_rank_has_its_own_rc_and_a_signal_to_the_server_stops_the_others(tmp_path, sig):
    """Rank 0 (a PS waiting for its worker) runs on while rank 1 (an unreadable configuration)
    exits 2 into its own .rc; each rank leads its own session, is a child of the server and
    carries the server's environment (what kill.sh and byzsgd-fault check); a SIGTERM or Ctrl-C
    to the server stops rank 0 through its group, the server reaps it and exits non-zero."""
    provision(b"fork-server-test-operator-secret", 2, tmp_path / "creds")
    port = free_port()
    ps = _config(tmp_path, 0, port, startup_timeout=90.0)
    run_id = f"fork-test-{os.getpid()}-{time.time_ns()}"
    server = subprocess.Popen([PY, "-m", "byzsgd.deploy.fork_server", str(tmp_path / "ps0"), str(ps),
                               "--next", str(tmp_path / "worker1"), str(tmp_path / "missing.json")],
                              env=clean_env(BYZSGD_RUN_ID=run_id), cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (tmp_path / "worker1.rc").exists(), 90, 0.1, "worker1.rc")
        assert (tmp_path / "worker1.rc").read_text() == "2\n"
        assert "cannot read the configuration" in (tmp_path / "worker1.log").read_text()
        pid = int((tmp_path / "ps0.pid").read_text())
        assert int((tmp_path / "ps0.pgid").read_text()) == pid == os.getsid(pid) == os.getpgid(pid)
        assert rank_procs.alive(pid) and rank_procs.ppid(pid) == server.pid
        assert rank_procs.environ(pid).get("BYZSGD_RUN_ID") == run_id
        assert not (tmp_path / "ps0.rc").exists() and server.poll() is None  # outlives rank 1
        server.send_signal(sig)
        out, _ = server.communicate(timeout=30)
        ps_rc = int((tmp_path / "ps0.rc").read_text())
        assert server.returncode == (ps_rc or 2) != 0, out  # the first non-zero, in order
        assert not rank_procs.alive(pid) and children(server.pid) == set()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pidfile in tmp_path.glob("*.pid"):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


# ============================================================================ run_exp.sh
def _run_exp(tmp_path: Path, workers: int, flags: list[str], *extra: str, timeout: float = 170):
    (tmp_path / "servers").write_text("127.0.0.1\n")
    (tmp_path / "workers").write_text("127.0.0.1\nlocalhost\n" + "localhost\n" * (workers - 2))
    run = tmp_path / "run"
    return run, subprocess.run(
        ["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(tmp_path / "servers"), "--workers",
         str(tmp_path / "workers"), "--run_dir", str(run), "--base_port", str(free_port()),
         "--ports", "ephemeral", "--quiet", *extra, "--", "--num_ps", "1", "--num_workers", str(workers),
         *LIGHT, "--startup_timeout", "90", *flags],
        capture_output=True, text=True, timeout=timeout, env=clean_env(BYZSGD_RUNNER="local"))


def _forked_ranks(run: Path) -> tuple[dict, dict[int, int]]:
    """deployment.json and {rank: pid}, every rank checked to be a forked child of its host's
    one fork server, in its own session, recognised as the run's by kill.sh and byzsgd-fault."""
    doc = json.loads((run / "deployment.json").read_text())
    assert doc["spawn"] == "fork"
    servers = {h: int(p) for h, p in doc["fork_servers"].items()}
    assert set(servers) == {"127.0.0.1", "localhost"} and len(set(servers.values())) == 2
    pids = {}
    for r in doc["ranks"]:
        pid = int((run / f"{r['role']}{r['rank']}.pid").read_text())
        assert pid == r["pid"] == r["pgid"] == os.getsid(pid)
        assert rank_procs.ppid(pid) == servers[r["host"]]
        assert rank_procs.node_pid(run, r) == pid  # the pid check of kill.sh and byzsgd-fault
        pids[r["rank"]] = pid
    return doc, pids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_exp_fork_trains_with_one_server_per_host(tmp_path):
    run, res = _run_exp(tmp_path, 2, ["--num_iter", "20", "--acc_freq", "20", "--fw", "0", "--fps", "0",
                                      "--gar", "average"], "--spawn", "fork", "--detach")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((run / "deployment.json").read_text())
    servers = set(doc["fork_servers"].values())
    res = subprocess.run([PY, "-m", "byzsgd.deploy.cluster", "wait", str(run), "--json", "--quiet"],
                         capture_output=True, text=True, timeout=170, env=clean_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok" and summary["steps_done"] == {"0": 20}, summary
    assert summary["returncodes"] == {"0": 0, "1": 0, "2": 0}
    # the ranks of each host were forked by its one server (the run may be over before they
    # can be looked at: the live process tree is checked in the test below)
    assert doc["spawn"] == "fork" and set(doc["fork_servers"]) == {"127.0.0.1", "localhost"}
    assert len(servers) == 2
    for r in doc["ranks"]:
        stem = run / f"{r['role']}{r['rank']}"
        assert Path(f"{stem}.pid").read_text() == Path(f"{stem}.pgid").read_text() == f"{r['pid']}\n"
        server_log = (run / f"forkserver-{'ps0' if r['host'] == '127.0.0.1' else 'worker2'}.log").read_text()
        assert f"{stem}: pid {r['pid']}\n" in server_log and f"{stem}: exit 0\n" in server_log
        assert Path(f"{stem}.rc").read_text() == "0\n" and Path(f"{stem}.log").stat().st_size > 0
    assert not any(rank_procs.alive(p) for p in servers)
    assert run_ids_alive(doc["run_id"]) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_faults_and_kill_sh_act_on_forked_ranks(tmp_path):
    """byzsgd-fault pauses, resumes and kills a forked worker (its own .rc: 137) while the
    others train on; kill.sh then leaves outcome killed, 143 for the ranks it stopped, and no
    process of the run (the fork servers included)."""
    run, res = _run_exp(tmp_path, 4, ["--num_iter", "100000", "--fw", "1", "--fps", "0", "--gar", "median"],
                        "--spawn", "fork", "--detach")
    assert res.returncode == 0, res.stderr[-3000:]
    doc, pids = _forked_ranks(run)

    def steps() -> int:
        from byzsgd.deploy import summary as runsum
        return max(runsum.ps_steps(run).values() or [-1])

    def fault(*words: str) -> None:
        r = subprocess.run([PY, "-m", "byzsgd.deploy.faults", str(run), *words], capture_output=True,
                           text=True, timeout=60, env=clean_env(), cwd=ROOT)
        assert r.returncode == 0, r.stderr

    wait_for(lambda: steps() >= 2, 120, 0.2, "two steps")
    fault("pause", "4")
    assert rank_procs.proc_state(pids[4]) == "T"
    at = steps()
    wait_for(lambda: steps() >= at + 3, 60, 0.2, "steps without the paused worker")
    fault("resume", "4")
    wait_for(lambda: rank_procs.proc_state(pids[4]) in ("S", "R"), 10, 0.05, "the worker to resume")
    fault("kill", "4")
    wait_for(lambda: (run / "worker4.rc").exists(), 30, 0.1, "worker4.rc")
    assert (run / "worker4.rc").read_text() == "137\n"
    at = steps()
    wait_for(lambda: steps() >= at + 3, 60, 0.2, "steps without the killed worker")
    assert all(rank_procs.alive(pids[r]) for r in range(4))
    res = subprocess.run(["bash", str(SCRIPTS / "kill.sh"), str(run), "--grace", "5"],
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] == "killed", summary
    assert [summary["returncodes"][str(r)] for r in range(5)] == [143, 143, 143, 143, 137], summary
    assert [(run / f"{n}.rc").read_text().strip() for n in ("ps0", "worker1", "worker2", "worker3")] == ["143"] * 4
    assert run_ids_alive(doc["run_id"]) == []


# ============================================================================ SLURM
def test_slurm_refuses_an_unknown_spawn_before_anything(tmp_path):
    from tests.test_multihost import slurm_env

    res = subprocess.run(["bash", str(SCRIPTS / "slurm_byzsgd.sbatch")], capture_output=True, text=True,
                         timeout=60, env=slurm_env(tmp_path, 3, BYZSGD_SPAWN="zygote"))
    assert res.returncode == 2 and "BYZSGD_SPAWN must be fork or exec" in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_slurm_exec_path_still_runs_one_task_per_rank(tmp_path):
    """BYZSGD_SPAWN=exec: one srun task per rank, each its own interpreter, no fork server
    (the default, one fork server per node, is tests/test_multihost.py's SLURM run)."""
    from tests.test_multihost import slurm_env, trainer_flags

    conf = tmp_path / "exp.conf"
    conf.write_text(" ".join(trainer_flags(10)[:-2]).replace('{"lr":"0.1"}', "'{\"lr\":\"0.1\"}'") + "\n")
    res = subprocess.run(["bash", str(SCRIPTS / "slurm_byzsgd.sbatch")], capture_output=True, text=True,
                         timeout=170, env=slurm_env(tmp_path, 3, BYZSGD_CONF=str(conf), BYZSGD_SPAWN="exec"),
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads(res.stdout.strip().splitlines()[-1])["outcome"] == "ok"
    assert sorted(p.read_text() for p in run.glob("*.rc")) == ["0\n"] * 3
    assert not list(run.glob("forkserver-*")) and not list(run.glob("*.pgid"))


def test_run_exp_dry_run_shows_the_spawn_and_preflight_takes_it(tmp_path):
    (tmp_path / "servers").write_text("127.0.0.1\n")
    (tmp_path / "workers").write_text("127.0.0.1\n127.0.0.1\n")
    base = ["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(tmp_path / "servers"), "--workers",
            str(tmp_path / "workers"), "--run_dir", str(tmp_path / "run"), "--dry_run"]
    flags = ["--", "--num_ps", "1", "--num_workers", "2", "--fw", "0", "--fps", "0", "--gar", "average"]
    res = subprocess.run([*base, "--spawn", "fork", *flags], capture_output=True, text=True, timeout=90,
                         env=clean_env())
    assert res.returncode == 0, res.stderr
    assert "# 127.0.0.1: spawn fork" in res.stdout
    assert res.stdout.count("-m byzsgd.deploy.fork_server") == 1
    bad = subprocess.run([*base, "--spawn", "zygote", *flags], capture_output=True, text=True, timeout=90,
                         env=clean_env())
    assert bad.returncode == 2 and "--spawn" in bad.stderr and "zygote" in bad.stderr
