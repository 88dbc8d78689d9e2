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


def test_wilson_interval_known_values():
    lo, hi = report.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = report.wilson_interval(10, 20)
    assert (lo, hi) == (pytest.approx(0.2993, abs=1e-4), pytest.approx(0.7007, abs=1e-4))
    assert report.wilson_interval(20, 20)[1] == 1.0 and report.wilson_interval(0, 0) == (0.0, 1.0)


def _qrows(ds, scores, metric="em"):
    return [{"dataset": ds, "id": f"{ds}{i}", metric: float(s)} for i, s in enumerate(scores)]


def test_score_intervals_wilson_per_dataset_bootstrap_for_the_average():
    rows = _qrows("hotpotqa", [1, 0, 0, 0]) + _qrows("2wikimultihopqa", [1, 1, 0, 0, 0, 0, 0, 0])
    iv = report.score_intervals(rows, "em", n_boot=2000)
    assert iv["hotpotqa"]["n"] == 4 and iv["hotpotqa"]["mean"] == 0.25
    assert (iv["hotpotqa"]["lo"], iv["hotpotqa"]["hi"]) == pytest.approx(report.wilson_interval(1, 4))
    avg = iv["average"]
    assert avg["n"] == 12 and avg["mean"] == pytest.approx(0.25)  # macro average, as summarize
    assert 0.0 <= avg["lo"] < 0.25 < avg["hi"] <= 1.0
    assert avg["method"] == "bootstrap" and report.score_intervals(rows, "em", n_boot=2000) == iv  # seeded
    equal = _qrows("hotpotqa", [1, 0, 0, 0]) + _qrows("2wikimultihopqa", [1, 1, 0, 0])
    avg = report.score_intervals(equal, "em")["average"]  # equal n: the pooled rate, Wilson
    assert avg["method"] == "wilson" and (avg["lo"], avg["hi"]) == pytest.approx(report.wilson_interval(3, 8))


def test_paired_difference_counts_and_interval():
    a = _qrows("hotpotqa", [0] * 10) + _qrows("2wikimultihopqa", [0] * 10)
    b = _qrows("hotpotqa", [1] * 10) + _qrows("2wikimultihopqa", [1] * 10)
    d = report.paired_difference(a, list(reversed(b)))  # paired by id, not by position
    assert d["diff"] == 1.0 and d["gained"] == 20 and d["lost"] == 0 and d["lo"] == d["hi"] == 1.0
    assert "a gain beyond noise" in report.difference_sentence(d, "RL", "warm-up")
    mixed = _qrows("hotpotqa", [1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    d = report.paired_difference(_qrows("hotpotqa", [0, 1] + [0] * 8), mixed)
    assert (d["diff"], d["gained"], d["lost"]) == (pytest.approx(0.1), 2, 1) and d["lo"] < 0 < d["hi"]
    s = report.difference_sentence(d, "RL", "the warm-up checkpoint")
    assert s.startswith("RL changed the score by +10.0 EM over the warm-up checkpoint (95% paired-bootstrap CI")
    assert "2 newly right, 1 newly wrong" in s
    assert s.endswith("within noise, so RL added nothing measurable beyond the warm-up checkpoint at this sample size.")
    same = report.paired_difference(a, a)
    assert "changed no held-out answer's EM" in report.difference_sentence(same, "RL", "warm-up")
    assert "a loss beyond noise" in report.difference_sentence(report.paired_difference(b, a), "RL", "warm-up")
    with pytest.raises(ValueError, match="same questions"):
        report.paired_difference(a, b[:3])


def test_interval_table_names_n_and_intervals():
    rows = _qrows("hotpotqa", [1, 0]) + _qrows("2wikimultihopqa", [0, 0])
    for r in rows:
        r["cover_em"] = 1.0
    md = report.interval_table_md({"warm-up": rows})
    header, _, row = md.splitlines()
    assert header.startswith("| Method | EM HotpotQA (n=2) | EM 2Wiki (n=2) | EM Avg | cover-EM HotpotQA (n=2)")
    assert row.startswith("| warm-up | 50.0 [9.5, 90.5] | 0.0 [0.0, 65.8] | 25.0 [")
    assert "| 100.0 [34.2, 100.0] |" in row
