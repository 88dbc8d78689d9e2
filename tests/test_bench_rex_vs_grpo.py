"""bench/rex_vs_grpo.py: token counting, resumable records, intervals and the report from recorded runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import load_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rvg():
    return load_bench("rex_vs_grpo")


def test_counting_backend_counts_sampled_tokens_and_passes_the_rest_through(rvg):
    class Inner:
        synced = 0

        def generate(self, prompts, stops, params):
            return [SimpleNamespace(token_ids=list(range(len(p)))) for p in prompts]

        def sync_weights(self, model):
            self.synced += 1

    inner = Inner()
    counter = rvg.CountingBackend(inner)
    counter.generate([[1, 2], [3, 4, 5]], [[], []], None)
    counter.generate([[7]], [[]], None)
    assert counter.tokens == 6
    counter.sync_weights(None)
    assert inner.synced == 1
    assert not hasattr(counter, "generator")  # build_trainer reseeds only backends that have one


def test_running_mean_skips_nan(rvg):
    nan = float("nan")
    got = rvg.running_mean([nan, 1.0, 0.0, nan, 1.0], 2)
    assert got[0] != got[0] and got[1:] == [1.0, 0.5, 0.0, 1.0]


def test_t_interval(rvg):
    assert rvg.t_interval([0.2]) == (0.2, 0.2, 0.2)
    m, lo, hi = rvg.t_interval([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2)
    assert hi - m == pytest.approx(4.303 * 0.1 / 3**0.5)  # t(0.975, 2 df) * sd / sqrt(n)
    assert m - lo == pytest.approx(hi - m)


def _args(rvg, tmp_path, **kw):
    args = rvg.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_baseline_from_other_settings_or_warmup_is_refused(rvg, tmp_path):
    args = _args(rvg, tmp_path)
    out = Path(args.out)
    assert rvg.check_baseline(out, args, "abc") is None
    rvg.atomic_json(rvg.baseline_path(out, "abc"), {"protocol": rvg.protocol(args), "warmup_sha256": "abc", "heldout": []})
    assert rvg.check_baseline(out, args, "abc")["warmup_sha256"] == "abc"
    with pytest.raises(SystemExit, match="token_budget"):
        rvg.check_baseline(out, _args(rvg, tmp_path, token_budget=5), "abc")
    # another warm-up (rebuilt on another CPU) starts its own group under the same protocol
    assert rvg.check_baseline(out, args, "def") is None
    rvg.atomic_json(rvg.baseline_path(out, "def"), {"protocol": rvg.protocol(args), "warmup_sha256": "def", "heldout": []})
    assert sorted(rvg.recorded_baselines(out)) == ["abc", "def"]


def test_retrieval_ceiling_counts_answers_the_agent_can_see(rvg, tmp_path):
    from fake_tokenizer import FakeTokenizer

    from rexrag.data import Passage, QAExample

    class Retriever:  # the answer "Paris" sits in the second passage, far from the start
        def search(self, queries, k):
            return [[Passage("1", "Filler", "word " * 40), Passage("2", "Capital", "Paris it is")][:k] for _ in queries]

    args = _args(rvg, tmp_path)
    exs = {"hotpotqa": [QAExample(id="1", question="capital?", golden_answers=["Paris"], group_id=0),
                        QAExample(id="2", question="other?", golden_answers=["Rome"], group_id=1)]}
    got = rvg.retrieval_ceiling(args, Retriever(), FakeTokenizer(), exs)["hotpotqa"]
    assert got == {"observation": 0.0, "top2_whole": 0.5, "top5_whole": 0.5, "n": 2}


def test_split_is_fixed_and_heldout_disjoint_from_training(rvg, tmp_path):
    from rexrag.data import demo_file

    derived = tmp_path / "data" / "derived"
    derived.mkdir(parents=True)
    rows = demo_file("train.jsonl").read_text().splitlines()
    for name in rvg.DATASETS.values():
        (derived / name).write_text("\n".join(rows[:40]) + "\n")
    args = _args(rvg, tmp_path, data_dir=str(tmp_path / "data"), heldout_per_dataset=5, warmup_examples=8)
    heldout, warm, rl = rvg.load_splits(args)
    again, _, _ = rvg.load_splits(args)
    assert [e.id for e in heldout["hotpotqa"]] == [e.id for e in again["hotpotqa"]]
    held_q = {e.question for exs in heldout.values() for e in exs}
    assert len(warm) == 8 and len(rl) == 2 * 40 - 2 * 5 - 8
    # both fake files hold the same questions in the same shuffle, so held-out ones never reach training
    assert not held_q & {e.question for e in warm + rl}
    assert len({e.group_id for e in rl}) == len(rl)


def _rows(ems: list[int]) -> list[dict]:
    return [{"dataset": ds, "id": str(i), "em": float(e), "f1": float(e), "cover_em": float(e), "n_searches": 1}
            for ds in ("hotpotqa", "2wikimultihopqa") for i, e in enumerate(ems)]


def test_report_from_recorded_runs(rvg, tmp_path):
    args = _args(rvg, tmp_path, append_md=False)
    out = Path(args.out)
    proto = rvg.protocol(args)
    sha = "f" * 64
    rvg.atomic_json(rvg.baseline_path(out, sha), {"protocol": proto, "warmup_sha256": sha, "heldout": _rows([0] * 10),
                                            "splits": {"heldout": {"hotpotqa": 10, "2wikimultihopqa": 10}, "warmup": 4, "rl": 9}})
    for method, seed, right in [("grpo", 0, 2), ("rex", 0, 4), ("grpo", 1, 3), ("rex", 1, 5)]:
        steps = [{"tokens": 100 * (i + 1), "wall_s": 10.0 * (i + 1), "reward/mean": 0.1, "rex/dead_end_frac": 0.5,
                  "rollout/groups_with_signal": 0.5, "rollout/groups_with_signal_after_probes": 0.75,
                  "rex/probes_kept": 1.0 if method == "rex" else 0.0, "rex/probe_acc": 0.5, "rex/rho": 0.15,
                  "rex/alpha": 0.1} for i in range(3)]
        run = {"method": method, "seed": seed, "warmup_sha256": sha, "steps": steps, "tokens": 300, "train_s": 30.0, "date": "2026-11-26 18:00",
               "machine": "test", "curve": [{"step": 3, "tokens": 300, "em": right / 10}],
               "heldout": _rows([1] * right + [0] * (10 - right))}
        rvg.atomic_json(out / "records" / f"{method}_s{seed}_{sha[:12]}.json", run)
    rvg.atomic_json(out / "ceiling.json", {"hotpotqa": {"observation": 0.31, "top2_whole": 0.67, "top5_whole": 0.83, "n": 10},
                                           "2wikimultihopqa": {"observation": 0.21, "top2_whole": 0.41, "top5_whole": 0.53, "n": 10}})
    assert rvg.report(out, args) == 0
    text = (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    grpo = next(line for line in text.splitlines() if line.startswith("| GRPO |"))
    assert "| 2 | 25.0 [" in grpo  # 2 seeds, mean of 20 % and 30 % EM, with a t interval
    rex = next(line for line in text.splitlines() if line.startswith("| REX-RAG |"))
    assert "| 2 | 45.0 [" in rex
    protocol = next(line for line in text.splitlines() if line.startswith("Protocol:"))
    assert "GRPO: " in protocol and "REX-RAG: " in protocol  # the settings of the methods that ran, only those
    assert not any(f"{rvg.LABELS[m]}: " in protocol for m in ("grpo_ds", "rex_rc"))
    assert "seed 1, REX-RAG against GRPO" in text and "+20.0 EM" in text
    assert "cut to 64 tokens) for 31 % of hotpotqa, 21 % of 2wikimultihopqa; in the top-2 passages whole for 67 %, 41 %" in text


def test_section_replaces_an_earlier_one(rvg, tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## A\n\na\n\n" + rvg.HEADING + "\n\nold\n\n## C\n\nc\n")
    rvg.replace_section(md, rvg.HEADING + "\n\nnew\n")
    text = md.read_text()
    assert "old" not in text and "new" in text and text.index("## A") < text.index("new") < text.index("## C")
    rvg.replace_section(tmp_path / "fresh.md", rvg.HEADING + "\n\nx\n")
    assert (tmp_path / "fresh.md").read_text().endswith(rvg.HEADING + "\n\nx\n")


def test_bad_recipe_value_is_a_one_line_error(rvg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rex_vs_grpo.py", "--set", "rollout.nope=1", "--out", str(tmp_path / "o"),
                                      "--work", str(tmp_path / "w")])
    assert rvg.cli() == 2
    err = capsys.readouterr().err
    assert err.startswith("rex_vs_grpo: error:") and "rollout.nope" in err and "Traceback" not in err


def test_weights_hash_of_one_file_is_its_sha256(rvg, tmp_path):
    import hashlib

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert rvg.weights_sha256(tmp_path) == hashlib.sha256(b"weights").hexdigest()


def test_solvable_rl_questions_are_chosen_once_by_a_greedy_pass(rvg, tmp_path, monkeypatch):
    from rexrag.data import QAExample

    rl = [QAExample(id=str(i), question=f"q{i}", golden_answers=["a"], group_id=i) for i in range(6)]
    for i, e in enumerate(rl):
        e.data_source = "hotpotqa" if i % 2 else "2wikimultihopqa"
    calls = []

    def fake_evaluate(engine, model, tokenizer, retriever, datasets, args):
        calls.append(sorted(e.id for exs in datasets.values() for e in exs))
        engine.generate([[1, 2, 3]], [[]], None)  # the greedy pass's sampled tokens are counted
        # questions 1 and 3 solved (exact, then cover-EM only); the 6th is beyond --candidates
        return [{"dataset": e.data_source, "id": e.id, "em": float(e.id == "1"), "cover_em": float(e.id in "13"),
                 "f1": 0.0, "n_searches": 1} for exs in datasets.values() for e in exs]

    class Engine:
        def generate(self, prompts, stops, params):
            return [SimpleNamespace(token_ids=[7] * len(p)) for p in prompts]

    monkeypatch.setattr(rvg, "evaluate", fake_evaluate)
    # at least 2 x B questions are kept (the next best by F1 fill up): B = 1 here, so only the solved two
    args = _args(rvg, tmp_path, rl_questions="solvable", candidates=5, set=["data.batch_size=1"])
    out = Path(args.out)
    got = rvg.select_rl_questions(args, out, "a" * 64, Engine(), None, None, None, rl)
    assert [e.id for e in got] == ["1", "3"] and calls == [["0", "1", "2", "3", "4"]]
    rec = json.loads((out / f"rl_questions_{'a' * 12}.json").read_text())
    assert rec["greedy_tokens"] == 3 and rec["solved"] == 2 and rec["candidates"] == 5
    assert [e.id for e in rvg.select_rl_questions(args, out, "a" * 64, Engine(), None, None, None, rl)] == ["1", "3"]
    assert len(calls) == 1  # recorded: not evaluated again
    assert rvg.protocol(args)["rl_questions"] == "solvable" and "rl_questions" not in rvg.protocol(_args(rvg, tmp_path))


def test_each_out_folder_has_its_own_section_and_command(rvg, tmp_path):
    default, other = rvg.REPO / "bench" / "results" / "rex_vs_grpo", rvg.REPO / "bench" / "results" / "rex_vs_grpo_solvable"
    assert rvg.section_heading(default) == rvg.HEADING
    extended = rvg.section_heading(other)
    assert extended.startswith(rvg.HEADING) and "bench/results/rex_vs_grpo_solvable" in extended
    md = tmp_path / "B.md"
    md.write_text(f"# B\n\n{rvg.HEADING}\n\nfirst\n\n{extended}\n\nsecond\n")
    rvg.replace_section(md, f"{extended}\n\nnew second\n", extended)
    rvg.replace_section(md, f"{rvg.HEADING}\n\nnew first\n")
    text = md.read_text()
    assert "\n\nfirst\n" not in text and "new first" in text and "new second" in text and "\nsecond" not in text
    assert text.index("new first") < text.index("new second")
    args = _args(rvg, tmp_path, rl_questions="solvable", candidates=256, set=["rollout.n=8"])
    assert rvg.command(args, other, [{"seed": 1}, {"seed": 0}]) == (
        "python bench/rex_vs_grpo.py --out bench/results/rex_vs_grpo_solvable --rl-questions solvable --candidates 256 "
        "--set rollout.n=8 --seeds 0,1 --append-md")
    args = _args(rvg, tmp_path, curve_points=0)  # a protocol value off its default, methods not the default four
    runs = [{"seed": 0, "method": "rex_process"}, {"seed": 0, "method": "grpo"}]
    assert rvg.command(args, other, runs).endswith("--curve-points 0 --methods grpo,rex_process --seeds 0 --append-md")


def test_no_candidates_is_a_usage_error(rvg, capsys):
    with pytest.raises(SystemExit):
        rvg.parse_args(["--rl-questions", "solvable", "--candidates", "0"])
    assert "--candidates must be at least 1" in capsys.readouterr().err


def test_seed_difference_says_whether_seeds_separate_two_methods(rvg):
    """The pooled paired line: mean of per-seed differences, a Student-t interval, and the seeds a difference of
    that size and spread would need (closed form: 2 EM with SD 1 needs 4 seeds, t(3) = 3.182)."""
    s = rvg.seed_difference_sentence([0.01, 0.02, 0.03])
    assert s.startswith("+2.0 EM [-0.5, +4.5], within seed noise") and "SD of the difference 1.0" in s
    assert "would need 4 seeds" in s
    s = rvg.seed_difference_sentence([-0.05, -0.06, -0.05, -0.06])
    assert "beyond seed noise" in s and s.startswith("-5.5 EM") and "would need" not in s
