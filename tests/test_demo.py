"""Tests for the bundled demo data, the demo report pieces, and (slow) `rexrag demo --quick` end to end."""

from __future__ import annotations

import hashlib
import json

import pytest

from rexrag import demo
from rexrag.data import QAExample, load_corpus, load_qa
from rexrag.eval.report import summarize
from rexrag.rollout.trajectory import Seg, Trajectory


def test_bundled_demo_data_is_consistent():
    manifest = json.loads(demo.demo_file("manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256(demo.demo_file(name).read_bytes()).hexdigest() == digest, name
    corpus = load_corpus(demo.demo_file("corpus.jsonl"))
    train, held = load_qa(demo.demo_file("train.jsonl")), load_qa(demo.demo_file("eval.jsonl"))
    assert (len(corpus), len(train), len(held)) == (manifest["counts"]["corpus"], manifest["counts"]["train"],
                                                    manifest["counts"]["eval"])
    assert not {e.id for e in train} & {e.id for e in held}  # held-out really is held out
    ids = {p.id for p in corpus}
    for ex in list(train) + list(held):  # every gold passage is in the bundled corpus
        assert set(ex.metadata["supporting_doc_ids"]) <= ids, ex.id
    assert {e.metadata["dataset"] for e in held} == {"hotpotqa", "2wikimultihopqa"}
    assert sum(demo.demo_file(n).stat().st_size for n in demo.DEMO_FILES) < 3_000_000
    notice = demo.demo_file("NOTICE").read_text()
    assert "CC BY-SA 4.0" in notice and "Apache-2.0" in notice and "make_demo_data.py" in notice


def test_make_demo_data_script_reproduces_the_bundle(shared_data, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    manifest = mod.build(shared_data, tmp_path, per_dataset=100, eval_per_dataset=20, seed=20261122)
    assert manifest == json.loads(demo.demo_file("manifest.json").read_text())


def test_load_demo_eval_splits_by_dataset():
    data = demo.load_demo_eval(3)
    assert set(data) == {"hotpotqa", "2wikimultihopqa"}
    exs = [e for _, ex in data.values() for e in ex]
    assert len(exs) == 6 and len({e.group_id for e in exs}) == 6
    assert all(e.data_source == ds for ds, (_, ex) in data.items() for e in ex)


def test_render_pieces_marks_segment_kinds():
    md = demo.render_pieces_md([("POLICY", "<think> hm </think>\n<search> q </search>"),
                                ("INFO", "\n\n<information>Doc 1(Title: \"A\") text\nDoc 2</information>\n\n"),
                                ("PROBE", "<think> Maybe I was wrong."), ("NOTICE", "bad step")])
    assert "> <information>Doc 1(Title: \"A\") text\n> Doc 2</information>" in md
    assert "**PROBE** (inserted exploratory prompt)" in md and "**NOTICE**" in md and "**POLICY** (model)" in md


class _Inner:
    def __init__(self):
        self.ended = 0

    def explore(self, originals, rewards, agent, score_fn, reward_fn):
        return [t for t in originals if t.is_probe]

    def end_step(self):
        self.ended += 1
        return {"rex/rho": 0.1}


def test_recording_explorer_delegates_and_keeps_probes():
    probe, orig = Trajectory(is_probe=True), Trajectory()
    rec = demo.RecordingExplorer(_Inner(), keep=1)
    assert rec.explore([orig, probe], [0, 0], None, None, None) == [probe]
    rec.explore([Trajectory(is_probe=True)], [0], None, None, None)
    assert len(rec.probes) == 1 and rec.probes[0] is not probe  # keeps only the most recent
    assert rec.end_step() == {"rex/rho": 0.1} and rec.inner.ended == 1


def _traj(tok, kinds_texts, reward=0.0, is_probe=False):
    t = Trajectory(example=QAExample("q", "Who?", ["Bob"]), is_probe=is_probe)
    for kind, text in kinds_texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        t.extend(ids, kind, 0, [0.0] * len(ids) if kind == Seg.POLICY else None)
    t.meta["reward"] = reward
    return t


def test_write_report_with_probe_and_plots(smol_tokenizer, tmp_path):
    from rexrag.eval import report as R

    tok = smol_tokenizer
    searched = _traj(tok, [(Seg.PROMPT, "Q"), (Seg.POLICY, "<search> x </search>"), (Seg.INFO, "<information>D</information>"),
                           (Seg.POLICY, "<answer> Bob </answer>")])
    searched.n_searches, searched.answer = 1, "Bob"
    probe = _traj(tok, [(Seg.PROMPT, "Q"), (Seg.POLICY, "<think> a </think>"), (Seg.PROBE, "<think> Maybe I missed"),
                        (Seg.POLICY, " it </think><answer> Bob </answer>")], reward=1.0, is_probe=True)
    rows = [{"dataset": "hotpotqa", "em": 1.0, "f1": 1.0, "cover_em": 1.0, "n_searches": 1, "format_ok": True,
             "trajectory": searched}]
    summary = R.summarize(rows)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/mean": 0.1 * s, "rex/dead_end_frac": 0.5, "rex/probes_kept": 1.0,
                    "rex/probe_acc": "nan"}) + "\n" for s in (1, 2)))
    p = demo.PROFILES["quick"]
    path = demo.write_report(tmp_path, tok, p, {"summary": R.summarize([dict(rows[0], em=0.0)]), "rows": []},
                             {"summary": summary, "rows": rows}, {"trajectories": 3, "two_hop": 1, "losses": [2.0, 1.0]},
                             [], [probe], {"setup": 1.0, "cpu_setup": 0.5, "total": 60.0, "cpu_total": 30.0}, "quick", "ckpt")
    md = path.read_text()
    assert "| HotpotQA | em | 0.0 | 100.0 | +100.0 |" in md
    assert "total wall time 1.0 min" in md and "CPU time 0.5 min (setup 0s)" in md
    assert "**PROBE** (inserted exploratory prompt)" in md and "Maybe I missed" in md
    assert "![reward](plots/reward.png)" in md and (tmp_path / "plots" / "probe.png").is_file()
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["after"]["hotpotqa"]["em"] == 1.0 and s["probes_seen"] == 1


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """`rexrag demo --quick` into tmp_path: report, plots and numeric metrics exist."""
    from rexrag.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Before / after" in md and "## Example trajectories" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    quick = demo.PROFILES["quick"]
    for side in ("before", "after"):
        # the summary is the summary of the written predictions, and every score is a rate
        rows = [json.loads(line) for line in (tmp_path / f"eval_{side}" / "predictions.jsonl").read_text().splitlines()]
        expected = summarize(rows)
        assert set(summary[side]) == set(expected)
        for name, metrics in expected.items():
            assert summary[side][name] == pytest.approx(metrics), (side, name)
        avg = summary[side]["average"]
        assert avg["n"] == len(rows) == 2 * quick.eval_per_dataset
        for key in ("em", "f1", "cover_em", "valid_format_rate"):
            assert 0.0 <= avg[key] <= 1.0, key
        assert 0.0 <= avg["mean_searches"] <= quick.eval_max_turns
    assert (tmp_path / "plots" / "reward.png").is_file()
    assert (tmp_path / "eval_after" / "predictions.jsonl").is_file()
    assert len(summary["warmup_losses"]) == demo.PROFILES["quick"].warmup_steps
