"""The PS's gradient side (byzsgd.roles.gradient_aggregation): the stages in order, both
``--wm_rows`` modes, against hand-computed momentums and the rule called directly."""
from __future__ import annotations

import pytest
import torch

from byzsgd.errors import ConfigError
from byzsgd.gars.pipeline import robust_aggregate
from byzsgd.roles.gradient_aggregation import GradientAggregation

RANKS = [4, 5, 6, 7, 8]


def _agg(**kw) -> GradientAggregation:
    args = dict(dim=3, worker_ranks=RANKS, pipeline="nnm", beta=0.5, rows="quorum")
    args.update(kw)
    return GradientAggregation("median", 1, {}, **args)


def test_without_momentum_it_is_the_pipeline_and_rule_on_the_quorum():
    agg = _agg(beta=0.0)
    rows = torch.tensor([[1.0, 2, 3], [2, 3, 4], [9, 9, 9], [3, 4, 5]])
    out, dropped = agg(0, [4, 5, 6, 7], rows)
    assert dropped == []
    assert torch.allclose(out, robust_aggregate("median", rows, 1, "nnm"))


def test_quorum_rows_are_pytorch_heavy_ball_buffers_of_each_sender():
    agg = _agg(pipeline=None)
    g1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    out1, _ = agg(0, [4, 5, 6], g1)
    assert torch.allclose(out1, g1.median(dim=0).values)  # buf_1 = g_1
    g2 = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 2]])
    out2, _ = agg(1, [4, 5, 6], g2)
    expected = 0.5 * g1 + g2  # buf <- beta buf + g
    assert torch.allclose(out2, expected.median(dim=0).values)


def test_a_nonfinite_row_is_left_out_and_never_enters_a_momentum():
    agg = _agg(pipeline=None)
    rows = torch.tensor([[1.0, 1, 1], [2, 2, 2], [float("nan"), 0, 0], [3, 3, 3]])
    _, dropped = agg(0, [4, 5, 6, 7], rows)
    assert dropped == [6]
    assert agg.nonfinite_dropped == 1
    assert bool(torch.isfinite(agg.momentum.momenta).all())
    assert int(agg.momentum.updates[RANKS.index(6)]) == 0


def test_recent_rows_keep_absent_workers_rows_within_the_staleness():
    agg = _agg(pipeline=None, rows="recent", staleness=2)
    agg(0, [4, 5, 6, 7, 8], torch.arange(15, dtype=torch.float32).reshape(5, 3))
    # step 1: only 4, 5, 6 answer; 7 and 8 enter with their step-0 rows
    assert agg.rows_entering(1, [4, 5, 6]) == RANKS
    out, _ = agg(1, [4, 5, 6], torch.zeros(3, 3))
    hb = agg.momentum.momenta / (1 - 0.5)
    assert torch.allclose(out, hb.median(dim=0).values)
    # step 4: the step-0 rows are 4 steps old, beyond the staleness of 2: out
    assert agg.rows_entering(4, [4, 5, 6]) == [4, 5, 6]


def test_recent_rows_shrink_the_byzantine_share_of_what_the_rule_sees():
    """Seven workers, the two Byzantine ones (9, 10) always in the quorum of five: the quorum
    mode hands the median 2 lies of 5 rows, the recent mode 2 of 7, and the lies pull the
    median down by one order statistic less."""
    ranks = list(range(4, 11))
    value = {4: 1.0, 5: 2.0, 6: 3.0, 7: 4.0, 8: 5.0, 9: -100.0, 10: -100.0}
    outs = {}
    for mode in ("quorum", "recent"):
        agg = GradientAggregation("median", 2, {}, dim=1, worker_ranks=ranks, beta=0.5, rows=mode)
        agg(0, ranks, torch.tensor([[value[r]] for r in ranks]))  # everyone once: rows = values
        quorum = [4, 5, 6, 9, 10]
        outs[mode] = float(agg(1, quorum, torch.tensor([[value[r]] for r in quorum]))[0])
    # heavy-ball rows after two updates: 1.5 x the value; 7 and 8 keep their step-0 rows
    assert outs["quorum"] == pytest.approx(1.5)  # [-150, -150, 1.5, 3, 4.5]
    assert outs["recent"] == pytest.approx(3.0)  # [-150, -150, 1.5, 3, 4, 4.5, 5]


def test_recent_rows_when_the_first_quorum_holds_two_nonfinite_senders():
    """fw = 2 of 7, both Byzantine workers in the first quorum of 5 with Inf rows: the rows
    that enter are the 3 correct ones, and the 2 Inf senders (known Byzantine, no row among
    them) are not counted against those 3.  It raised ResilienceError before (nnm needs
    n >= 2f + 1 = 5 rows, got 3): a Byzantine worker stopped every correct PS at step 0."""
    ranks = [4, 5, 6, 7, 8, 9, 10]
    agg = GradientAggregation("median", 2, {}, dim=3, worker_ranks=ranks, pipeline="nnm",
                              beta=0.9, rows="recent")
    inf = float("inf")
    rows = torch.tensor([[inf, 0, 0], [1.0, 1, 1], [2, 2, 2], [-inf, 1, 1], [3, 3, 3]])
    out, dropped = agg(0, [9, 4, 5, 10, 6], rows)
    assert sorted(dropped) == [9, 10]
    assert torch.allclose(out, torch.tensor([2.0, 2, 2]))  # median of the 3 correct rows
    # later, a known NaN sender that sends finite rows again is one of the fw again
    out, _ = agg(1, [9, 4, 5, 10, 6], torch.ones(5, 3))
    assert bool(torch.isfinite(out).all())
    state = agg.state_dict()
    assert state["nonfinite_senders"] == [9, 10]


def test_state_dict_round_trip_keeps_the_rows_ages():
    a = _agg(rows="recent")
    a(3, [4, 5, 6], torch.ones(3, 3))
    b = _agg(rows="recent")
    b.load_state_dict(a.state_dict())
    assert b.updated_at == {4: 3, 5: 3, 6: 3}
    assert torch.equal(a.momentum.momenta, b.momentum.momenta)


@pytest.mark.parametrize("kw", [{"rows": "all"}, {"staleness": -1}, {"staleness": 1.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        _agg(**kw)
