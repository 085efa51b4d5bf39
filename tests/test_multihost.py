"""Multi-host deployments: scripts/run_exp.sh, kill.sh, netns_cluster.sh, slurm_byzsgd.sbatch.

The end-to-end tests build a small "cluster" of network namespaces on one machine
(scripts/netns_cluster.sh, a private bridge, 10.77.0.0/24) and drive run_exp.sh with
``BYZSGD_RUNNER="ip netns exec"``: real processes on real (virtual) links, real MNIST.  They
need root and iproute2 and are skipped, with the reason, elsewhere.  Layout (5 hosts h0..h4):
PS 0..3 on h0..h3, workers 4..10 on h0 h1 h2 h3 h0 h1 h4 — h4 holds a single worker (fw = 1),
so cutting it off is a fault the deployment must ride out.

The measured figures (accuracy, step times) are printed as ``FIGURE ...`` lines (pytest -s).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.deploy import cluster
from byzsgd.deploy.host_scripts import RUN_ID_ENV, WRAPPER, start_script
from byzsgd.deploy.multihost import rank_credentials
from byzsgd.deploy.plan import make_plan, parse_hosts
from byzsgd.deploy.remote import runner_argv
from byzsgd.errors import ConfigError
from byzsgd.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
SUBNET = "10.77.0"

CONF = """\
# test configuration
--dataset mnist --model convnet --loss nll --optimizer sgd
--opt_args '{"lr":"0.1"}'
--batch 32 --gar median --fw 1 --fps 1
--eval_samples 2000 --log false
"""
# run_exp.sh flags of the plain-run comparison with the local launcher
STEPS = 200


def figure(name: str, value) -> None:
    print(f"\nFIGURE {name} = {value}", flush=True)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                  "LOCAL_RANK", "BYZSGD_SECRET", "BYZSGD_SECRET_FILE", "BYZSGD_CREDENTIALS",
                                                  "BYZSGD_RUNNER", "BYZSGD_MASTER"))}
    # the scripts and every host run the interpreter running the tests (issue: the suite
    # must pass from any environment byzsgd is installed in, not only the checkout's .venv)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), BYZSGD_PYTHON=PY)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ps_steps(run_dir: Path, num_ps: int = 4, skip=()) -> list[int]:
    """Steps completed by each PS (from its metrics file)."""
    out = []
    for r in range(num_ps):
        if r in skip:
            continue
        last = 0
        for rec in read_metrics(run_dir / f"metrics-ps{r}.jsonl"):
            if "step_time" in rec and "event" not in rec:
                last = rec["step"] + 1
        out.append(last)
    return out


def run_ids_alive(run_id: str) -> list[int]:
    """Every process on this machine whose environment carries the run's id."""
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def running_in_run(pid: int, run_id: str) -> bool:
    """Is ``pid`` a live (not zombie) process of the run (not a recycled pid)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and f"{RUN_ID_ENV}={run_id}".encode() in environ


# ============================================================================ fast unit tests
def plan_args(tmp_path: Path, servers: str, workers: str, conf: str = CONF, extra=(), **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "servers").write_text(servers)
    (tmp_path / "workers").write_text(workers)
    (tmp_path / "exp.conf").write_text(conf)
    argv = ["run", "--servers", str(tmp_path / "servers"), "--workers", str(tmp_path / "workers"),
            "--config", str(tmp_path / "exp.conf"), "--run_dir", str(tmp_path / "run"),
            "--runner", kw.pop("runner", "ip netns exec"), *kw.pop("flags", []), "--", *extra]
    args = cluster.build_parser().parse_args(argv)
    if args.trainer_flags[:1] == ["--"]:  # as cluster.main does
        args.trainer_flags = args.trainer_flags[1:]
    return args


def test_hosts_file_format():
    hosts = parse_hosts("# comment\nnode1\n\nalice@node2 addr=10.0.0.2 python=/opt/py "
                                "repo='/opt/by zsgd' dir=/scratch  # trailing\n")
    assert [h.name for h in hosts] == ["node1", "alice@node2"]
    assert hosts[0].addr == "node1" and hosts[1].addr == "10.0.0.2"
    assert hosts[1].python == "/opt/py" and hosts[1].repo == "/opt/by zsgd" and hosts[1].dir == "/scratch"
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_hosts("node1 port=3")
    with pytest.raises(ConfigError, match="starts with the host"):
        parse_hosts("addr=1.2.3.4")


def test_runner_command_lines():
    assert runner_argv("ssh -o BatchMode=yes", "n1") == ["ssh", "-o", "BatchMode=yes", "n1", "sh", "-s"]
    assert runner_argv("ip netns exec", "byz3") == ["ip", "netns", "exec", "byz3", "sh", "-s"]
    assert runner_argv("docker exec -i {host}", "c1") == ["docker", "exec", "-i", "c1", "sh", "-s"]
    assert runner_argv("local", "whatever") == ["sh", "-s"]


def test_plan_ranks_ports_and_flags(tmp_path):
    args = plan_args(tmp_path, "h0 addr=10.1.0.1\nh1 addr=10.1.0.2\n",
                     "h0 addr=10.1.0.1\nh1 addr=10.1.0.2 python=/p/python dir=/remote\nh2\n",
                     extra=["--num_iter", "7", "--fw", "0", "--fps", "0"], flags=["--base_port", "31000"])
    plan = make_plan(args)
    assert (plan.num_ps, plan.num_workers) == (2, 3)
    assert [r.role for r in plan.ranks] == ["ps", "ps", "worker", "worker", "worker"]
    assert [r.port for r in plan.ranks] == [31000, 31001, 31002, 31003, 31004]
    assert plan.master == "10.1.0.1:31000"
    w3 = plan.ranks[3].config
    assert w3.rank == 3 and w3.master == "10.1.0.1:31000" and w3.port == 31003
    assert w3.advertise_host == "10.1.0.2" and w3.credentials == "/remote/credentials/rank3.cred"
    assert w3.secret_file is None and not w3.insecure_shared_secret
    assert w3.num_iter == 7 and w3.metrics is None and plan.ranks[3].host.python == "/p/python"
    assert plan.ranks[1].config.metrics == str(tmp_path / "run" / "metrics-ps1.jsonl")
    assert plan.ranks[4].host.addr == "h2"


@pytest.mark.parametrize("extra, message", [
    (["--rank", "3"], "--rank is set per rank"),
    (["--master", "x:1"], "--master is set per rank"),
    (["--attack", "alie"], "--attack is set per rank"),
    (["--credentials", "/x/rank0.cred"], "--credentials is set per rank"),
    (["--credentials", "/x/rank0.cred", "--insecure_shared_secret", "true"], "--credentials is set per rank"),
    (["--num_ps", "5"], "the servers file lists 4"),
    (["--fw", "5"], "--fw must be in"),
    (["--gar", "krum"], "needs at least"),
])
def test_plan_refuses_bad_flags(tmp_path, extra, message):
    args = plan_args(tmp_path, "a\nb\nc\nd\n", "a\nb\nc\nd\ne\n", extra=extra)
    make_plan(plan_args(tmp_path / "ok", "a\nb\nc\nd\n", "a\nb\nc\nd\ne\n"))  # fine as is
    with pytest.raises(Exception, match=re.escape(message)):
        make_plan(args)


def test_each_host_gets_only_its_ranks_credentials_on_stdin(tmp_path):
    args = plan_args(tmp_path, "h0\n", "h1\nh1\n", extra=["--fw", "0", "--fps", "0"])
    plan = make_plan(args)
    assert not plan.insecure
    creds = rank_credentials(3)
    keys = {r: [k for k in json.loads(t)["keys"] if k] for r, t in creds.items()}
    assert all(json.loads(t)["rank"] == r for r, t in creds.items())
    for host, ranks in plan.hosts().items():
        mine = {r.rank for r in ranks}
        script = start_script(plan, ranks, None, "probe", creds={r: creds[r] for r in mine})
        for r, text in creds.items():
            lines = [line for line in script.splitlines() if text in line]
            if r in mine:  # through printf (a shell builtin) into <dir>/credentials/rank<r>.cred
                assert len(lines) == 1 and "printf '%s' " in lines[0] and f"/credentials/rank{r}.cred" in lines[0]
                assert "umask 077" in script.splitlines()[:2]
            else:  # no other rank's file, nor any pair key without one of this host's ranks
                assert not lines
                assert not [k for k in keys[r] if k in script and not any(k in keys[m] for m in mine)]
        assert "/secret" not in script and all(r.config.secret_file is None for r in ranks)
        for r in ranks:
            assert creds[r.rank] not in r.config.to_json()
            assert r.config.credentials == f"{r.dir}/credentials/rank{r.rank}.cred"
        redacted = start_script(plan, ranks, None, "probe", redact=True)
        assert not any(k in redacted for ks in keys.values() for k in ks)
        assert all(f"<credentials of rank {r}>" in redacted for r in mine)


def test_secret_file_only_with_the_insecure_mode(tmp_path):
    args = plan_args(tmp_path, "h0\n", "h1\n", extra=["--fw", "0", "--fps", "0"],
                     flags=["--secret_file", str(tmp_path / "s")])
    with pytest.raises(ConfigError, match="--insecure_shared_secret"):
        make_plan(args)


def test_secret_travels_on_stdin_only_in_the_insecure_mode(tmp_path):
    args = plan_args(tmp_path, "h0\n", "h1\nh1\n",
                     extra=["--fw", "0", "--fps", "0", "--insecure_shared_secret", "true"])
    plan = make_plan(args)
    assert plan.insecure and all(r.config.credentials is None for r in plan.ranks)
    secret = "f00dfeed" * 8
    for host, ranks in plan.hosts().items():
        script = start_script(plan, ranks, secret, "probe")
        lines = [line for line in script.splitlines() if secret in line]
        assert len(lines) == 1 and lines[0].startswith("printf '%s\\n' ")  # a shell builtin
        assert secret not in " ".join(runner_argv(plan.runner, host))
        for r in ranks:
            assert secret not in r.config.to_json()


def test_every_flag_round_trips_through_the_multihost_plan(tmp_path):
    """A configuration built from flags, shipped by the multi-host plan (the host script's own
    line writes each rank's JSON) and loaded as the node loads it, equals the original in every
    shared field, and holds the plan's value in every per-rank one."""
    from dataclasses import replace

    from byzsgd.config import RunConfig
    from byzsgd.deploy import shipped
    from byzsgd.deploy.plan import NODE_COMMAND, OWNED_FLAGS, TLS_FLAGS
    from byzsgd.flags import default_of, flag_fields, to_argv
    from tests.test_config import _every_flag_set

    # every flag away from its default, and valid on this machine (5 PS: strict resilience)
    original = RunConfig.from_argv(replace(_every_flag_set(), num_ps=5, device="cpu",
                                           worker_momentum=0.9).to_argv())
    per_rank = set(OWNED_FLAGS) | set(TLS_FLAGS)
    shared = [f.name for f, _ in flag_fields(RunConfig) if f.name not in per_rank]
    assert [n for n in shared if getattr(original, n) == default_of(
        next(f for f, _ in flag_fields(RunConfig) if f.name == n))] == ["optimizer", "gar_args",
        "check_gradients", "scheduled_byzantine"]  # as in test_every_flag_round_trips_through_argv
    for k in TLS_FLAGS:
        (tmp_path / f"{k}.pem").write_text(f"-- {k} --\n")
    args = plan_args(tmp_path, "".join(f"h{i}\n" for i in range(original.num_ps)),
                     "".join(f"h{i}\n" for i in range(original.num_workers)), conf="",
                     extra=to_argv(original, skip=per_rank),
                     flags=[a for k in TLS_FLAGS for a in (f"--{k}", str(tmp_path / f"{k}.pem"))])
    plan = make_plan(args)
    for host, ranks in plan.hosts().items():
        script = start_script(plan, ranks, "s3cret", "probe").splitlines()
        for r in ranks:
            write = [line for line in script if line.startswith("printf") and r.remote_config in line]
            assert len(write) == 1 and any(" ".join(NODE_COMMAND) + " " + r.remote_config in line
                                           for line in script)
            subprocess.run(["sh", "-c", write[0]], check=True)  # what the host runs
            loaded = shipped.load(r.remote_config)
            assert loaded == r.config
            assert {n: getattr(loaded, n) for n in shared} == {n: getattr(original, n) for n in shared}
            assert (loaded.rank, loaded.master, loaded.port) == (r.rank, plan.master, r.port)
            assert (loaded.advertise_host, loaded.listen_host) == (host, "0.0.0.0")
            assert loaded.metrics == r.remote_metrics and loaded.secret_file == f"{r.dir}/secret"
            assert (loaded.credentials, loaded.peers, loaded.attack, loaded.attack_args) == (None, None, None, {})
            assert all(getattr(loaded, k) == f"{r.dir}/{k.replace('_', '-')}.pem" for k in TLS_FLAGS)
    bad = tmp_path / "bad.json"
    bad.write_text(plan.ranks[0].config.to_json().replace('"num_iter": 11', '"num_iter": "many"'))
    with pytest.raises(ConfigError, match="num_iter"):
        shipped.load(str(bad))


def test_per_rank_flags_come_from_the_declarations():
    """The per-rank and launcher-only lists are read from the flags' declarations."""
    from byzsgd.config import RunConfig
    from byzsgd.deploy import local, plan
    from byzsgd.deploy.options import LaunchConfig
    from byzsgd.experiments import spec
    from byzsgd.flags import LAUNCHER, PER_RANK, flag_fields

    scope = {f.name: fl.scope for cls in (RunConfig, LaunchConfig) for f, fl in flag_fields(cls)}
    assert set(plan.OWNED_FLAGS) == {n for n, s in scope.items() if s == PER_RANK} >= {
        "rank", "master", "port", "listen_host", "advertise_host", "secret_file", "metrics", "peers",
        "credentials", "attack", "attack_args"}
    assert set(local.NODE_OWN) == set(plan.OWNED_FLAGS) | {"byzantine"}
    assert set(spec.LAUNCHER_ONLY) == {f.name for f, _ in flag_fields(LaunchConfig)}
    assert all(scope[n] == LAUNCHER for n in spec.LAUNCHER_ONLY)


def test_kill_stops_exactly_the_runs_processes(tmp_path):
    """kill.sh on a hand-made run (local runner): the run's process groups go, a look-alike
    process outside the run (same command line) stays."""
    run = tmp_path / "run"
    run.mkdir()
    run_id = f"test-{os.getpid()}-{time.time_ns()}"
    wrapper = WRAPPER
    procs = []
    for rank in range(2):
        stem = run / f"worker{rank}"
        # the trainer's stand-in ignores SIGTERM: kill.sh must escalate to SIGKILL
        procs.append(subprocess.Popen(
            ["setsid", "sh", "-c", wrapper, "byzsgd-rank", str(stem), PY, "-c",
             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
            env=clean_env(**{RUN_ID_ENV: run_id}), stdin=subprocess.DEVNULL))
    bystander = subprocess.Popen([PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); time.sleep(300)"], env=clean_env())
    try:
        wait_for(lambda: all((run / f"worker{r}.pid").exists() for r in range(2)), 10, 0.05, "pid files")
        ranks = [dict(rank=r, role="worker", host="here", remote_dir=str(run), pid=None, pgid=None)
                 for r in range(2)]
        (run / "deployment.json").write_text(json.dumps(dict(
            run_id=run_id, runner="local", run_dir=str(run), ranks=ranks, started=time.time())))
        pids = [int((run / f"worker{r}.pid").read_text()) for r in range(2)]
        assert sorted(run_ids_alive(run_id)) == sorted(pids + [p.pid for p in procs])
        t0 = time.monotonic()
        res = subprocess.run(["bash", str(SCRIPTS / "kill.sh"), str(run), "--grace", "1"],
                             capture_output=True, text=True, timeout=60, env=clean_env())
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - t0 < 15
        for p in procs:
            p.wait(5)
        assert run_ids_alive(run_id) == []
        assert bystander.poll() is None, "kill.sh hit a process outside the run"
    finally:
        bystander.kill()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_local_runner_with_separate_host_dirs_collects_the_files(tmp_path):
    """BYZSGD_RUNNER=local, hosts with their own dir= (no shared run directory): the logs,
    metrics and exit codes are copied back through the runner at the end."""
    (tmp_path / "servers").write_text(f"127.0.0.1 dir={tmp_path}/hostA python={PY}\n")
    (tmp_path / "workers").write_text(f"127.0.0.1 dir={tmp_path}/hostB\n127.0.0.1 dir={tmp_path}/hostB\n")
    run = tmp_path / "run"
    port = free_port()
    res = subprocess.run(["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(tmp_path / "servers"),
                          "--workers", str(tmp_path / "workers"), "--run_dir", str(run), "--base_port",
                          str(port), "--ports", "ephemeral", "--json", "--quiet", "--timeout", "150",
                          "--", *trainer_flags(10)],
                         capture_output=True, text=True, timeout=170, env=clean_env(BYZSGD_RUNNER="local"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok" and summary["steps_done"] == {"0": 10}
    doc = json.loads((run / "deployment.json").read_text())
    assert doc["shared_dirs"] == {"127.0.0.1": False}
    assert [r["port"] for r in doc["ranks"]] == [port, None, None]
    for r in doc["ranks"]:
        assert Path(r["log"]).parent == run and Path(r["log"]).exists()
        assert (run / f"{r['role']}{r['rank']}.rc").read_text().strip() == "0"
    # each host got the credentials of its own ranks only (0600, directory 0700), no secret
    assert sorted(p.name for p in (tmp_path / "hostA" / "credentials").iterdir()) == ["rank0.cred"]
    assert sorted(p.name for p in (tmp_path / "hostB" / "credentials").iterdir()) == ["rank1.cred", "rank2.cred"]
    for d in (tmp_path / "hostA" / "credentials", tmp_path / "hostB" / "credentials"):
        assert d.stat().st_mode & 0o777 == 0o700
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in d.iterdir())
    assert not (tmp_path / "hostA" / "secret").exists() and not (tmp_path / "hostB" / "secret").exists()
    assert not (run / "credentials").exists() and not (run / "secret").exists()
    assert set(summary["rejections"]) == {"0", "1", "2"}  # every rank reported (nothing refused)
    assert (run / "metrics-ps0.jsonl").read_text() == (tmp_path / "hostA" / "metrics-ps0.jsonl").read_text()
    # the host's one fork server (its log beside its first rank's, on hostA) was collected too
    assert doc["spawn"] == "fork" and set(doc["fork_servers"]) == {"127.0.0.1"}
    server_log = (run / "forkserver-ps0.log").read_text()
    assert server_log == (tmp_path / "hostA" / "forkserver-ps0.log").read_text()
    assert all(f"{r['remote_dir']}/{r['role']}{r['rank']}: exit 0\n" in server_log for r in doc["ranks"]), server_log


# ============================================================================ SLURM / torchrun
def trainer_flags(steps: int = 30, num_ps: int = 1, num_workers: int = 2) -> list[str]:
    return ["--num_ps", str(num_ps), "--num_workers", str(num_workers), "--fw", "0", "--fps", "0",
            "--gar", "average", "--num_iter", str(steps), "--acc_freq", str(steps),
            "--eval_samples", "1000", "--opt_args", '{"lr":"0.1"}', "--log", "false",
            "--startup_timeout", "60"]


def trainer_vanilla(steps: int = 30, num_workers: int = 2) -> float:
    """What trainer_flags' run computes, in this process (tests/vanilla.py): 47.45% at 30 steps."""
    from tests.vanilla import vanilla_accuracy
    return vanilla_accuracy(steps, num_workers, batch=32, opt_args={"lr": "0.1"})


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_trainer_takes_rank_and_master_from_torchrun_env(tmp_path):
    """No --rank / --master: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT only."""
    from byzsgd.net.credentials import credentials_path, provision
    provision(b"torchrun-test-operator-secret", 3, tmp_path / "creds")
    port = free_port()
    procs = []
    for rank in range(3):
        flags = trainer_flags()
        if rank == 0:
            flags += ["--metrics", str(tmp_path / "metrics-ps0.jsonl")]
        env = clean_env(RANK=str(rank), WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        BYZSGD_CREDENTIALS=str(credentials_path(tmp_path / "creds", rank)))
        procs.append(subprocess.Popen([PY, "-m", "byzsgd.trainer", *flags], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    done = [r for r in read_metrics(tmp_path / "metrics-ps0.jsonl") if r.get("event") == "done"]
    # one PS averaging 2 workers' gradients is plain SGD: it ends where SGD in this process does
    assert done and done[0]["final_accuracy"] >= trainer_vanilla() - 5.0, (done, trainer_vanilla())


def fake_slurm_bin(tmp_path: Path) -> Path:
    """`srun` (N local tasks, SLURM_PROCID set) and `scontrol show hostnames` stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && "
                                      "printf '127.0.0.1\\nlocalhost\\n'\n")
    (bin_dir / "srun").write_text("""#!/usr/bin/env bash
n=${SLURM_NTASKS:-1}
while [[ $1 == -* ]]; do
  case $1 in --ntasks=*) n=${1#*=} ;; -n|--ntasks) n=$2; shift ;; esac
  shift
done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait $p || rc=$?; done
exit $rc
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(tmp_path: Path, ntasks: int, **extra) -> dict:
    return clean_env(PATH=f"{fake_slurm_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                     SLURM_NTASKS=str(ntasks), SLURM_JOB_NODELIST="node[1-2]",
                     SLURM_SUBMIT_DIR=str(ROOT), BYZSGD_RUN_DIR=str(tmp_path / "run"),
                     BYZSGD_MASTER_PORT=str(free_port()), **extra)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", [False, True], ids=["shared", "staged"])
def test_slurm_batch_script_with_srun(tmp_path, stage):
    conf = tmp_path / "exp.conf"
    conf.write_text(" ".join(trainer_flags()[:-2]).replace('{"lr":"0.1"}', "'{\"lr\":\"0.1\"}'") + "\n")
    staging = tmp_path / "node-local"
    staging.mkdir()
    extra = dict(BYZSGD_STAGE_CREDENTIALS="1", BYZSGD_STAGE_DIR=str(staging)) if stage else {}
    res = subprocess.run(["bash", str(SCRIPTS / "slurm_byzsgd.sbatch")], capture_output=True, text=True,
                         timeout=170, env=slurm_env(tmp_path, 3, BYZSGD_CONF=str(conf), **extra), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    run = tmp_path / "run"
    doc = json.loads((run / "deployment.json").read_text())
    assert [(r["rank"], r["role"]) for r in doc["ranks"]] == [(0, "ps"), (1, "worker"), (2, "worker")]
    assert doc["master"].startswith("127.0.0.1:") and all(r["pid"] > 0 for r in doc["ranks"])
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["outcome"] == "ok" and summary["final_accuracy"]["0"] >= trainer_vanilla() - 5.0, \
        (summary, trainer_vanilla())
    # provisioned before srun: one 0600 file per rank in a 0700 directory, no shared secret;
    # staged: each task moved its own file to node-local disk and removed it at exit
    creds = run / "credentials"
    assert creds.stat().st_mode & 0o777 == 0o700 and not (run / "secret").exists()
    if stage:
        assert list(creds.iterdir()) == [] and list(staging.iterdir()) == []
    else:
        assert sorted(p.name for p in creds.iterdir()) == ["rank0.cred", "rank1.cred", "rank2.cred"]
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in creds.iterdir())
    assert {(run / f"{r['role']}{r['rank']}.rc").read_text().strip() for r in doc["ranks"]} == {"0"}


def test_slurm_batch_script_refuses_a_world_size_mismatch(tmp_path):
    conf = tmp_path / "exp.conf"
    conf.write_text("--num_ps 1 --num_workers 2\n")
    res = subprocess.run(["bash", str(SCRIPTS / "slurm_byzsgd.sbatch")], capture_output=True, text=True,
                         timeout=60, env=slurm_env(tmp_path, 5, BYZSGD_CONF=str(conf)))
    assert res.returncode == 2 and "SLURM_NTASKS=5" in res.stderr, res.stderr
    assert not (tmp_path / "run" / "secret").exists() and not (tmp_path / "run" / "credentials").exists()


def test_slurm_batch_script_checks_the_flags_once_before_srun(tmp_path):
    """The configuration is checked and written on the batch host; a bad one never reaches srun
    (before, every task took this per-rank flag, meant for one host, and failed to bind)."""
    message = "--listen_host is set per rank"
    (tmp_path / "exp.conf").write_text("--num_ps 1 --num_workers 2 --listen_host 10.0.0.9\n")
    res = subprocess.run(["bash", str(SCRIPTS / "slurm_byzsgd.sbatch")], capture_output=True, text=True,
                         timeout=60, env=slurm_env(tmp_path, 3, BYZSGD_CONF=str(tmp_path / "exp.conf")))
    assert res.returncode == 2 and message in res.stderr and "bad trainer flags" in res.stderr, res.stderr
    assert not (tmp_path / "run" / "config.json").exists() and not list((tmp_path / "run").glob("*.log"))


@pytest.mark.timeout(40)
def test_trainer_refuses_world_size_mismatch():
    """WORLD_SIZE (torchrun) disagreeing with --num_ps + --num_workers: a clear error at start."""
    env = clean_env(RANK="0", WORLD_SIZE="5", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    BYZSGD_SECRET="x" * 32)
    res = subprocess.run([PY, "-m", "byzsgd.trainer", *trainer_flags(), "--startup_timeout", "3"],
                         capture_output=True, text=True, timeout=12, env=env, cwd=ROOT)
    assert res.returncode != 0 and "WORLD_SIZE" in res.stderr


# ============================================================================ network namespaces
def _netns_skip_reason() -> str | None:
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, veth, bridge)"
    if not shutil.which("ip"):
        return "needs iproute2 ('ip'): apt-get install -y iproute2"
    if not shutil.which("setsid"):
        return "needs setsid (util-linux)"
    return None


class NetNS:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.env = clean_env(BYZSGD_NETNS_PREFIX=prefix, BYZSGD_NETNS_SUBNET=SUBNET)
        self.hosts = [f"{prefix}{i}" for i in range(5)]
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(5)]

    def sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["bash", str(SCRIPTS / "netns_cluster.sh"), *args], capture_output=True,
                             text=True, env=self.env, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"netns_cluster.sh {' '.join(args)}: {res.stderr}")
        return res

    def line(self, i: int) -> str:
        return f"{self.hosts[i]} addr={self.addrs[i]}\n"

    @property
    def servers(self) -> str:
        return "".join(self.line(i) for i in range(4))

    @property
    def workers(self) -> str:
        return "".join(self.line(i) for i in (0, 1, 2, 3, 0, 1, 4))

    def tcp_received(self, i: int) -> dict[tuple[str, str], int]:
        """{(local, peer): bytes received} of the established TCP connections of host i (ss -ti)."""
        res = subprocess.run(["ip", "netns", "exec", self.hosts[i], "ss", "-tinH", "state", "established"],
                             capture_output=True, text=True, timeout=10)
        out, key = {}, None
        for line in res.stdout.splitlines():
            words = line.split()
            if not line[:1].isspace() and len(words) >= 4:
                key = (words[-2], words[-1])  # ... local-address:port peer-address:port
            else:
                m = re.search(r"bytes_received:(\d+)", line)
                if m and key:
                    out[key] = int(m.group(1))
        return out

    def traffic_since(self, i: int, before: dict) -> int:
        """Most bytes any connection of host i received since the ``tcp_received`` snapshot
        ``before`` (a connection made since counts from 0: a reconnect is traffic too)."""
        now = self.tcp_received(i)
        return max([n - before.get(k, 0) for k, n in now.items()] or [0])


@pytest.fixture(scope="module")
def netns():
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    nt = NetNS(f"bt{os.getpid() % 10000}")
    res = nt.sh("up", "5", check=False)
    if res.returncode != 0:
        nt.sh("down", check=False)
        pytest.skip(f"cannot create network namespaces here: {res.stderr.strip()[-300:]}")
    atexit.register(nt.sh, "down", check=False)  # even if the session is interrupted
    try:
        yield nt
    finally:
        nt.sh("down", check=False)


def start_run(nt: NetNS, tmp_path: Path, *flags: str, options=(), timeout: int = 280) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "servers").write_text(nt.servers)
    (tmp_path / "workers").write_text(nt.workers)
    (tmp_path / "exp.conf").write_text(CONF)
    run = tmp_path / "run"
    cmd = ["bash", str(SCRIPTS / "run_exp.sh"), "--servers", str(tmp_path / "servers"),
           "--workers", str(tmp_path / "workers"), "--config", str(tmp_path / "exp.conf"),
           "--run_dir", str(run), "--json", "--quiet", "--timeout", str(timeout), *options, "--", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(nt.env, BYZSGD_RUNNER="ip netns exec"), cwd=tmp_path)
    return proc, run


def finish_run(proc: subprocess.Popen, run: Path, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert out.strip(), err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["outcome"] == "ok", (summary, err[-3000:])
    assert proc.returncode == 0, err[-3000:]
    doc = json.loads((run / "deployment.json").read_text())
    assert run_ids_alive(doc["run_id"]) == [], "processes of the run left behind"
    return summary


FIGURES: dict = {}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_netns_run_trains_like_the_local_launcher(netns, tmp_path):
    """4 PS (fps=1) + 7 workers (fw=1) over 5 hosts: same accuracy as the one-machine launcher."""
    flags = ["--num_iter", str(STEPS), "--acc_freq", str(STEPS)]
    proc, run = start_run(netns, tmp_path, *flags)
    summary = finish_run(proc, run)
    doc = json.loads((run / "deployment.json").read_text())
    assert len({r["host"] for r in doc["ranks"]}) == 5
    assert {r["addr"] for r in doc["ranks"]} == set(netns.addrs)
    for r in doc["ranks"]:
        assert r["pid"] and r["pgid"] and r["port"] == 29500 + r["rank"] and Path(r["log"]).exists()
        assert (run / f"{r['role']}{r['rank']}.pid").read_text().strip() == str(r["pid"])
    assert set(summary["returncodes"].values()) == {0}
    multi = summary["min_accuracy"]
    FIGURES["step_time_plain"] = summary["median_step_time"]
    figure("multihost_accuracy_200_steps", summary["final_accuracy"])
    figure("multihost_median_step_time_s", summary["median_step_time"])
    # the same deployment on loopback through the launcher
    res = subprocess.run([PY, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(tmp_path / "local"),
                          "--num_ps", "4", "--fps", "1", "--num_workers", "7", "--fw", "1", "--gar", "median",
                          "--opt_args", '{"lr":"0.1"}', "--eval_samples", "2000",
                          "--pre_agg", "none", "--worker_momentum", "0", *flags],  # the trainer's defaults
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    local = json.loads(res.stdout.strip().splitlines()[-1])
    figure("launcher_accuracy_200_steps", local["final_accuracy"])
    figure("launcher_median_step_time_s", local["median_step_time"])
    assert multi >= 85.0 and local["min_accuracy"] >= 85.0, (multi, local["min_accuracy"])
    assert abs(multi - local["min_accuracy"]) <= 4.0, (multi, local["min_accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_cut_host_does_not_stop_the_others_and_rejoins(netns, tmp_path):
    steps = 250   # enough left after the heal, however fast this machine is today
    proc, run = start_run(netns, tmp_path, "--num_iter", str(steps), "--acc_freq", str(steps))
    try:
        wait_for(lambda: min(ps_steps(run)) >= 20, 150, what="20 steps")
        netns.sh("cut", "4")   # h4: worker 10 only
        cut_at, t_cut = min(ps_steps(run)), time.monotonic()
        # the others keep training while h4 is away ...
        wait_for(lambda: min(ps_steps(run)) >= cut_at + 25, 60, what="progress while h4 is cut off")
        time.sleep(max(0.0, 8 - (time.monotonic() - t_cut)))
        down_steps = min(ps_steps(run)) - cut_at
        down_for = time.monotonic() - t_cut
        received = netns.tcp_received(4)
        netns.sh("heal", "4")
        healed_at = min(ps_steps(run))
        figure("steps_done_while_h4_cut", f"{down_steps} in {down_for:.1f}s")
        # ... and its worker is back in the exchange once the link is (TCP traffic flows again)
        wait_for(lambda: netns.traffic_since(4, received) > 100_000, 60, 0.2, what="h4's worker to rejoin")
        figure("h4_rejoined_after_steps", min(ps_steps(run)) - healed_at)
    except BaseException:
        netns.sh("heal", "4", check=False)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        raise
    summary = finish_run(proc, run)
    assert summary["steps_done"] == {str(r): steps for r in range(4)}
    assert summary["returncodes"]["10"] == 0, summary  # the cut worker finished with the others
    assert summary["min_accuracy"] > 80.0



@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_partitioned_ps_jumps_to_its_peers_after_the_heal(netns, tmp_path):
    """h3 holds PS 3 (and worker 7): cut off, it cannot step while the other three PSes and
    six workers go on (q_ps = 3, q_w = 6); once the link is back, it takes its peers' newer
    models and jumps to their step -- ``jump`` events in its metrics -- instead of redoing
    the steps it missed.  The first models to arrive after the heal can be ones the peers
    queued during the cut (the kernel retransmits them first), so the catch-up may take more
    than one jump: what counts is that it jumps to where the peers were and computes hardly
    any of the steps in between itself."""
    steps = 250
    proc, run = start_run(netns, tmp_path, "--num_iter", str(steps), "--acc_freq", str(steps))

    def jumps():
        return [r for r in read_metrics(run / "metrics-ps3.jsonl") if r.get("event") == "jump"]
    try:
        wait_for(lambda: min(ps_steps(run)) >= 20, 150, what="20 steps")
        before = len(jumps())
        netns.sh("cut", "3")
        cut_at = max(ps_steps(run))
        wait_for(lambda: min(ps_steps(run, skip=(3,))) >= cut_at + 25, 90, what="progress while h3 is cut off")
        stuck_at = ps_steps(run)[3]
        ahead = min(ps_steps(run, skip=(3,)))
        assert ahead - stuck_at >= 20, (ahead, stuck_at)  # PS 3 really fell behind
        netns.sh("heal", "3")
        wait_for(lambda: any(j["to_step"] >= ahead - 1 for j in jumps()[before:]), 90, 0.2,
                 what="PS 3 to jump to its peers' step")
    except BaseException:
        netns.sh("heal", "3", check=False)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
        raise
    after = jumps()[before:]
    figure("ps3_jump_after_partition", f"jumps {[(j['step'], j['to_step']) for j in after]} (stuck at "
                                       f"{stuck_at}, peers at {ahead} when healed)")
    # the steps PS 3 computed itself between where it was stuck and where its peers were (its
    # last records before the cut may reach the file after the sample: jumped from 23 when
    # read stuck at 21, once)
    assert after[0]["step"] <= stuck_at + 5, (after, stuck_at, ahead)
    computed = {r["step"] for r in read_metrics(run / "metrics-ps3.jsonl")
                if "step_time" in r and "event" not in r and stuck_at <= r["step"] < ahead - 1}
    assert len(computed) <= 5 < ahead - stuck_at, (sorted(computed), after, stuck_at, ahead)
    summary = finish_run(proc, run)
    assert summary["steps_done"] == {str(r): steps for r in range(4)}, summary
    assert summary["returncodes"]["3"] == 0, summary

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_impaired_host_still_finishes(netns, tmp_path):
    """netem 50 ms delay on h1 (PS 1, workers 5 and 9); where the kernel has no netem, 1% loss
    (nftables, both directions)."""
    res = netns.sh("impair", "1", "delay", "50ms", check=False)
    kind = "delay 50ms"
    if res.returncode != 0:
        res = netns.sh("impair", "1", "loss", "1", check=False)
        kind = "loss 1%"
    if res.returncode != 0:
        pytest.skip(f"neither netem nor nftables here: {res.stderr.strip()}")
    figure("impairment", f"{kind} on h1 via: {res.stdout.strip()}")
    try:
        proc, run = start_run(netns, tmp_path, "--num_iter", "120", "--acc_freq", "120")
        summary = finish_run(proc, run)
    finally:
        netns.sh("clear", "1", check=False)
    assert summary["steps_done"] == {str(r): 120 for r in range(4)}
    figure(f"median_step_time_s_with_{kind.replace(' ', '_')}", summary["median_step_time"])
    figure("median_step_time_s_without", FIGURES.get("step_time_plain"))
    assert summary["min_accuracy"] > 80.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tls_run_and_kill_leaves_nothing(netns, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("needs openssl to make the test certificates")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=byzsgd-test"],
                   check=True, capture_output=True, timeout=60)
    proc, run = start_run(netns, tmp_path, "--num_iter", "300", "--acc_freq", "300",
                          options=["--tls_cert", str(cert), "--tls_key", str(key), "--tls_ca", str(cert),
                                   "--detach"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads((run / "deployment.json").read_text())
    run_id = doc["run_id"]
    try:
        wait_for(lambda: min(ps_steps(run)) >= 10, 150, what="10 steps over TLS")
        # the master really speaks TLS with our certificate, seen from another host
        res = subprocess.run(["ip", "netns", "exec", netns.hosts[4], PY, "-c",
                              "import ssl; print(ssl.get_server_certificate(('%s', 29500)))" % netns.addrs[0]],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert "".join(res.stdout.split()) == "".join(cert.read_text().split())
        keys = [k for k in json.loads((run / "credentials" / "rank0.cred").read_text())["keys"] if k]
        alive = run_ids_alive(run_id)
        # 11 ranks + one fork server per host (or, with --spawn exec, one wrapper per rank)
        assert len(alive) >= 11 + (len(doc["fork_servers"]) if doc.get("spawn") == "fork" else 11)
        for pid in alive:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert not any(k in cmdline for k in keys)
        for r in doc["ranks"]:
            assert r["pid"] in alive and r["pgid"] in alive
            shipped = json.loads(Path(r["config"]).read_text())["fields"]  # what the rank runs with
            assert r["cmd"][-1] == r["config"] and shipped["tls_cert"] == f"{r['remote_dir']}/tls-cert.pem"
    finally:
        t0 = time.monotonic()
        res = subprocess.run(["bash", str(SCRIPTS / "kill.sh"), str(run)], capture_output=True, text=True,
                             timeout=90, env=dict(netns.env))
        figure("kill_sh_seconds", round(time.monotonic() - t0, 2))
    assert res.returncode == 0, res.stderr
    assert run_ids_alive(run_id) == []
    for r in doc["ranks"]:
        assert not running_in_run(r["pid"], run_id) and not running_in_run(r["pgid"], run_id)


def test_a_runner_that_times_out_gives_text_like_any_other_answer(monkeypatch):
    """``subprocess.TimeoutExpired`` carries the partial output as bytes even with text=True:
    a host that answered part of a status script and then hung (a loaded machine, a slow ssh)
    crashed ``poll`` with "a bytes-like object is required" and stopped run_exp.sh."""
    from byzsgd.deploy.multihost import poll
    from byzsgd.deploy.remote import run_script

    res = run_script("local", "127.0.0.1", "echo byzsgd-status 3 1 -\nsleep 30\n", timeout=1.0)
    assert res.returncode == 124 and isinstance(res.stdout, str), res
    assert "byzsgd-status 3 1 -" in res.stdout

    import byzsgd.deploy.multihost as mh
    doc = {"runner": "local", "run_id": "x", "ranks": [{"host": "127.0.0.1", "rank": 3}]}
    monkeypatch.setattr(mh, "status_script", lambda run_id, ranks: "")
    monkeypatch.setattr(mh, "run_script", lambda runner, host, script, timeout=30: res)
    assert poll(doc) == {3: {"alive": True, "rc": None}}
