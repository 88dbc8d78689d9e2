"""bench/rl_signal.py: the per-variant signal row from the trainer's real sampling half, and its table."""

from __future__ import annotations

import json

import pytest
from conftest import load_bench
from test_rex_integration import _setup


@pytest.fixture(scope="module")
def rs():
    return load_bench("rl_signal")


def test_spread_share_counts_groups_whose_values_differ(rs):
    assert rs.spread_share({0: [0.0, 1.0], 1: [1.0, 1.0], 2: [0.1, 0.0, 0.1]}) == pytest.approx(2 / 3)
    assert rs.spread_share({}) == 0.0


def test_signal_row_from_a_real_sampling_step(rs, tmp_path):
    # scripted agent: every original of q0 is wrong (a dead end), every one of q1 right; probes of q0 are right
    trainer, _, explorer = _setup(tmp_path)
    trajs, rewards, probes, _ = trainer.sample(trainer.examples)
    row = rs.signal_metrics(trainer.tokenizer, trajs, rewards, probes, explorer.end_step(), tokens=400, wall_s=2.0)
    assert row["groups"] == 2 and row["rollouts"] == 8 and row["em_rate"] == 0.5
    assert row["reward_spread"] == row["em_spread"] == 0.0  # no group mixes right and wrong originals
    assert row["dead_end_frac"] == 0.5 and row["probes_kept"] == 4 and row["probe_acc"] == 1.0
    assert row["dead_groups_rescued"] == 1 and row["reward_spread_after_probes"] == 0.5
    assert row["tokens_per_group"] == 200 and row["em_spread_groups_per_10k_tokens"] == 0.0


def _row():
    return {"overrides": ["rollout.n=8"], "em_rate": 0.1, "reward_spread": 0.4, "em_spread": 0.3, "f1_spread": 0.5,
           "dead_end_frac": 0.6, "reward_spread_after_probes": 0.45, "probes_kept": 3, "probe_acc": 0.33,
           "dead_groups_rescued": 1, "tokens_per_group": 900, "traj_len": 500, "em_spread_groups_per_10k_tokens": 2.1,
           "wall_s": 50}


def _result():
    return {"date": "d", "machine": "m", "load_before": 0.1, "load_after": 1.9, "command": "c", "warmup_sha256": "ab" * 32,
            "questions": 64, "out": "o.json", "variants": {"recipe": _row() | {"overrides": []}, "G8": _row()}}


def test_markdown_table_has_one_row_per_variant(rs):
    md = rs.markdown(_result())
    assert md.startswith(rs.HEADING) and "| recipe | (as is) | 10.0 %" in md and "| G8 | rollout.n=8 |" in md


def test_report_retabulates_the_recorded_file(rs, tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(_result()))
    assert rs.main(["--report", "--out", str(tmp_path / "r.json")]) == 0
    assert "| G8 | rollout.n=8 | 10.0 % | 0.40 | 0.30 |" in capsys.readouterr().out


def test_unknown_variant_is_a_usage_error(rs):
    with pytest.raises(SystemExit):
        rs.parse_args(["--variants", "recipe,nope"])


def test_no_questions_is_a_usage_error(rs, capsys):
    with pytest.raises(SystemExit):
        rs.parse_args(["--questions", "0"])
    assert "--questions must be at least 1" in capsys.readouterr().err
