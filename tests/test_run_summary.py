"""The run summary's quorum membership (byzsgd.deploy.rundir.quorum_shares): which workers the
correct PSes aggregated, read from their metrics, so that an attack test (and a report) can
say whether a Byzantine worker reached the rule at all."""
from __future__ import annotations

import json

from byzsgd.deploy import rundir


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
    shares = rundir.quorum_shares(run)
    assert shares["quorum_steps"] == 4
    assert shares["quorum_share"] == {"4": 0.75, "5": 0.75, "6": 0.75, "7": 0.75}
    assert shares["nonfinite_share"] == {"7": 0.5}
    # the Byzantine PS 3 was in 3 of the 4 gathers; PS 1 in one (PS 0's), PS 0 in PS 1's two
    assert shares["model_quorum_steps"] == 4
    assert shares["model_quorum_share"] == {"0": 0.5, "1": 0.25, "2": 0.5, "3": 0.75}
    summary = rundir.run_summary(run, "ok", started=1.0, returncodes={}, byzantine_ranks=[3, 7])
    assert summary["quorum_share"]["7"] == 0.75 and summary["quorum_steps"] == 4
    assert rundir.summarize_run(run)["quorum_share"] == shares["quorum_share"]


def test_a_worker_never_aggregated_is_listed_with_zero(tmp_path):
    run = _run_dir(tmp_path, {0: [step(t, [4, 5, 6], [7]) for t in range(3)]}, byzantine_ps=())
    shares = rundir.quorum_shares(run)
    assert shares["quorum_share"]["7"] == 0.0 and shares["quorum_share"]["4"] == 1.0
    assert shares["nonfinite_share"] == {}
    assert shares["model_quorum_share"] == {} and shares["model_quorum_steps"] == 0


def test_the_summary_line_names_the_byzantine_workers_share(tmp_path, capsys):
    run = _run_dir(tmp_path, {0: [step(t, [4, 5, 7] if t % 4 else [4, 5, 6], [6] if t % 4 else [7])
                                  for t in range(8)]}, byzantine_ps=())
    summary = rundir.run_summary(run, "ok", started=1.0, returncodes={}, byzantine_ranks=[7])
    rundir.print_summary(summary, "launch")
    assert "Byzantine worker 7 in 75.0% of the correct PSes' gradient quorums (8 steps)" in capsys.readouterr().err


def test_no_metrics_no_shares(tmp_path):
    shares = rundir.quorum_shares(tmp_path)
    assert shares == dict(quorum_share={}, nonfinite_share={}, quorum_steps=0,
                          model_quorum_share={}, model_quorum_steps=0)
