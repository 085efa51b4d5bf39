"""The main job's default (median after nnm of per-worker momentums) against ALIE-type attacks.

One Byzantine worker of 7 running ``optimal_alie`` took the old default (median alone, SGD
momentum 0.9) from 96.73% to 11.35% in 300 steps (issue 14).  Here, each attack run must end
within 1.5 points of the no-attack run of the same length and seed, and the Byzantine rank
must have been in a stated share of the PSes' gradient quorums (metrics ``quorum``): an
attack that never reached the rule would prove nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 300
BYZ_WORKER = 10  # the launcher makes the last worker rank Byzantine
# measured 0.32-0.73 for optimal_alie (it estimates the honest statistics first, so it is often
# late) and 0.80 for alie; an attack in fewer than a fifth of the quorums is not a test of the rule
MIN_SHARE = 0.2


def deploy(tmp_path: Path, name: str, *flags: str) -> dict:
    run = tmp_path / name
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # the rule's defence alone: without the gradient check, which would ban the attacker
    # within a few steps (tests/test_gradient_check.py)
    res = subprocess.run([sys.executable, "-m", "byzsgd.launch", "--num_iter", str(STEPS), "--acc_freq",
                          str(STEPS), "--seed", "0", "--quiet", "--json", "--run_dir", str(run),
                          "--check_gradients", "0", *flags],
                         capture_output=True, text=True, timeout=1100, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for path in sorted(run.glob("metrics-ps*.jsonl"))
               for line in path.read_text().splitlines()]
    quorums = [r["quorum"] for r in records if "quorum" in r]
    assert quorums, "no quorum recorded"
    summary["byzantine_share"] = sum(BYZ_WORKER in q for q in quorums) / len(quorums)
    return summary


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_holds_against_alie_and_optimal_alie(tmp_path):
    clean = deploy(tmp_path, "none")
    assert clean["byzantine_ranks"] == []
    for attack, args in (("optimal_alie", "{}"), ("alie", '{"z": 100}')):
        res = deploy(tmp_path, attack, "--byz_workers", "1", "--worker_attack", attack,
                     "--worker_attack_args", args)
        assert res["byzantine_ranks"] == [BYZ_WORKER]
        assert res["byzantine_share"] >= MIN_SHARE, (attack, res["byzantine_share"])
        assert res["min_accuracy"] >= clean["min_accuracy"] - 1.5, (attack, res["min_accuracy"],
                                                                    clean["min_accuracy"])
