"""Tests for rexrag.eval.report: summaries, tables, jsonl and plots."""

from __future__ import annotations

import json

import pytest

from rexrag.eval import report


def _rows():
    return [
        {"dataset": "hotpotqa", "em": 1.0, "f1": 1.0, "cover_em": 1.0, "n_searches": 2, "format_ok": True},
        {"dataset": "hotpotqa", "em": 0.0, "f1": 0.5, "cover_em": 1.0, "n_searches": 0, "format_ok": False},
        {"dataset": "nq", "em": 0.0, "f1": 0.0, "cover_em": 0.0, "n_searches": 1, "format_ok": True},
    ]


def test_summarize_per_dataset_and_macro_average():
    s = report.summarize(_rows())
    assert s["hotpotqa"] == {"n": 2, "em": 0.5, "f1": 0.75, "cover_em": 1.0, "mean_searches": 1.0,
                             "valid_format_rate": 0.5}
    assert s["nq"]["n"] == 1 and s["nq"]["mean_searches"] == 1.0
    # macro average over datasets, not over questions (3 questions would give em 1/3)
    assert s["average"]["em"] == pytest.approx(0.25)
    assert s["average"]["f1"] == pytest.approx(0.375)
    assert s["average"]["n"] == 3


def test_table_uses_paper_column_order_and_scales():
    s = report.summarize(_rows() + [{"dataset": "custom", "em": 1, "f1": 1, "cover_em": 1}])
    md = report.metrics_table_md({"agent": s}, "em", {"model": "m", "top-k": 3})
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header == "| Method | NQ | HotpotQA | custom | Avg |"
    row = next(line for line in md.splitlines() if line.startswith("| agent"))
    assert row == "| agent | 0.0 | 50.0 | 100.0 | 50.0 |"
    assert "- model: m" in md and "- top-k: 3" in md


def test_table_missing_dataset_shows_dash():
    a = report.summarize(_rows())
    b = report.summarize([r for r in _rows() if r["dataset"] == "nq"])
    md = report.metrics_table_md({"a": a, "b": b}, "f1")
    row_b = next(line for line in md.splitlines() if line.startswith("| b "))
    assert row_b.split("|")[3].strip() == "–"


def test_comparison_table_change_column():
    before = report.summarize(_rows())
    after_rows = [dict(r, em=1.0) for r in _rows()]
    after = report.summarize(after_rows)
    md = report.comparison_table_md(before, after, metrics=("em",))
    lines = md.splitlines()
    assert "| Avg | em | 25.0 | 100.0 | +75.0 |" in lines
    assert "| HotpotQA | em | 50.0 | 100.0 | +50.0 |" in lines


def test_metrics_markdown_and_json_roundtrip(tmp_path):
    s = report.summarize(_rows())
    md = report.metrics_markdown("smol agent", s, {"corpus": "demo"})
    assert md.startswith("# Evaluation: smol agent") and "valid format rate (%)" in md and "| questions | 1 | 2 |" in md
    p = report.write_metrics_json(tmp_path / "m" / "metrics.json", {"datasets": s})
    assert json.loads(p.read_text())["datasets"]["nq"]["n"] == 1
    assert not list(p.parent.glob(".*tmp"))  # temp files renamed away


def test_predictions_jsonl_roundtrip_and_bad_line(tmp_path):
    rows = [{"id": "q1", "prediction": "Ünïcode", "gold": ["x"]}, {"id": "q2", "prediction": None}]
    p = report.write_predictions_jsonl(tmp_path / "p.jsonl", rows)
    assert report.read_jsonl(p) == rows
    p.write_text(p.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:3"):
        report.read_jsonl(p)


def test_plot_training_writes_pngs_for_present_groups(tmp_path):
    recs = [{"step": i, "reward/mean": i / 10, "rex/dead_end_frac": 1 - i / 10, "rex/probes_kept": i,
             "rex/rho": 0.08, "loss": 0.1} for i in range(5)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = report.plot_training(report.read_metrics_jsonl(path), tmp_path / "plots")
    assert set(out) == {"reward", "dead_end", "probe"}
    for p in out.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_training_skips_groups_without_data(tmp_path):
    out = report.plot_training([{"step": 0, "reward/mean": float("nan")}, {"step": 1, "loss": 1.0}], tmp_path)
    assert out == {}
