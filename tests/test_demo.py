"""Tests for the bundled demo data, the demo report pieces, and (slow) `rexrag demo --quick` end to end."""

from __future__ import annotations

import hashlib
import json

import pytest

from rexrag import demo, demo_report
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
    md = demo_report.render_pieces_md([("POLICY", "<think> hm </think>\n<search> q </search>"),
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


def _eval(rows):
    from rexrag.eval import report as R

    return {"summary": R.summarize(rows), "rows": rows}


def _qrows(scores, cover=None, trajectory=None):
    rows = []
    for i, em in enumerate(scores):
        ds = "hotpotqa" if i % 2 == 0 else "2wikimultihopqa"
        rows.append({"dataset": ds, "id": f"q{i}", "em": float(em), "f1": float(em),
                     "cover_em": float(cover[i] if cover is not None else em), "n_searches": 1, "format_ok": True,
                     "trajectory": trajectory if i == 0 else None})
    return rows


def test_write_report_with_probe_and_plots(smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    searched = _traj(tok, [(Seg.PROMPT, "Q"), (Seg.POLICY, "<search> x </search>"), (Seg.INFO, "<information>D</information>"),
                           (Seg.POLICY, "<answer> Bob </answer>")])
    searched.n_searches, searched.answer = 1, "Bob"
    probe = _traj(tok, [(Seg.PROMPT, "Q"), (Seg.POLICY, "<think> a </think>"), (Seg.PROBE, "<think> Maybe I missed"),
                        (Seg.POLICY, " it </think><answer> Bob </answer>")], reward=1.0, is_probe=True)
    evals = {"untrained": _eval(_qrows([0] * 8)), "rag": _eval(_qrows([0] * 8, cover=[1, 1, 0, 0, 0, 0, 0, 0])),
             "warmup": _eval(_qrows([1, 0, 0, 0, 0, 0, 0, 0])),
             "trained": _eval(_qrows([1, 1, 1, 0, 0, 0, 0, 0], trajectory=searched))}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward/mean": 0.1 * s, "rex/dead_end_frac": 0.5, "rex/probes_kept": 1.0,
                    "rex/probe_acc": "nan", "rollout/groups_with_signal": 0.5 * (s - 1),
                    "rollout/groups_with_signal_after_probes": 0.5 * s, "rollout/em_rate": 0.25 * (s - 1)}) + "\n"
        for s in (1, 2)))
    p = demo.PROFILES["quick"]
    path = demo_report.write_report(tmp_path, tok, p, evals, {"trajectories": 3, "two_hop": 1, "losses": [2.0, 1.0]},
                                    [], [probe], {"setup": 1.0, "cpu_setup": 0.5, "total": 60.0, "cpu_total": 30.0}, "quick",
                                    "ckpt", {"questions": 4, "file": str(tmp_path / "rl_questions.jsonl"), "ranked_by": "greedy",
                                             "candidates": 10, "candidates_em": 3, "solved": 4, "chosen_em": 3, "chosen_cover_em": 4})
    md = path.read_text()
    # the headline: four rows on the same questions, n per dataset, intervals, plain sentences
    assert "| Method | EM HotpotQA (n=4) | EM 2Wiki (n=4) | EM Avg |" in md
    for label in demo_report.LABELS.values():
        assert f"| {label} | " in md
    assert "| warm-up + REX-RAG (agent) | 50.0 [15.0, 85.0] | 25.0 [4.6, 69.9] | 37.5 [13.7, 69.4] |" in md
    assert "95 % Wilson score intervals" in md
    assert "- RL (REX-RAG) changed the score by +25.0 EM over the warm-up checkpoint (95% paired-bootstrap CI" in md
    assert "2 newly right, 0 newly wrong" in md and "within noise" in md
    assert "- The trained agent changed the score by +12.5 cover-EM over naive RAG on the same base model" in md
    assert "| HotpotQA | em | 25.0 | 50.0 | +25.0 |" in md  # warm-up vs trained, all metrics
    assert "of 10 candidates it answered 3 exactly and 4 with the gold in its answer; the 4 chosen include 3" in md
    assert "Outcome reward only: turn-level credit (`trainer.process_reward`)" in md  # the measured choice, said
    assert "on average 25 % of groups had reward spread" in md and "1 of 2 steps had at least one exactly-correct" in md
    assert "rollout/groups_with_signal" in md
    assert "total wall time 1.0 min" in md and "CPU time 0.5 min (setup 0s)" in md
    assert "**PROBE** (inserted exploratory prompt)" in md and "Maybe I missed" in md
    assert "![reward](plots/reward.png)" in md and (tmp_path / "plots" / "probe.png").is_file()
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["after"]["hotpotqa"]["em"] == 0.5 and s["evals"]["warmup"]["average"]["em"] == 0.125
    assert s["probes_seen"] == 1 and s["paired"]["trained_vs_warmup_em"]["gained"] == 2
    assert s["signal"]["steps_with_signal"] == 2 and demo_report.headline_text(tmp_path) == s["headline"]


def test_split_and_pick_rl_questions():
    train = [QAExample(f"t{i}", f"Question {i}?", [f"answer{i}"]) for i in range(10)]
    warm, rest = demo.split_train_questions(train, 4, seed=0)
    assert len(warm) == 4 and len(rest) == 6 and not {e.id for e in warm} & {e.id for e in rest}
    assert [e.id for e in demo.split_train_questions(train, 4, seed=0)[0]] == [e.id for e in warm]  # seeded
    assert not {e.id for e in load_qa(demo.demo_file("eval.jsonl"))} & {e.id for e in load_qa(demo.demo_file("train.jsonl"))}

    greedy = [{"em": 0.0, "cover_em": 0.0, "f1": 0.0}, {"em": 0.0, "cover_em": 1.0, "f1": 0.5},
              {"em": 1.0, "cover_em": 1.0, "f1": 1.0}, {"em": 0.0, "cover_em": 0.0, "f1": 0.3},
              {"em": 1.0, "cover_em": 1.0, "f1": 1.0}, {"em": 0.0, "cover_em": 0.0, "f1": 0.0}]
    qs, info = demo.pick_rl_questions(rest, greedy, 5)
    assert [e.id for e in qs] == [rest[i].id for i in (2, 4, 1)]  # solved only: exact first, then cover-EM
    assert info["candidates"] == 6 and info["candidates_em"] == 2 and info["solved"] == 3
    assert info["chosen_em"] == 2 and info["chosen_cover_em"] == 3
    assert [e.id for e in demo.pick_rl_questions(rest, greedy, 2)[0]] == [rest[2].id, rest[4].id]  # at most n
    qs, _ = demo.pick_rl_questions(rest, greedy, 6, at_least=4)  # too few solved: the next best by F1 fill up
    assert [e.id for e in qs] == [rest[i].id for i in (2, 4, 1, 3)]
    assert demo.pick_rl_questions(rest, None, 3)[0] == rest[:3]
    with pytest.raises(ValueError, match="greedy results"):
        demo.pick_rl_questions(rest, greedy[:2], 3)
    p = demo.PROFILES["default"]
    assert p.rl_questions == "solvable" and p.rl_temperature < 1.0 and p.rl_candidates >= p.rl_steps * p.rl_prompts


def test_write_questions_copies_bundled_rows(tmp_path):
    train = list(load_qa(demo.demo_file("train.jsonl")))
    path = demo.write_questions(train[3:5], tmp_path / "q.jsonl")
    assert [e.id for e in load_qa(path)] == [e.id for e in train[3:5]]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """`rexrag demo --quick` into tmp_path: report, plots and numeric metrics exist."""
    from rexrag.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Held-out results" in md and "## Example trajectories" in md and "RL (REX-RAG)" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    quick = demo.PROFILES["quick"]
    for side, folder in (("untrained", "before"), ("rag", "rag"), ("warmup", "warmup"), ("trained", "after")):
        # the summary is the summary of the written predictions, and every score is a rate
        rows = [json.loads(line) for line in (tmp_path / f"eval_{folder}" / "predictions.jsonl").read_text().splitlines()]
        expected = summarize(rows)
        assert set(summary["evals"][side]) == set(expected)
        for name, metrics in expected.items():
            assert summary["evals"][side][name] == pytest.approx(metrics), (side, name)
        avg = summary["evals"][side]["average"]
        assert avg["n"] == len(rows) == 2 * quick.eval_per_dataset
        for key in ("em", "f1", "cover_em", "valid_format_rate"):
            assert 0.0 <= avg[key] <= 1.0, key
        assert 0.0 <= avg["mean_searches"] <= quick.eval_max_turns
    assert (tmp_path / "plots" / "reward.png").is_file()
    assert (tmp_path / "eval_after" / "predictions.jsonl").is_file()
    assert len(summary["warmup_losses"]) == demo.PROFILES["quick"].warmup_steps
    assert summary["signal"]["steps"] == quick.rl_steps and 0.0 <= summary["signal"]["groups_with_signal_mean"] <= 1.0
