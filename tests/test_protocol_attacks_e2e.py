"""Acceptance (slow): protocol attacks from one Byzantine node against a whole deployment.

4 PS (fps=1) + 7 workers (fw=1), MNIST, median and mda.  Each attack runs STEPS = 80 steps:
enough for every attack to act many times (impersonation rounds every 25 steps, out-of-range
steps every 10) and for the accuracy to settle near 93-94%, where the comparison with a
no-attack run of the same length and seed (one per rule, a module fixture) is meaningful to
1.5 points; 300 steps for 16 runs would not fit the ~10 minute budget of this set on an idle
2-core machine (80 steps: ~25-35 s a run).  Each test checks that

* the run finished and every correct node exited 0;
* no correct PS stalled: no "quorum ... not reached" warning (``--step_timeout 10``) and no
  step slower than STALL_S;
* the attack reached its target (its own counters, the refusals the correct nodes counted —
  ``closing connection ... REASON`` lines, which ``node.stats.rejected`` counts — or the
  quorums it entered);
* the correct PSes end within 1.5 points of the no-attack run.

The outsider test: 1,000 idle sockets to PS 0 while worker 5 is killed and restarted with
scripts/fault.py; the run summary's ``rejoined`` field shows it served steps after its restart.

The role-level defences these attacks meet (request discipline, step windows: issue 13) are
in; docs/protocol_attacks.md has the 300-step measurements.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import protocol_attacks_table as table  # noqa: E402

STEPS = 80
STALL_S = 8.0
GARS = ("median", "mda")

#: case -> what shows the attack reached its target, from table.outcome()'s row
def _impersonate(row):
    rep = row["attack_report"]
    # every attempt refused (one may still be in flight when the node closes), none passed
    assert rep and rep["tried"] > 0 and rep["tried"] - rep["refused"] <= 1 and rep.get("succeeded", 0) == 0, rep
    # the listeners counted bad HMACs (attempts towards nodes already closing at the end fail
    # at connect instead: measured 506 of 520 at 300 steps)
    assert row["rejected"].get("auth", 0) >= rep["tried"] // 2, row["rejected"]


def _huge(row):
    rep = row["attack_report"]
    assert rep and rep["sent_max_frame_step"] > 0 and rep["sent_beyond_window"] > 0, rep
    assert rep.get("sent_int64_max", 0) + rep.get("sent_uint64_max", 0) > 0, rep
    assert row["rejected"].get("bad_step", 0) > 0, row["rejected"]


def _flood(key):
    def check(row):
        rep = row["attack_report"]
        assert rep and rep[key] > 0, rep
    return check


def _withhold(row):
    rep = row["attack_report"]
    assert rep and rep["withheld"] > 0, rep


CASES = {
    "impersonate": _impersonate,
    "request_flood(ps)": _flood("flood_requests"),
    "request_flood(worker)": _flood("flood_grads"),
    "huge_step(ps)": _huge,
    "huge_step(worker)": _huge,
    "far_future": _flood("sent_model_ahead"),
    "withhold_from": _withhold,
}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    out = tmp_path_factory.mktemp("none")
    rows = {}
    for gar in GARS:
        row = rows[gar] = table.run_case(out, "none", STEPS, gar)
        assert row["finished"] and row["min_accuracy"] > 85.0, row
    return rows


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("gar", GARS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_protocol_attack_from_one_byzantine_node(tmp_path, baselines, case, gar):
    row = table.run_case(tmp_path, case, STEPS, gar)
    print("FIGURES", case, gar, json.dumps(row))
    assert row["finished"], row
    assert row["stall_warnings"] == 0, row
    assert row["worst_step_s"] < STALL_S, row
    CASES[case](row)
    base = baselines[gar]["min_accuracy"]
    assert row["min_accuracy"] >= base - 1.5, (row["min_accuracy"], base)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_outsider_flood_while_a_worker_is_killed_and_restarted_it_rejoins(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "byzsgd.launch", "--num_iter", "150", "--acc_freq", "75", "--run_dir",
         str(run_dir), "--quiet", "--json", "--step_timeout", "10", "--timeout", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    flood = None
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "deployment.json").exists():
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.2)
        flood = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "outsider_flood.py"), str(run_dir),
                                  "--ranks", "0", "--sockets", "1000", "--seconds", "90"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        fault = [sys.executable, str(ROOT / "scripts" / "fault.py"), str(run_dir)]
        subprocess.run([*fault, "at-step", "5", "30", "kill"], check=True, timeout=300, env=env)
        subprocess.run([*fault, "at-step", "5", "50", "restart"], check=True, timeout=300, env=env)
        out, err = launcher.communicate(timeout=600)
        assert launcher.returncode == 0, err[-3000:]
        flood_ran_to_the_end = flood.poll() is not None  # the flood must have covered the run
        flood.send_signal(signal.SIGTERM)  # the run is over: stop the flood now, not after 90 s
        summary = json.loads(out.strip().splitlines()[-1])
        status = subprocess.run([*fault, "status"], capture_output=True, text=True, timeout=60, env=env).stdout
        fout, _ = flood.communicate(timeout=120)
    finally:
        for p in (launcher, flood):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert not flood_ran_to_the_end, "the 90 s flood ended before the run did: it proves less"
    res = json.loads(fout.strip().splitlines()[-1])
    print("FIGURES", json.dumps(summary.get("rejoined")), json.dumps(res["endpoints"]))
    assert res["endpoints"][0]["opened"] >= 1000, res  # the outsider did open its 1,000 sockets
    rejoined = summary["rejoined"]["5"]
    assert rejoined["rejoined_step"] is not None and rejoined["rejoined_step"] >= 50, rejoined
    assert rejoined["steps_served"] >= 10, rejoined
    assert "worker5" in status and "rejoined at step" in status, status
    assert summary["min_accuracy"] > 85.0, summary
