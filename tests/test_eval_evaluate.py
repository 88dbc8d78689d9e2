"""Tests for rexrag.eval.evaluate and `rexrag eval`: methods, scoring, files, benchmark layout."""

from __future__ import annotations

import json

import pytest

from rexrag.data import QAExample
from rexrag.errors import UserError
from rexrag.eval import evaluate as E
from rexrag.retrieval.base import Passage
from rexrag.rollout.engine import GenOutput


class FakeRetriever:
    def __init__(self):
        self.queries = []

    def search(self, queries, k):
        self.queries += list(queries)
        return [[Passage(f"d{i}", f"Title {i}", f"Some facts, number {i}.") for i in range(k)]
                for q in queries]


class ScriptedBackend:
    """Answers from a script keyed by a word of the prompt: searches once, then answers."""

    def __init__(self, tokenizer, answers: dict[str, str], search_first: bool):
        self.tok, self.answers, self.search_first = tokenizer, answers, search_first
        self.calls = []

    def generate(self, prompts, stops, params):
        self.calls.append((len(prompts), params.temperature))
        outs = []
        for p in prompts:
            text = self.tok.decode(p)
            key = next(k for k in self.answers if k in text)
            if self.search_first and "<information>" not in text.split("assistant")[-1]:
                reply = f"<think> look up </think>\n<search> {key} </search>"
                stop = "</search>"
            else:
                reply = f"<think> known </think>\n<answer> {self.answers[key]} </answer>"
                stop = "</answer>"
            ids = self.tok(reply, add_special_tokens=False)["input_ids"]
            outs.append(GenOutput(ids, [0.0] * len(ids), "stop", stop))
        return outs


def _examples():
    return [QAExample("q1", "What is the capital of France?", ["Paris"], 0, "demo"),
            QAExample("q2", "Which ocean is largest?", ["Pacific Ocean"], 1, "demo"),
            QAExample("q3", "Who wrote Hamlet?", ["William Shakespeare"], 2, "demo")]


ANSWERS = {"France": "Paris", "ocean": "the Pacific ocean", "Hamlet": "Marlowe"}


@pytest.mark.parametrize("method", ["direct", "rag", "retrieve_once", "agent"])
def test_methods_score_scripted_answers(method, smol_tokenizer, tmp_path):
    tok = smol_tokenizer
    backend = ScriptedBackend(tok, ANSWERS, search_first=method == "agent")
    retriever = FakeRetriever()
    opts = E.EvalOptions(method=method, batch_size=2, max_new_tokens=32)
    res = E.run_eval({"demo": (tmp_path / "x.jsonl", _examples())}, None, tok, retriever, opts, tmp_path / "out",
                     "scripted", {"model": "scripted"}, quiet=True, backend=backend)
    rows = res["rows"]
    assert [r["prediction"] for r in rows] == ["Paris", "the Pacific ocean", "Marlowe"]
    assert [r["em"] for r in rows] == [1.0, 1.0, 0.0]  # "the" is dropped by normalisation
    assert all(t == 0.0 for _, t in backend.calls)  # greedy
    assert max(n for n, _ in backend.calls) <= 2  # batched by batch_size
    expected_searches = {"direct": 0, "rag": 1, "retrieve_once": 1, "agent": 1}[method]
    assert all(r["n_searches"] == expected_searches for r in rows)
    assert all(r["format_ok"] for r in rows)
    assert len(retriever.queries) == (0 if method == "direct" else 3)
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["datasets"]["demo"]["em"] == pytest.approx(2 / 3)
    assert summary["datasets"]["average"]["em"] == pytest.approx(2 / 3)
    assert summary["meta"]["method"] == method
    preds = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == ["q1", "q2", "q3"] and preds[0]["golden_answers"] == ["Paris"]
    assert "<answer> Paris </answer>" in preds[0]["response"]
    assert all(p["answer_source"] == "tags" for p in preds)
    if method == "agent":
        kinds = [k for k, _ in preds[0]["segments"]]
        assert kinds == ["POLICY", "INFO", "POLICY"]
        assert "trajectory" not in preds[0]
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| scripted | 66.7 | 66.7 |" in md


class PlainBackend:
    """Replies without any tags, as an untrained small model does."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        self.tok, self.replies = tokenizer, replies

    def generate(self, prompts, stops, params):
        outs = []
        for p in prompts:
            text = self.tok.decode(p)
            reply = next(v for k, v in self.replies.items() if k in text)
            ids = self.tok(reply, add_special_tokens=False)["input_ids"]
            outs.append(GenOutput(ids, [0.0] * len(ids), "length", None))
        return outs


PLAIN = {"France": "Paris", "ocean": "I think it is the Pacific Ocean, by far.", "Hamlet": "   "}


@pytest.mark.parametrize("method", ["direct", "rag"])
def test_one_shot_baselines_score_the_whole_response_without_tags(method, smol_tokenizer, tmp_path):
    """FlashRAG's naive-generation rule: no answer span -> the whole response is the prediction."""
    opts = E.EvalOptions(method=method, batch_size=4, max_new_tokens=32)
    res = E.run_eval({"demo": (None, _examples())}, None, smol_tokenizer, FakeRetriever(), opts, tmp_path / "o",
                     "plain", quiet=True, backend=PlainBackend(smol_tokenizer, PLAIN))
    rows = res["rows"]
    assert [r["prediction"] for r in rows] == ["Paris", "I think it is the Pacific Ocean, by far.", None]
    assert [r["answer_source"] for r in rows] == ["response", "response", None]
    assert [r["em"] for r in rows] == [1.0, 0.0, 0.0]
    assert [r["cover_em"] for r in rows] == [1.0, 1.0, 0.0]  # gold contained in the normalised response
    assert not any(r["format_ok"] for r in rows)
    md = (tmp_path / "o" / "metrics.md").read_text()
    assert "cover-EM (x100)" in md and "| plain | 66.7 | 66.7 |" in md


class RecordingBackend:
    """Writes the warm-up's first search turn while no observation is in the prompt, then answers; records prompts."""

    def __init__(self, tokenizer):
        self.tok, self.prompts = tokenizer, []

    def generate(self, prompts, stops, params):
        from rexrag.warmup import search_query, search_turn_text

        outs = []
        for p in prompts:
            self.prompts.append(list(p))
            text = self.tok.decode(p)
            if "<information>" in text.split("assistant")[-1]:
                reply, stop = "<think> known </think>\n<answer> Paris </answer>", "</answer>"
            else:
                question = next(e.question for e in _examples() if e.question in text)
                reply, stop = search_turn_text(search_query(question)), "</search>"
            ids = self.tok(reply, add_special_tokens=False)["input_ids"]
            outs.append(GenOutput(ids, [0.0] * len(ids), "stop", stop))
        return outs


def test_retrieve_once_reads_exactly_what_the_agent_reads_after_its_first_search(smol_tokenizer):
    """Token for token, the retrieve-once answer prompt is the agent's context after it writes the warm-up's
    first search: same query, same passages, same observation cut and tags; and the agent's strict rule."""
    kw = dict(topk=2, max_new_tokens=48, max_obs_tokens=12, batch_size=8)
    agent_backend, once_backend = RecordingBackend(smol_tokenizer), RecordingBackend(smol_tokenizer)
    retr_a, retr_o = FakeRetriever(), FakeRetriever()
    E.evaluate_examples(_examples(), None, smol_tokenizer, retr_a, E.EvalOptions(method="agent", max_turns=2, **kw),
                        backend=agent_backend)
    rows = E.evaluate_examples(_examples(), None, smol_tokenizer, retr_o, E.EvalOptions(method="retrieve_once", **kw),
                               backend=once_backend)
    assert retr_o.queries == retr_a.queries == ["What is the capital of France", "Which ocean is largest", "Who wrote Hamlet"]
    assert once_backend.prompts == agent_backend.prompts[3:]  # the agent's second turn, all three questions
    assert "<information>" in smol_tokenizer.decode(once_backend.prompts[0])
    assert [r["prediction"] for r in rows] == ["Paris"] * 3 and [r["em"] for r in rows] == [1.0, 0.0, 0.0]
    plain = E.evaluate_examples(_examples(), None, smol_tokenizer, FakeRetriever(),
                                E.EvalOptions(method="retrieve_once", **kw), backend=PlainBackend(smol_tokenizer, PLAIN))
    assert all(r["prediction"] is None and r["em"] == 0.0 for r in plain)  # no answer span: no answer


def test_agent_without_answer_tags_scores_zero(smol_tokenizer):
    """The agent keeps the strict rule: an untagged response is no answer."""
    backend = PlainBackend(smol_tokenizer, PLAIN)
    rows = E.evaluate_examples(_examples(), None, smol_tokenizer, FakeRetriever(),
                               E.EvalOptions(method="agent", max_turns=1, max_new_tokens=16), backend=backend)
    assert all(r["prediction"] is None and r["answer_source"] is None for r in rows)
    assert [r["em"] for r in rows] == [0.0] * 3 and [r["cover_em"] for r in rows] == [0.0] * 3


def test_one_shot_prediction_prefers_the_answer_span():
    assert E.one_shot_prediction("<think> x </think> <answer> Bob </answer>") == ("Bob", "tags")
    assert E.one_shot_prediction("Bob, obviously.") == ("Bob, obviously.", "response")
    assert E.one_shot_prediction("<answer></answer>") == ("<answer></answer>", "response")
    assert E.one_shot_prediction("  \n") == (None, None)


def test_rag_puts_passages_in_the_prompt(smol_tokenizer):
    ids = E._one_shot_prompt(smol_tokenizer, _examples()[0], [Passage("a", "Paris", "Capital {x} of France.")])
    text = smol_tokenizer.decode(ids)
    assert 'Doc 1(Title: "Paris") Capital {x} of France.' in text and "Question: What is the capital" in text


def test_agent_needs_retriever(smol_tokenizer):
    with pytest.raises(UserError, match="needs a retriever"):
        E.evaluate_examples(_examples(), None, smol_tokenizer, None, E.EvalOptions(method="rag"), backend=object())


def test_real_tiny_model_is_deterministic_and_batched(smol_tokenizer, tiny_model, tmp_path):
    opts = E.EvalOptions(method="agent", batch_size=2, max_new_tokens=6, max_turns=1, backend="hf")
    a = E.run_eval({"d": (None, _examples())}, tiny_model, smol_tokenizer, FakeRetriever(), opts, None, "t", quiet=True)
    opts1 = E.EvalOptions(method="agent", batch_size=3, max_new_tokens=6, max_turns=1, backend="hf")
    b = E.run_eval({"d": (None, _examples())}, tiny_model, smol_tokenizer, FakeRetriever(), opts1, None, "t", quiet=True)
    assert [r["response"] for r in a["rows"]] == [r["response"] for r in b["rows"]]
    assert a["summary"]["d"]["n"] == 3


def test_resolve_benchmark_layouts(tmp_path):
    (tmp_path / "nq").mkdir()
    (tmp_path / "nq" / "nq_test_small.flashrag.jsonl").write_text("{}\n")
    (tmp_path / "nq" / "nq_test_big.flashrag.jsonl").write_text("{}\n" * 5)
    (tmp_path / "nq" / "train.jsonl").write_text("{}\n")
    assert E.resolve_benchmark("nq", tmp_path).name == "nq_test_big.flashrag.jsonl"
    (tmp_path / "nq" / "dev.jsonl").write_text("{}\n")
    assert E.resolve_benchmark("nq", tmp_path).name == "dev.jsonl"  # FlashRAG's own name wins
    (tmp_path / "2wikimultihopqa").mkdir()
    (tmp_path / "2wikimultihopqa" / "2wiki_dev.jsonl").write_text("{}\n")
    assert E.resolve_benchmark("2wiki", tmp_path).name == "2wiki_dev.jsonl"
    with pytest.raises(UserError, match="unknown benchmark"):
        E.resolve_benchmark("squad", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        E.resolve_benchmark("popqa", tmp_path)


def test_shared_data_benchmarks_load(shared_data):
    data = E.load_datasets([], ["nq", "hotpotqa"], shared_data, limit=5)
    assert set(data) == {"nq", "hotpotqa"}
    assert all(len(ex) == 5 for _, ex in data.values())
    ids = [e.group_id for _, ex in data.values() for e in ex]
    assert len(set(ids)) == 10  # unique across datasets
    assert data["hotpotqa"][0].name.endswith(".flashrag.jsonl")


def _write_searchr1_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = [{"data_source": src, "prompt": [{"role": "user", "content": f"Question: {q}"}],
              "reward_model": {"ground_truth": {"target": golds}, "style": "rule"},
              "extra_info": {"index": i, "split": "test"}} for i, (src, q, golds) in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(table), path)
    return path


MERGED = [  # a merged Search-R1 test file: sources interleaved, extra_info.index shared
    ("nq", "What is the capital of France?", ["Paris"]),
    ("hotpotqa", "Who wrote Hamlet?", ["William Shakespeare"]),
    ("nq", "Which ocean is largest?", ["Pacific Ocean"]),
    ("hotpotqa", "Is France's capital Paris?", ["Paris"]),
    ("nq", "Which ocean is the largest one?", ["Pacific Ocean"]),
]


def test_merged_searchr1_parquet_is_scored_per_data_source(smol_tokenizer, tmp_path):
    path = _write_searchr1_parquet(tmp_path / "test.parquet", MERGED)
    data = E.load_datasets([f"test={path}"], [], None)
    assert list(data) == ["nq", "hotpotqa"]
    assert [e.question for e in data["hotpotqa"][1]] == ["Who wrote Hamlet?", "Is France's capital Paris?"]
    assert sorted(e.group_id for _, ex in data.values() for e in ex) == list(range(5))
    assert {n: len(ex) for n, (_, ex) in E.load_datasets([f"test={path}"], [], None, limit=1).items()} == {"nq": 1, "hotpotqa": 1}
    # a file with one data_source keeps the name it was given
    single = _write_searchr1_parquet(tmp_path / "one.parquet", MERGED[:1])
    assert list(E.load_datasets([f"mine={single}"], [], None)) == ["mine"]
    with pytest.raises(UserError, match="'nq' comes from both"):
        E.load_datasets([f"test={path}", f"nq={single}"], [], None)

    backend = ScriptedBackend(smol_tokenizer, ANSWERS, search_first=False)
    res = E.run_eval(data, None, smol_tokenizer, None, E.EvalOptions(method="direct", batch_size=4), tmp_path / "out",
                     "scripted", quiet=True, backend=backend)
    assert [r["dataset"] for r in res["rows"]] == ["nq"] * 3 + ["hotpotqa"] * 2
    assert [n for n, _ in backend.calls] == [4, 1]  # batches span datasets
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["datasets"]
    assert (m["nq"]["n"], m["nq"]["em"]) == (3, 1.0)
    assert (m["hotpotqa"]["n"], m["hotpotqa"]["em"]) == (2, 0.5)  # "Marlowe" is wrong
    assert m["average"]["em"] == pytest.approx(0.75)  # mean over sources, not over the 5 questions (0.8)
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "| NQ | HotpotQA | Avg |" in md and "| scripted | 100.0 | 50.0 | 75.0 |" in md


def test_dataset_spec_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        E.parse_dataset_spec(f"x={tmp_path / 'nope.jsonl'}")
    with pytest.raises(UserError, match="nothing to evaluate"):
        E.load_datasets([], [], None)
    with pytest.raises(UserError, match="method"):
        E.EvalOptions(method="oracle")


def test_eval_cli_end_to_end_on_saved_tiny_model(smol_tokenizer, tiny_model, tmp_path, capsys):
    from rexrag.cli import main
    from rexrag.retrieval import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\nParis fact number {i}.'}) + "\n"
                              for i in range(8)))
    build_index(corpus, "bm25", tmp_path / "idx")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": e.id, "question": e.question, "golden_answers": e.golden_answers}) + "\n"
                          for e in _examples()))
    tiny_model.save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    rc = main(["eval", "--backend", "hf", "--model", str(tmp_path / "model"), "--dataset", f"mine={qa}", "--index", str(tmp_path / "idx"),
               "--method", "rag", "--max-new-tokens", "4", "--out", str(tmp_path / "ev")])
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["datasets"]["mine"]["n"] == 3 and 0.0 <= m["datasets"]["mine"]["em"] <= 1.0
    assert "EM " in capsys.readouterr().out
    rc = main(["eval", "--backend", "hf", "--model", str(tmp_path / "model"), "--dataset", f"mine={qa}", "--method", "agent",
               "--out", str(tmp_path / "ev2")])
    assert rc == 2  # agent without a retriever: one-line user error
