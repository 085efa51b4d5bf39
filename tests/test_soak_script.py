"""scripts/soak.py without a deployment: its flags, its report on a canned run, and the
pieces of the report computed from a run's records (rejoins, accuracy at a common step).

The soak itself runs for 20 minutes and is not in the suite; these keep the script from rotting."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402

from byzsgd.errors import ConfigError  # noqa: E402


def test_defaults_are_the_issue_s_soak(tmp_path):
    args = soak.parse_args([])
    assert args.minutes == 20 and not args.no_control and not args.json
    assert args.fault_every == 120 and args.churn_mode == "takeover" and args.churn_rank == -1
    assert args.launcher_args == [] and args.control_timeout == 2400
    assert args.run_dir.parent == ROOT / "runs" and args.run_dir.name.startswith("soak-")


def test_flags_and_launcher_flags_after_the_separator(tmp_path):
    args = soak.parse_args(["--minutes", "3", "--no_control", "--json", "--run_dir", str(tmp_path / "r"),
                            "--churn_mode", "shared", "--flood_source", "127.0.0.2", "--",
                            "--acc_freq", "50", "--seed", "3"])
    assert args.minutes == 3 and args.no_control and args.json and args.churn_mode == "shared"
    assert args.run_dir == (tmp_path / "r").resolve() and args.flood_source == "127.0.0.2"
    assert args.launcher_args == ["--acc_freq", "50", "--seed", "3"]
    assert args.control_timeout == 900


@pytest.mark.parametrize("argv, match", [
    (["--minutes", "0"], "--minutes"),
    (["--churn_rate", "0"], "--churn_rate"),
    (["--flood_sockets", "6000"], "--flood_sockets"),
    (["--flood_source", "10.0.0.1"], "loopback"),
    (["--fault_every", "-1"], "--fault_every"),
    (["--", "--num_iter", "5"], "--num_iter is the soak's"),
    (["--", "--run_dir=x"], "--run_dir is the soak's"),
    (["--acc_freq", "5"], "after --"),
])
def test_bad_flags_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        soak.parse_args(argv)


def test_main_refuses_bad_flags_and_a_used_run_dir(tmp_path, capsys):
    assert soak.main(["--minutes", "-1"]) == 2
    (tmp_path / "deployment.json").write_text("{}")
    assert soak.main(["--run_dir", str(tmp_path)]) == 2
    assert "holds a run already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        soak.main(["churn", "--help"])


def _rec(step, t, quorum, acc=None):
    rec = {"step": step, "step_time": 0.1, "time": t, "quorum": quorum}
    if acc is not None:
        rec["accuracy"] = acc
    return rec


def test_rejoins_per_restart_and_steps():
    # worker 5 restarted at t=10 and served from step 3; worker 6 restarted at t=20, never again;
    # worker 5 killed again at t=30: its step-4 aggregation at t=35 belongs to the next restart
    records = {0: [_rec(0, 5, [4, 5, 6]), _rec(1, 11, [4, 6]), _rec(2, 12, [4, 6], 80.0),
                   _rec(3, 13, [4, 5]), _rec(4, 35, [4, 5], 90.0)],
               1: [_rec(0, 5, [4, 5, 6]), _rec(1, 12, [4, 6]), _rec(2, 13.5, [4, 5], 81.0)]}
    restarts = [dict(rank=5, killed_at=9.0, restarted_at=10.0), dict(rank=6, killed_at=19.0, restarted_at=20.0),
                dict(rank=5, killed_at=30.0, restarted_at=31.0)]
    rows = soak.rejoins(records, restarts)
    assert [(r["rank"], r["rejoined"], r["rejoined_step"], r["steps_served"]) for r in rows] == \
        [(5, True, 3, 2), (6, False, None, 0), (5, True, 4, 1)]
    assert rows[0]["rejoined_after_s"] == 3.0
    assert soak.steps_done(records) == {0: 5, 1: 3}
    assert soak.evaluations(records) == {0: {2: 80.0, 4: 90.0}, 1: {2: 81.0}}


def test_accuracy_compared_at_the_last_step_both_runs_evaluated():
    s = {0: {99: 90.0, 199: 93.0, 299: 94.0}, 1: {99: 91.0, 199: 92.5}}
    c = {0: {99: 91.0, 199: 94.0, 249: 95.0}, 1: {99: 91.5, 199: 93.5, 249: 95.2}}
    assert soak.compare_accuracy(s, c) == dict(step=200, soak=92.5, control=93.5, difference=-1.0)
    assert soak.compare_accuracy(s, {0: {}, 1: {5: 1.0}})["difference"] is None


def test_counts_from_the_helpers_and_the_summary():
    flood = {"seconds": 60.1, "mode": "idle", "sockets_per_endpoint": 64, "source": None, "endpoints": [
        {"rank": 0, "opened": 1000, "closed_by_node": 900, "connect_failures": 5, "max_open": 64},
        {"rank": 1, "opened": 500, "closed_by_node": 450, "connect_failures": 0, "max_open": 60}]}
    got = soak.flood_counts(flood)
    assert (got["tried"], got["opened"], got["closed_by_node"], got["connect_failures"], got["max_open"]) == \
        (1505, 1500, 1350, 5, 64)
    assert soak.flood_counts(None) is None
    assert soak.refusal_totals({"0": {"preauth_evicted": 7, "sender:grad:0": 2, "sender:model:1": 1},
                                "4": {}}) == {"0": {"preauth_evicted": 7, "sender": 3}, "4": {}}
    assert soak.rss_summary({"ps0": [(0, 11, 2048), (1, 11, 4096), (2, 12, 3072)], "ps1": [(0, 13, 1024)]}) == {
        "ps0": dict(min_mib=2.0, max_mib=4.0, first_mib=2.0, last_mib=3.0, samples=3, pids=2, per_pid=[
            dict(min_mib=2.0, max_mib=4.0, first_mib=2.0, last_mib=4.0, samples=2, pid=11),
            dict(min_mib=3.0, max_mib=3.0, first_mib=3.0, last_mib=3.0, samples=1, pid=12)]),
        "ps1": dict(min_mib=1.0, max_mib=1.0, first_mib=1.0, last_mib=1.0, samples=1, pids=1)}


def test_log_sizes(tmp_path):
    (tmp_path / "ps0.log").write_text("x" * 10)
    (tmp_path / "worker4.log").write_text("y" * 5)
    (tmp_path / "soak-flood.log").write_text("z" * 3)
    (tmp_path / "metrics-ps0.jsonl").write_text("m" * 7)
    got = soak.log_sizes(tmp_path)
    assert got == dict(files={"ps0.log": 10, "soak-flood.log": 3, "worker4.log": 5}, nodes_total=15, total=18,
                       metrics={"metrics-ps0.jsonl": 7}, metrics_total=7)


CANNED = dict(
    run_dir="/runs/soak-x", minutes=3, wall_s=185.2, outcome="interrupted", exit_codes={"launcher": 130},
    notes=[], steps=812, steps_per_ps={"0": 812, "1": 815, "2": 813, "3": 812},
    rss={"worker10": dict(min_mib=300.0, max_mib=810.5, first_mib=300.0, last_mib=810.5, samples=3, pids=2,
                          per_pid=[dict(min_mib=300.0, max_mib=300.0, first_mib=300.0, last_mib=300.0, samples=1,
                                        pid=77),
                                   dict(min_mib=800.0, max_mib=810.5, first_mib=800.0, last_mib=810.5, samples=2,
                                        pid=99)]),
         "ps0": dict(min_mib=500.25, max_mib=512.0, first_mib=500.25, last_mib=511.0, samples=18, pids=1)},
    helpers_rss={"flood": dict(min_mib=20.0, max_mib=22.0, first_mib=20.0, last_mib=22.0, samples=17, pids=1)},
    logs=dict(files={"ps0.log": 20000, "soak-flood.log": 300}, nodes_total=20000, total=20300,
              metrics={"metrics-ps0.jsonl": 170000}, metrics_total=170000, nodes_bytes_per_min=6480),
    accuracy={"0": dict(accuracy=97.1, step=800), "1": dict(accuracy=None, step=None)},
    flood=soak.flood_counts({"seconds": 180.0, "mode": "idle", "sockets_per_endpoint": 64, "endpoints": [
        {"rank": 0, "opened": 20000, "closed_by_node": 19900, "connect_failures": 3, "max_open": 64}]}),
    churn=dict(rank=10, mode="takeover", attempts=700, connected=690, refused={"duplicate_rank": 4}, closed=1,
               errors={"TimeoutError": 5}, bytes_received=123456),
    refusals={"0": {"preauth_evicted": 19000}, "4": {}},
    restarts=[dict(rank=4, at_s=120.0, error=None, rejoined=True, rejoined_step=500, rejoined_after_s=6.5,
                   steps_served=300),
              dict(rank=5, at_s=150.0, error=None, rejoined=False, rejoined_step=None, rejoined_after_s=None,
                   steps_served=0),
              dict(rank=6, at_s=170.0, error="rank 6 has no live process of this run")],
    leftover=[],
    control=dict(run_dir="/runs/soak-x-control", steps=812, outcome="ok", exit_code=0,
                 final_accuracy={"0": 97.5, "1": 97.4}, rss={"ps0": dict(min_mib=480.0, max_mib=495.5, first_mib=480.0,
                                                                         last_mib=495.5, samples=9, pids=1)},
                 logs=dict(files={}, nodes_total=9000, total=9000, metrics={}, metrics_total=0),
                 at_step_step=800, at_step_soak=97.1,
                 at_step_control=97.3, at_step_difference=-0.2))


def test_report_formatting_on_a_canned_run():
    text = soak.format_report(CANNED)
    lines = text.splitlines()
    assert lines[0] == "soak report: /runs/soak-x"
    assert "steps done 812 (per PS: 0: 812, 1: 815, 2: 813, 3: 812)" in lines[1]
    ps0 = next(i for i, line in enumerate(lines) if line.strip().startswith("ps0"))
    w10 = next(i for i, line in enumerate(lines) if line.strip().startswith("worker10"))
    assert ps0 < w10 and "500.2 /   512.0" in lines[ps0]  # PSes first, MiB with one decimal
    assert "restart 1" in lines[w10 + 2] and "800.0 /   810.5" in lines[w10 + 2] and "pid 99" in lines[w10 + 2]
    assert "logs: 20,300 bytes in all, 20,000 the nodes' (6,480 bytes/min)" in text
    assert "PS 0: 97.10% at step 800" in text and "PS 1: n/a at step None" in text
    assert "flood: 20,003 connections tried, 20,000 opened, 19,900 closed by the nodes" in text
    assert "690 reconnects accepted; refused: duplicate_rank 4" in text and "errors: TimeoutError 5" in text
    assert "rank 0: preauth_evicted 19,000" in text and "rank 4:" not in text
    assert "restarts: 3 done, 1 rejoined" in text
    assert "worker 4: restarted, rejoined at step 500 (6.5 s after), served 300 steps" in text
    assert "worker 5: restarted, NOT rejoined" in text and "worker 6: FAILED: rank 6" in text
    assert "processes left after the stop: none" in text
    assert "its RSS (MiB), min / max: ps0 480.0 / 495.5" in text and "its logs: 9,000 bytes" in text
    assert "accuracy at step 800 (least over the correct PSes): soak 97.10%, control 97.30%, " \
           "difference -0.20 points" in text
    # the JSON form is the same dict, serialisable as it is
    assert json.loads(json.dumps(soak.public(dict(CANNED, _evals={0: {1: 2.0}})))) == CANNED


def test_report_formatting_when_nothing_ran():
    rep = dict(run_dir="/r", minutes=1, wall_s=None, outcome=None, exit_codes={}, notes=["interrupted (SIGINT)"],
               steps=0, steps_per_ps={}, rss={}, helpers_rss={}, logs=dict(files={}, total=0, nodes_total=0,
                                                                             metrics={}, metrics_total=0),
               accuracy={}, flood=None, churn=None, refusals={}, restarts=[], leftover=["ps0 (pid 1)"],
               control=None)
    text = soak.format_report(rep)
    assert "note: interrupted (SIGINT)" in text and "flood: no counts" in text and "churn: no counts" in text
    assert "restarts: 0 done, 0 rejoined" in text and "ps0 (pid 1) (killed)" in text


def test_runs_as_a_script_and_its_churner_checks_its_flags(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--no_control" in out.stdout and "soak.py churn" in out.stdout
    assert soak.main(["churn", str(tmp_path), "--rank", "10", "--rate", "0"]) == 2
    assert soak.main(["churn", str(tmp_path), "--rank", "10"]) == 2  # no deployment.json there
