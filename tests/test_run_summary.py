"""The run summary's quorum membership (byzsgd.deploy.summary.quorum_shares): which workers the
correct PSes aggregated, read from their metrics, so that an attack test (and a report) can
say whether a Byzantine worker reached the rule at all."""
from __future__ import annotations

import json

from byzsgd.deploy import summary as runsum


def _run_dir(tmp_path, records: dict[int, list[dict]], *, byzantine_ps=(3,)):
    ranks = [dict(rank=r, role="ps", byzantine=r in byzantine_ps, metrics=f"metrics-ps{r}.jsonl")
             for r in records]
    ranks += [dict(rank=w, role="worker", byzantine=w == 7) for w in (4, 5, 6, 7)]
    (tmp_path / "deployment.json").write_text(json.dumps(dict(started=1.0, ranks=ranks)))
    for r, recs in records.items():
        (tmp_path / f"metrics-ps{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    return tmp_path


def step(t, quorum, late, nonfinite=None, models=None):
    rec = dict(step=t, step_time=0.1, time=10.0 + t, quorum=quorum, late=late)
    if models is not None:
        rec["model_quorum"] = models
    if nonfinite:
        rec["nonfinite"] = nonfinite
    return rec


def test_quorum_share_counts_the_correct_pses_gradient_phases(tmp_path):
    run = _run_dir(tmp_path, {
        0: [dict(event="start", time=1.0), step(0, [4, 5, 7], [6], nonfinite=[7], models=[1, 3]),
            step(1, [4, 5, 6], [7], models=[3, 2]),
            dict(event="jump", step=2, to_step=4),  # no gradient phase: not counted
            dict(step=4, accuracy=50.0, time=20.0)],  # an evaluation without a quorum: not counted
        1: [step(0, [5, 6, 7], [4], models=[0, 3]), step(1, [4, 6, 7], [5], nonfinite=[7], models=[0, 2])],
        # a Byzantine PS's metrics do not count, whatever they say
        3: [step(t, [4, 5, 6], [7]) for t in range(50)],
    })
    shares = runsum.quorum_shares(run)
    assert shares["quorum_steps"] == 4
    assert shares["quorum_share"] == {"4": 0.75, "5": 0.75, "6": 0.75, "7": 0.75}
    assert shares["nonfinite_share"] == {"7": 0.5}
    # the Byzantine PS 3 was in 3 of the 4 gathers; PS 1 in one (PS 0's), PS 0 in PS 1's two
    assert shares["model_quorum_steps"] == 4
    assert shares["model_quorum_share"] == {"0": 0.5, "1": 0.25, "2": 0.5, "3": 0.75}
    summary = runsum.run_summary(run, "ok", started=1.0, returncodes={}, byzantine_ranks=[3, 7])
    assert summary["quorum_share"]["7"] == 0.75 and summary["quorum_steps"] == 4
    assert runsum.summarize_run(run)["quorum_share"] == shares["quorum_share"]


def test_a_worker_never_aggregated_is_listed_with_zero(tmp_path):
    run = _run_dir(tmp_path, {0: [step(t, [4, 5, 6], [7]) for t in range(3)]}, byzantine_ps=())
    shares = runsum.quorum_shares(run)
    assert shares["quorum_share"]["7"] == 0.0 and shares["quorum_share"]["4"] == 1.0
    assert shares["nonfinite_share"] == {}
    assert shares["model_quorum_share"] == {} and shares["model_quorum_steps"] == 0


def test_the_summary_line_names_the_byzantine_workers_share(tmp_path, capsys):
    run = _run_dir(tmp_path, {0: [step(t, [4, 5, 7] if t % 4 else [4, 5, 6], [6] if t % 4 else [7])
                                  for t in range(8)]}, byzantine_ps=())
    summary = runsum.run_summary(run, "ok", started=1.0, returncodes={}, byzantine_ranks=[7])
    runsum.print_summary(summary, "launch")
    assert "Byzantine worker 7 in 75.0% of the correct PSes' gradient quorums (8 steps)" in capsys.readouterr().err


def test_no_metrics_no_shares(tmp_path):
    shares = runsum.quorum_shares(tmp_path)
    assert shares == dict(quorum_share={}, nonfinite_share={}, quorum_steps=0,
                          model_quorum_share={}, model_quorum_steps=0)


# -- the outcome ---------------------------------------------------------------------------
def _two_ps(tmp_path, *, done=(0, 1)):
    recs = {r: [step(t, [4, 5], [6]) for t in range(3)] + ([dict(event="done", step=3)] if r in done else [])
            for r in (0, 1)}
    run = _run_dir(tmp_path, recs, byzantine_ps=())
    return run


def test_outcome_failed_names_the_rank_its_exit_code_and_last_error_line(tmp_path):
    run = _two_ps(tmp_path, done=())
    (tmp_path / "worker5.log").write_text("12:00 worker5 INFO started\nTraceback (most recent call last):\n"
                                          "  File x\nValueError: could not convert string to float: 'abc'\n"
                                          'byzsgd-net-stats {"rank": 5}\n')
    doc = json.loads((tmp_path / "deployment.json").read_text())
    doc["ranks"].append(dict(rank=5, role="worker", byzantine=False, log=str(tmp_path / "worker5.log")))
    (tmp_path / "deployment.json").write_text(json.dumps(doc))
    s = runsum.run_summary(run, "failed:5", started=1.0, returncodes={5: 1})
    assert s["outcome"] == "failed"
    assert s["outcome_detail"]["rank"] == 5 and s["outcome_detail"]["exit_code"] == 1
    assert s["outcome_detail"]["error"] == "ValueError: could not convert string to float: 'abc'"
    assert runsum.outcome_line(s).startswith("failed: rank 5 exited 1: ValueError")


def test_outcome_killed_says_by_whom_and_the_ranks_it_stopped_exit_143(tmp_path):
    from byzsgd import rundir

    run = _two_ps(tmp_path, done=(0,))
    s = runsum.run_summary(run, "timeout", started=1.0, returncodes={0: 0, 1: 0, 4: 0}, stopped_ranks=[1, 4])
    assert s["outcome"] == "killed" and s["outcome_detail"]["by"] == "--timeout"
    assert s["returncodes"] == {"0": 0, "1": 143, "4": 143} and s["outcome_detail"]["unfinished"] == [1]
    rundir.record_stop(run, "kill.sh", signal="SIGTERM")
    rundir.record_stop(run, "signal", signal="SIGINT")  # the first to stop a run names it
    s = runsum.run_summary(run, "interrupted", started=1.0, returncodes={1: 0}, stopped_ranks=[1])
    assert (s["outcome"], s["outcome_detail"]["by"], s["returncodes"]) == ("killed", "kill.sh", {"1": 143})
    assert runsum.outcome_line(s) == "killed by kill.sh (SIGTERM); PS 1 did not finish"


def test_outcome_ok_only_when_every_correct_ps_finished(tmp_path):
    assert runsum.run_summary(_two_ps(tmp_path), "ok", started=1.0, returncodes={})["outcome"] == "ok"
    partial = runsum.run_summary(_two_ps(tmp_path, done=(0,)), "ok", started=1.0, returncodes={})
    assert partial["outcome"] == "partial" and partial["outcome_detail"]["unfinished"] == [1]
    # stopped after every PS finished (kill.sh on a run whose workers linger): still ok
    assert runsum.run_summary(_two_ps(tmp_path), "stopped", started=1.0, returncodes={})["outcome"] == "ok"


def test_kill_sh_leaves_a_killed_summary_and_exit_codes_that_say_so(tmp_path):
    """Issue 27: after ``kill.sh`` there was no summary.json and every ``.rc`` read 0 (a
    node stopped by SIGTERM closes cleanly and exits 0).  A run_exp.sh-style run (local
    runner, the real per-rank wrapper) whose stand-in nodes exit 0 on SIGTERM, like ours."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from byzsgd.deploy.host_scripts import RUN_ID_ENV, WRAPPER

    run = tmp_path / "run"
    run.mkdir()
    run_id = f"test-{os.getpid()}-{time.time_ns()}"
    node = ("import json, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "m = sys.argv[1]\n"
            "if m != '-':\n"
            "    fh = open(m, 'a'); fh.write(json.dumps(dict(event='start', time=time.time())) + '\\n')\n"
            "    fh.write(json.dumps(dict(step=0, step_time=0.1, time=time.time(), quorum=[1])) + '\\n'); fh.close()\n"
            "time.sleep(120)")
    procs, ranks = [], []
    for rank, role in ((0, "ps"), (1, "worker")):
        metrics = str(run / f"metrics-ps{rank}.jsonl") if role == "ps" else None
        procs.append(subprocess.Popen(
            ["setsid", "sh", "-c", WRAPPER, "byzsgd-rank", str(run / f"{role}{rank}"), sys.executable, "-c",
             node, metrics or "-"], env={**os.environ, RUN_ID_ENV: run_id}, stdin=subprocess.DEVNULL,
            stdout=open(run / f"{role}{rank}.log", "ab"), stderr=subprocess.STDOUT))
        ranks.append(dict(rank=rank, role=role, host="here", port=29500 + rank, pid=None, byzantine=False,
                          remote_dir=str(run), log=str(run / f"{role}{rank}.log"), metrics=metrics,
                          remote_metrics=metrics))
    try:
        deadline = time.monotonic() + 20
        while not all((run / f"{r['role']}{r['rank']}.pid").exists() for r in ranks) or \
                not (run / "metrics-ps0.jsonl").exists():
            assert time.monotonic() < deadline, "the stand-ins did not start"
            time.sleep(0.05)
        (run / "deployment.json").write_text(json.dumps(dict(
            num_ps=1, num_workers=1, run_id=run_id, runner="local", run_dir=str(run), started=time.time(),
            byzantine_ranks=[], shared_dirs={"here": True}, ranks=ranks)))
        res = subprocess.run(["bash", str(Path(__file__).resolve().parent.parent / "scripts" / "kill.sh"),
                              str(run), "--grace", "3"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "BYZSGD_PYTHON": sys.executable})
        assert res.returncode == 0, res.stderr
        for p in procs:
            p.wait(10)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["outcome"] == "killed" and summary["outcome_detail"]["by"] == "kill.sh", summary
        assert summary["returncodes"] == {"0": 143, "1": 143}, summary
        assert [(run / f"{r['role']}{r['rank']}.rc").read_text().strip() for r in ranks] == ["143", "143"]
        assert "outcome killed by kill.sh (SIGTERM)" in res.stderr, res.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_the_report_says_how_a_run_ended(tmp_path):
    """byzsgd.report's list of runs without an accuracy names the run's own outcome."""
    from byzsgd import rundir
    from byzsgd.experiments.report import missing_runs

    run = _two_ps(tmp_path, done=())
    rundir.record_stop(run, "kill.sh", signal="SIGTERM")
    rundir.write_summary(run, runsum.run_summary(run, "interrupted", started=1.0, returncodes={0: 0},
                                                 stopped_ranks=[0]))
    lines = missing_runs([dict(outcome="killed", returncode=130, run_dir=str(run), final_accuracy=None,
                               cell=dict(gar="median", seed=1))])
    assert len(lines) == 1 and "run killed by kill.sh (SIGTERM)" in lines[0], lines
