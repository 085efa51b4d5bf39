"""Fault injection (byzsgd.deploy.faults, ``byzsgd-fault``) and the launcher's faults.json.

Fast tests drive the command against stand-in processes; the slow ones run real deployments
(4 PS fps=1 + 5 workers fw=1, median, MNIST) and kill, pause and restart nodes mid-run.
The slow tests print a ``FIGURES`` line with what they measured (pytest -s to see it).

Reference (no fault, same flags, loaded 2-core box): 200 steps: every PS 93.36-93.38%,
max step time 0.28 s; 350 steps: 94.40-94.55%, and the final models of the three PSes that
gather each other are bit-identical while the fourth differs by ||m3-m0||/||m0|| = 1.15%
(0.99% at step 300) -- the spread the gather leaves; a restarted PS is held to the same.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from byzsgd.deploy import local
from byzsgd.metrics import read_metrics

from byzsgd.deploy import faults as fault
from byzsgd.deploy import rank_procs

ROOT = Path(__file__).resolve().parent.parent
FAULT = [sys.executable, "-m", "byzsgd.deploy.faults"]

SMALL = ["--num_ps", "4", "--fps", "1", "--num_workers", "5", "--fw", "1", "--gar", "median",
         "--opt_args", '{"lr":"0.1"}', "--resend_after", "5"]
#: no-fault reference is ~93.4% at 200 steps; a fault costs at most a few points
GOOD_ACCURACY = 88.0
#: a step that waited for a dead/paused node would take >= resend_after (5 s)
QUORUM_STEP_S = 2.5


# -- stand-in nodes -------------------------------------------------------------------
def _fake_run(tmp_path: Path, rank: int = 5) -> tuple[Path, subprocess.Popen]:
    """A run directory whose rank ``rank`` is a sleeping process with a node's argv."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "secret").write_text("s3cret")
    os.chmod(run_dir / "secret", 0o600)
    env_out = run_dir / "env.out"
    code = ("import os, sys, time; open(sys.argv[1] + '.' + str(os.getpid()), 'w').write("
            "os.environ.get('BYZSGD_SECRET_FILE', '') + ' ' + os.environ.get('BYZSGD_SECRET', '-'));"
            "print('node up', flush=True); time.sleep(120)")
    cmd = [sys.executable, "-c", code, str(env_out), "--rank", str(rank), "--peers",
           str(run_dir / "deployment.json")]
    log = run_dir / f"worker{rank}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    (run_dir / f"worker{rank}.pid").write_text(str(proc.pid))
    doc = dict(num_ps=1, num_workers=1, host="127.0.0.1", run_dir=str(run_dir),
               ranks=[dict(rank=0, role="ps", host="127.0.0.1", port=1, pid=None, byzantine=False,
                           log=str(run_dir / "ps0.log"), metrics=str(run_dir / "metrics-ps0.jsonl"),
                           cmd=["true"]),
                      dict(rank=rank, role="worker", host="127.0.0.1", port=2, pid=proc.pid,
                           byzantine=False, log=str(log), metrics=None, cmd=cmd)])
    (run_dir / "deployment.json").write_text(json.dumps(doc))
    return run_dir, proc


def _fault(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*FAULT, str(run_dir), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "BYZSGD_SECRET": "must-not-leak"})


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_pause_resume_kill_restart_a_stand_in_node(tmp_path):
    run_dir, proc = _fake_run(tmp_path)
    try:
        r = _fault(run_dir, "pause", "5")
        assert r.returncode == 0, r.stderr
        _wait(lambda: fault.proc_state(proc.pid) == "T")
        assert fault.read_faults(run_dir)["paused"] == [5]
        r = _fault(run_dir, "resume", "5")
        assert r.returncode == 0, r.stderr
        _wait(lambda: fault.proc_state(proc.pid) in ("S", "R"))
        assert fault.read_faults(run_dir)["paused"] == []
        r = _fault(run_dir, "pause", "5", "--seconds", "0.5")
        assert r.returncode == 0 and "resumed" in r.stdout
        assert fault.proc_state(proc.pid) in ("S", "R")
        # kill: recorded as faulty *before* the signal, the whole group dies
        r = _fault(run_dir, "kill", "5")
        assert r.returncode == 0, r.stderr
        assert proc.wait(10) == -signal.SIGKILL
        faults = fault.read_faults(run_dir)
        assert faults["faulty"] == [5] and [e["action"] for e in faults["events"]] == \
            ["pause", "resume", "pause", "resume", "kill"]
        assert _fault(run_dir, "kill", "5").returncode == 1  # nothing left to kill
        # restart: same argv, secret file in the env (no inline secret), log appended
        r = _fault(run_dir, "restart", "5", "--rejoin_timeout", "0")  # a stand-in serves no step
        assert r.returncode == 0 and "not awaited" in r.stdout, r.stderr
        new_pid = int((run_dir / "worker5.pid").read_text())
        assert new_pid != proc.pid and fault.alive(new_pid)
        assert json.loads((run_dir / "deployment.json").read_text())["ranks"][1]["pid"] == new_pid
        assert fault.read_faults(run_dir)["restarted"] == {"5": new_pid}
        assert rank_procs.cmdline(new_pid)[-4:] == ["--rank", "5", "--peers", str(run_dir / "deployment.json")]
        _wait(lambda: (run_dir / f"env.out.{new_pid}").exists())
        time.sleep(0.2)
        assert (run_dir / f"env.out.{new_pid}").read_text() == f"{run_dir / 'secret'} -"
        log = (run_dir / "worker5.log").read_text()
        assert log.count("node up") == 2 and "restarting rank 5" in log
        assert _fault(run_dir, "restart", "5", "--rejoin_timeout", "0").returncode == 1  # still running
        assert os.getsid(new_pid) == new_pid  # its own session, like the launcher's nodes
        r = _fault(run_dir, "kill", "5")
        assert r.returncode == 0 and not fault.alive(new_pid)
        assert fault.read_faults(run_dir)["restarted"] == {}
    finally:
        for pid in [proc.pid, *[int(p.name.split(".")[-1]) for p in run_dir.glob("env.out.*")]]:
            if fault.alive(pid) and os.getsid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        proc.wait(10)


def test_a_recycled_pid_is_never_signalled(tmp_path):
    run_dir, proc = _fake_run(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        (run_dir / "worker5.pid").write_text(str(other.pid))  # the pid now names someone else
        for action in ("kill", "pause"):
            r = _fault(run_dir, action, "5")
            assert r.returncode == 1 and "no live process" in r.stderr
        assert other.poll() is None and fault.proc_state(other.pid) != "T"
        assert fault.read_faults(run_dir)["faulty"] == []
        assert _fault(run_dir, "kill", "9").returncode == 1  # no such rank
    finally:
        for p in (proc, other):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _forked_run(tmp_path: Path, rank: int = 5) -> tuple[Path, subprocess.Popen]:
    """A run directory as ``byzsgd-launch --run_dir D`` leaves it: rank ``rank`` is a process
    forked by the launcher (this test), whose command line is the console script's (no
    ``--rank``, no ``byzsgd.launch``), in its own session, and its pid file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             str(Path(sys.executable).parent / "byzsgd-launch"), "--run_dir", str(run_dir)],
                            start_new_session=True)
    (run_dir / f"worker{rank}.pid").write_text(str(proc.pid))
    doc = dict(num_ps=1, num_workers=1, host="127.0.0.1", run_dir=str(run_dir), launcher_pid=os.getpid(),
               started=time.time(),
               ranks=[dict(rank=0, role="ps", host="127.0.0.1", port=1, pid=None, byzantine=False,
                           log=str(run_dir / "ps0.log"), metrics=str(run_dir / "metrics-ps0.jsonl"),
                           cmd=["true"]),
                      dict(rank=rank, role="worker", host="127.0.0.1", port=2, pid=proc.pid,
                           byzantine=False, log=str(run_dir / f"worker{rank}.log"), metrics=None,
                           cmd=[sys.executable, "-c", "pass", "--rank", str(rank), "--peers",
                                str(run_dir / "deployment.json")])])
    (run_dir / "deployment.json").write_text(json.dumps(doc))
    (run_dir / "secret").write_text("s3cret")
    return run_dir, proc


def test_a_node_of_the_console_script_is_found_by_its_pid_file(tmp_path):
    """Issue 27: ``byzsgd-launch --run_dir D`` then ``status`` showed every node ``pid - dead``
    and ``kill`` failed with "no live process": a node was recognised only by ``byzsgd.launch``
    in its command line.  Now by the run's records: its pid file, written after it started,
    and its parent, the run's launcher."""
    run_dir, proc = _forked_run(tmp_path)
    try:
        line = next(ln for ln in fault.status(run_dir) if ln.startswith("worker5"))
        assert f"pid {proc.pid} alive" in line, line
        # restart refuses while the rank runs (it started a second rank 5 beside it before)
        r = _fault(run_dir, "restart", "5", "--rejoin_timeout", "0")
        assert r.returncode == 1 and "still running" in r.stderr, (r.stdout, r.stderr)
        assert _int(run_dir / "worker5.pid") == proc.pid
        r = _fault(run_dir, "kill", "5")
        assert r.returncode == 0, r.stderr
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_a_trainer_of_run_exp_is_found_and_only_it_is_killed(tmp_path):
    """A ``run_exp.sh`` rank: a trainer (``--rank R --master ...``) under its wrapper shell,
    which leads the process group and records the exit code: the trainer is found by its pid
    file and the run id in its environment, and only it is killed (the wrapper writes 137)."""
    from byzsgd.deploy.host_scripts import RUN_ID_ENV, WRAPPER

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_id = f"test-{os.getpid()}-{time.time_ns()}"
    stem = run_dir / "worker1"
    wrapper = subprocess.Popen(
        ["setsid", "sh", "-c", WRAPPER, "byzsgd-rank", str(stem), sys.executable, "-c",
         "import time; time.sleep(120)", "--rank", "1", "--master", "127.0.0.1:1"],
        env={**os.environ, RUN_ID_ENV: run_id}, stdin=subprocess.DEVNULL)
    try:
        _wait(lambda: (run_dir / "worker1.pid").exists() and (run_dir / "worker1.pid").read_text().strip())
        (run_dir / "deployment.json").write_text(json.dumps(dict(
            num_ps=1, num_workers=1, run_id=run_id, runner="local", run_dir=str(run_dir), started=time.time(),
            ranks=[dict(rank=0, role="ps", host="here", port=1, byzantine=False),
                   dict(rank=1, role="worker", host="here", port=2, byzantine=False)])))
        trainer = _int(run_dir / "worker1.pid")
        assert "alive" in fault.status(run_dir)[1], fault.status(run_dir)
        assert fault.kill(run_dir, 1) == trainer
        _wait(lambda: (run_dir / "worker1.rc").exists() and (run_dir / "worker1.rc").read_text().strip())
        assert (run_dir / "worker1.rc").read_text().strip() == "137"
        wrapper.wait(10)
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait(10)


def _int(path: Path) -> int:
    return int(path.read_text().strip())


def test_restart_runs_the_runs_interpreter_and_package(tmp_path):
    """A restart imports the run's ``byzsgd`` (run.json's package) under the run's interpreter,
    not the one a checkout in the current directory would shadow it with."""
    run_dir, proc = _fake_run(tmp_path)
    pkg = tmp_path / "installed" / "byzsgd"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    used = tmp_path / "interpreter-used"
    interp = tmp_path / "python"
    interp.write_text(f"#!/bin/sh\necho yes > {used}\nexec {sys.executable} \"$@\"\n")
    interp.chmod(0o755)
    (run_dir / "run.json").write_text(json.dumps(dict(python=str(interp), package=str(pkg))))
    out = tmp_path / "imported"
    doc = json.loads((run_dir / "deployment.json").read_text())
    doc["ranks"][1]["cmd"] = [sys.executable, "-c", f"import byzsgd, time; open({str(out)!r}, 'w')."
                              f"write(byzsgd.__file__); time.sleep(60)", "--rank", "5", "--peers",
                              str(run_dir / "deployment.json")]
    (run_dir / "deployment.json").write_text(json.dumps(doc))
    try:
        assert _fault(run_dir, "kill", "5").returncode == 0
        r = subprocess.run([*FAULT, str(run_dir), "restart", "5", "--rejoin_timeout", "0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        _wait(lambda: out.exists() and out.read_text())
        assert out.read_text() == str(pkg / "__init__.py")
        assert used.read_text().strip() == "yes"
    finally:
        for pid in [proc.pid, _int(run_dir / "worker5.pid")]:
            if fault.alive(pid) and os.getsid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        proc.wait(10)


def test_a_restart_that_dies_is_reported_and_never_counted_as_a_rejoin(tmp_path):
    """The issue's restart crashed (address in use) yet printed "restarted rank 5", exit 0,
    and the summary then reported a rejoin from the records of the rank number.  Now the
    restart exits 1 with the reason, and no rejoin is reported for it."""
    from byzsgd.deploy import summary as runsum

    run_dir, proc = _fake_run(tmp_path)
    doc = json.loads((run_dir / "deployment.json").read_text())
    doc["ranks"][1]["cmd"] = [sys.executable, "-c", "import sys; print('OSError: [Errno 98] address "
                              "already in use'); sys.exit(1)", "--rank", "5", "--peers",
                              str(run_dir / "deployment.json")]
    (run_dir / "deployment.json").write_text(json.dumps(doc))
    try:
        assert _fault(run_dir, "kill", "5").returncode == 0
        r = _fault(run_dir, "restart", "5", "--rejoin_timeout", "60")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "exited 1 before it served a step" in r.stderr and "Errno 98" in r.stderr, r.stderr
        assert "restarted rank" not in r.stdout
        # a correct PS still aggregates "rank 5" afterwards (another process with its number)
        with open(run_dir / "metrics-ps0.jsonl", "a") as fh:
            fh.write(json.dumps(dict(step=61, time=time.time() + 1, step_time=0.1, quorum=[5])) + "\n")
        rejoined = runsum.rejoins(run_dir)["5"]
        assert rejoined["rejoined_step"] is None and rejoined["steps_served"] == 0, rejoined
        assert "Errno 98" in rejoined["failed"]
        assert "failed" in next(ln for ln in fault.status(run_dir) if ln.startswith("worker5"))
        assert fault.read_faults(run_dir)["restarted"] == {}  # the launcher waits for nothing
    finally:
        proc.wait(10) if proc.poll() is not None else (os.killpg(proc.pid, signal.SIGKILL), proc.wait(10))


def test_netem_prints_a_recipe(tmp_path):
    run_dir, proc = _fake_run(tmp_path)
    try:
        r = _fault(run_dir, "netem", "5", "--netns", "byz2")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == \
            "ip netns exec byz2 tc qdisc replace dev eth0 root netem delay 50ms loss 1%"
        r = _fault(run_dir, "netem", "5", "--netns", "byz2", "--clear")
        assert r.stdout.splitlines()[-1] == "ip netns exec byz2 tc qdisc del dev eth0 root"
        r = _fault(run_dir, "netem", "5", "--dev", "lo", "--apply")  # loopback: refused
        assert r.returncode == 1 and "refusing" in r.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_launcher_reads_faults(tmp_path):
    assert local.read_faults(tmp_path) == (set(), {})
    (tmp_path / "faults.json").write_text(json.dumps({"faulty": [3, 8], "restarted": {"3": 12345}}))
    assert local.read_faults(tmp_path) == ({3, 8}, {3: 12345})
    (tmp_path / "faults.json").write_text("{not json")
    assert local.read_faults(tmp_path) == (set(), {})
    assert local.pid_alive(os.getpid()) and not local.pid_alive(2 ** 22 + 1)


# -- real deployments -----------------------------------------------------------------
def _launch(run_dir: Path, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "byzsgd.launch", "--quiet", "--json", "--run_dir", str(run_dir),
           "--timeout", "280", *SMALL, *flags]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _schedule(run_dir: Path, plan: list[list[str]], errors: list) -> threading.Thread:
    """Run ``fault.py RUN_DIR <args>`` for each entry of ``plan``, one after the other."""
    def go():
        for args in plan:
            r = subprocess.run([*FAULT, str(run_dir), *args], capture_output=True, text=True, timeout=300)
            if r.returncode:
                errors.append((args, r.stdout, r.stderr))
                return
    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th


def _finish(proc: subprocess.Popen, th: threading.Thread, errors: list) -> dict:
    out, err = proc.communicate(timeout=320)
    th.join(30)
    assert not errors, errors
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["outcome"] == "ok"
    return summary


def _records(run_dir: Path, rank: int) -> list[dict]:
    return list(read_metrics(run_dir / f"metrics-ps{rank}.jsonl"))


def _steps(recs: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["step_time"]) for r in recs if "step_time" in r and "event" not in r]


def _fault_steps(run_dir: Path) -> dict[str, int]:
    return {f"{e['action']}{e['rank']}": e["step"] for e in fault.read_faults(run_dir)["events"]}


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_kill_a_worker_and_a_ps_mid_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--num_iter", "200", "--acc_freq", "200")
    errors: list = []
    th = _schedule(run_dir, [["at-step", "8", "60", "kill"], ["kill", "3"]], errors)
    summary = _finish(proc, th, errors)
    assert summary["faulty_ranks"] == [3, 8]
    assert summary["returncodes"]["3"] == summary["returncodes"]["8"] == -signal.SIGKILL
    killed_at = max(_fault_steps(run_dir).values())
    accs = {r: summary["final_accuracy"][str(r)] for r in (0, 1, 2)}
    worst = {}
    for rank in (0, 1, 2):
        steps = _steps(_records(run_dir, rank))
        assert [s for s, _ in steps] == sorted({s for s, _ in steps}), rank  # each step once
        assert steps[-1][0] == 199
        after = [t for s, t in steps if s > killed_at]
        worst[rank] = max(after)
        # nobody waits for the dead: no step anywhere near --resend_after (5 s)
        assert worst[rank] < QUORUM_STEP_S, (rank, worst[rank])
    assert min(accs.values()) >= GOOD_ACCURACY, accs
    print(f"\nFIGURES kill: killed at step {killed_at}, final accuracy {accs}, "
          f"max step time after the kill {worst} (resend_after 5 s), wall {summary['wall_time']:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_pause_a_worker_then_a_ps(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "--num_iter", "250", "--acc_freq", "250")
    errors: list = []
    th = _schedule(run_dir, [["at-step", "8", "40", "pause", "--seconds", "4"],
                             ["at-step", "3", "100", "pause", "--seconds", "5"]], errors)
    summary = _finish(proc, th, errors)
    assert summary["faulty_ranks"] == [] and all(c == 0 for c in summary["returncodes"].values())
    assert fault.read_faults(run_dir)["paused"] == []
    accs = {int(r): a for r, a in summary["final_accuracy"].items()}
    assert min(accs.values()) >= GOOD_ACCURACY, accs
    assert abs(accs[3] - statistics_mean([accs[0], accs[1], accs[2]])) <= 2.0, accs
    paused_at = _fault_steps(run_dir)["pause3"]
    paused = [e["time"] for e in fault.read_faults(run_dir)["events"]
              if e["action"] == "pause" and e["rank"] == 3][0]  # recorded before SIGSTOP
    recs3 = _records(run_dir, 3)
    jumps = [r for r in recs3 if r.get("event") == "jump" and r["time"] >= paused]
    assert jumps and jumps[0]["to_step"] > jumps[0]["step"] + 1, jumps
    worst = {}
    for rank in (0, 1, 2, 3):
        steps = _steps(_records(run_dir, rank))
        assert [s for s, _ in steps] == sorted({s for s, _ in steps}), rank  # no step twice
        if rank != 3:  # the others never waited for the paused worker or PS
            worst[rank] = max(t for s, t in steps if s > 5)
            assert worst[rank] < QUORUM_STEP_S, (rank, worst[rank])
    print(f"\nFIGURES pause: worker 8 paused 4 s at step {_fault_steps(run_dir)['pause8']}, PS 3 paused "
          f"5 s at step {paused_at}, PS 3 jumped {[(j['step'], j['to_step']) for j in jumps]}, final "
          f"accuracy {accs}, max step time of PS 0-2 {worst}, wall {summary['wall_time']:.1f} s")


def statistics_mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_a_restarted_ps_rejoins(tmp_path):
    from byzsgd.learning.checkpoint import list_checkpoints, load_checkpoint

    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    n = 350  # a restarted PS needs ~15-20 s to start on a loaded 2-core box
    proc = _launch(run_dir, "--num_iter", str(n), "--acc_freq", str(n), "--checkpoint_dir", str(ckpt),
                   "--checkpoint_every", "50")
    errors: list = []
    th = _schedule(run_dir, [["at-step", "3", "60", "kill"], ["at-step", "3", "90", "restart"]], errors)
    summary = _finish(proc, th, errors)
    assert summary["faulty_ranks"] == [3] and summary["restarted_ranks"] == [3]
    events = fault.read_faults(run_dir)["events"]
    restart = next(e for e in events if e["action"] == "restart")
    restarted_at = restart["step"]
    recs3 = _records(run_dir, 3)
    starts = [i for i, r in enumerate(recs3) if r.get("event") == "start"]
    assert len(starts) == 2  # the first life and the restarted one
    second = recs3[starts[1]:]
    jumps = [(r["step"], r["to_step"]) for r in second if r.get("event") == "jump"]
    assert jumps and jumps[0][1] > restarted_at, jumps  # it caught up with its peers
    stepped = [s for s, _ in _steps(second)]
    assert stepped, "the restarted PS never took a step of its own"  # it rejoined, not just ended
    assert second[-1].get("event") == "done"
    accs = {int(r): a for r, a in summary["final_accuracy"].items()}
    assert min(accs.values()) >= GOOD_ACCURACY, accs
    others = statistics_mean([accs[0], accs[1], accs[2]])
    assert abs(accs[3] - others) <= 2.0, accs
    # distance between the restarted PS's final model and a correct peer's
    size = recs3[0]["state_size"]
    final3 = dict(list_checkpoints(ckpt, 3))
    final0 = dict(list_checkpoints(ckpt, 0))
    common = sorted(set(final3) & set(final0))
    assert common, (final3, final0)
    step = common[-1]
    m3 = load_checkpoint(final3[step], expected_state_size=size).model_state
    m0 = load_checkpoint(final0[step], expected_state_size=size).model_state
    m1 = load_checkpoint(dict(list_checkpoints(ckpt, 1))[step], expected_state_size=size).model_state
    rel = float((m3 - m0).norm() / m0.norm())
    rel_peers = float((m1 - m0).norm() / m0.norm())
    assert rel < 0.05, rel  # no-fault spread: ~0.01 (module docstring)
    print(f"\nFIGURES restart: killed at step {_fault_steps(run_dir)['kill3']}, restarted at step "
          f"{restarted_at}, jumps {jumps}, {len(stepped)} steps of its own after the restart "
          f"(first {stepped[0]}), {second[0]['time'] - restart['time']:.1f} s from restart to its start "
          f"record, final accuracy {accs}, checkpoint step {step} (final: {step == n}): "
          f"||m3-m0||/||m0|| = {rel:.3g}, ||m1-m0||/||m0|| = {rel_peers:.3g}, wall {summary['wall_time']:.1f} s")


def test_byzsgd_fault_is_a_console_script_of_the_library():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["byzsgd-fault"] == "byzsgd.deploy.faults:main"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: byzsgd-fault"), r.stdout
