"""The worst-case screen (byzsgd.experiments.screen): it runs the PS's own aggregation code,
puts the Byzantine workers in every quorum, and its cells parse as documented."""
from __future__ import annotations

import json

import pytest

from byzsgd.errors import ConfigError
from byzsgd.experiments import screen
from byzsgd.roles.gradient_aggregation import GradientAggregation


def _record_quorums(monkeypatch) -> list[list[int]]:
    """The senders of every quorum the screen's PS aggregates (the real GradientAggregation)."""
    seen: list[list[int]] = []
    real = GradientAggregation.__call__

    def spy(self, step, senders, rows):
        seen.append(list(senders))
        return real(self, step, senders, rows)

    monkeypatch.setattr(GradientAggregation, "__call__", spy)
    return seen


def test_menu_covers_every_registered_attack_and_the_momentum_aware_variants():
    from byzsgd import attacks

    cells = screen.menu()
    for name in attacks.names():
        assert name in cells
    for name in ("minmax+mom", "minsum+mom", "fang+mom", "optimal_alie+mom", "label_flip", "silent"):
        assert name in cells
    assert len(cells) == len(set(cells))


def test_parse_cell():
    c = screen.parse_cell("minmax+mom:direction=sign,gamma_init=20", fw=2, seed=3, steps=7, overrides={})
    assert (c.attack, c.momentum_aware, c.attack_args, c.fw, c.seed, c.steps) == \
        ("minmax", True, {"direction": "sign", "gamma_init": 20}, 2, 3, 7)
    assert c.label == "minmax+mom(direction=sign,gamma_init=20)"
    for bad in ("nosuch", "alie+twice", "minmax:direction"):
        with pytest.raises(ConfigError):
            screen.parse_cell(bad, fw=1, seed=0, steps=1, overrides={})


def test_a_tiny_screen_runs_the_ps_aggregation_with_the_byzantine_rows_in_every_quorum(monkeypatch):
    """Every step goes through GradientAggregation with both Byzantine ranks among the senders
    (the worst-case arrival order), and the momentum-aware attacker's rows reach it."""
    seen = _record_quorums(monkeypatch)
    s = screen.Screen(eval_samples=50)
    row = s.run(screen.Cell(attack="minmax", fw=2, steps=3, momentum_aware=True,
                            overrides={"check_gradients": 0}))
    assert len(seen) == 3
    assert all({9, 10} <= set(q) and len(q) == 5 for q in seen)  # q_w = 7 - 2, both Byzantine in
    assert row["byz_share"] == 1.0 and row["steps"] == 3 and 0 <= row["accuracy"] <= 100
    assert "wm=0.9" in row["config"]


def test_the_command_line_writes_one_json_line_per_cell(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert screen.main(["--cells", "reverse", "--fw", "1", "--steps", "2", "--eval_samples", "50",
                        "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["attack"] for r in rows] == ["none", "reverse"]
    with pytest.raises(ConfigError):  # refused before training: median cannot take fw=3 of 4
        screen.main(["--cells", "reverse", "--fw", "3", "--steps", "1"])


def test_with_the_gradient_check_forgers_are_banned_and_correct_workers_never(monkeypatch):
    """--check_gradients 2 (of q_w = 5): both forging workers are caught within a few steps,
    no correct worker is (its gradient is recomputed bit for bit), and once banned the
    quorums hold correct workers only."""
    seen = _record_quorums(monkeypatch)
    row = screen.Screen(eval_samples=50).run(
        screen.Cell(attack="alie", fw=2, steps=12, overrides={"check_gradients": 2}))
    assert set(row["banned_at"]) == {"9", "10"} and row["false_bans"] == []
    last = max(row["banned_at"].values())
    assert all(len(q) == 5 and not {9, 10} & set(q) for q in seen[last + 1:])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_default_holds_where_the_rule_alone_collapses():
    """Issue 25's CI check, in the screen (the Byzantine workers in every quorum, omniscient),
    300 steps, fw = 2 of 7: the momentum-aware minmax and the defence-aware optimal_alie (its
    factor searched against nnm + median) stay within 2 points of no attack under the main
    job's default; the momentum-aware minsum collapses the rule alone (no gradient check: 8.9%
    measured), which is why the default checks (docs/worst_case.md) -- and proves the attacks
    still bite."""
    s = screen.Screen(eval_samples=2000)
    none = s.run(screen.Cell("none", fw=2, steps=300))["accuracy"]
    for cell in (screen.Cell("minmax", fw=2, steps=300, momentum_aware=True),
                 screen.Cell("optimal_alie", fw=2, steps=300)):
        row = s.run(cell)
        assert row["byz_share"] > 0 and set(row["banned_at"]) == {"9", "10"}, row
        assert row["false_bans"] == []
        assert row["accuracy"] >= none - 2.0, (cell.label, row["accuracy"], none)
    alone = s.run(screen.Cell("minsum", fw=2, steps=300, momentum_aware=True,
                              overrides={"check_gradients": 0}))
    assert alone["byz_share"] == 1.0 and alone["accuracy"] < 50, alone
