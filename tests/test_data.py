"""QA and corpus loaders: real shared files, and hand-made bad files that must fail precisely."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rexrag.data import QAExample, assign_group_ids, load_corpus, load_qa, load_qa_files, split_contents
from rexrag.errors import DataError

# ----------------------------------------------------------------------------- real files


def test_flashrag_jsonl_real(shared_data):
    path = shared_data / "nq" / "nq_test_1000.flashrag.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    exs = load_qa(path)
    assert len(exs) == len(rows) == 1000 and exs.skipped == []
    assert all(isinstance(e, QAExample) for e in exs)
    assert [e.id for e in exs] == [r["id"] for r in rows]
    assert exs[3].golden_answers == rows[3]["golden_answers"]
    assert [e.group_id for e in exs] == list(range(1000))


def test_flashrag_metadata_kept(shared_data):
    exs = load_qa(shared_data / "derived" / "hotpotqa_dev_ctx.flashrag.jsonl", limit=5)
    assert len(exs) == 5
    assert exs[0].data_source == "hotpotqa"  # from metadata.dataset
    assert exs[0].metadata["supporting_doc_ids"]


def test_searchr1_parquet_real(shared_data):
    path = shared_data / "nq" / "nq_open_test_3610.searchr1.parquet"
    table = pq.read_table(path).to_pylist()
    exs = load_qa(path)
    assert len(exs) == len(table)
    assert exs[0].question == table[0]["question"]
    assert exs[0].golden_answers == table[0]["reward_model"]["ground_truth"]["target"]
    assert exs[0].data_source == "nq" and exs[0].metadata["index"] == table[0]["extra_info"]["index"]


def test_parquet_question_from_prompt_and_string_ground_truth(shared_data):
    # Agentic-RAG's MuSiQue parquet: ground_truth is a bare string, question in extra_info/prompt.
    exs = load_qa(shared_data / "training" / "musique_train_19938.agenticrag.parquet", limit=3)
    assert exs[0].question == "When was the institute that owned The Collegian founded?"
    assert exs[0].golden_answers == ["1960"] and exs[0].id == "train_0"


def test_question_extracted_from_searchr1_prompt(tmp_path):
    content = "Answer ... For example, <answer> Beijing </answer>. Question: who wrote hamlet?\n"
    prompt = [{"role": "user", "content": content}]
    rows = [{"data_source": "nq", "prompt": prompt, "reward_model": {"ground_truth": {"target": ["Shakespeare"]}},
             "extra_info": {"index": 7, "split": "test"}}]
    path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (ex,) = load_qa(path)
    assert ex.question == "who wrote hamlet?" and ex.id == "test_7" and ex.golden_answers == ["Shakespeare"]


def test_merged_files_reuse_index_but_not_group_ids(tmp_path):
    # Search-R1's merged files reuse extra_info.index across sources; groups must stay distinct.
    def write(name, source):
        rows = [{"question": f"{source} q{i}", "data_source": source, "prompt": [],
                 "reward_model": {"ground_truth": {"target": ["a"]}}, "extra_info": {"index": i, "split": "train"}}
                for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
        return tmp_path / name

    exs = load_qa_files([write("nq.parquet", "nq"), write("hotpot.parquet", "hotpotqa")])
    assert [e.metadata["index"] for e in exs] == [0, 1, 2, 0, 1, 2]
    assert [e.group_id for e in exs] == list(range(6))
    assign_group_ids(exs, start=100)
    assert exs[0].group_id == 100 and exs[-1].group_id == 105


def test_load_corpus_real(shared_data):
    path = shared_data / "corpus" / "wiki18_sample_1000.flashrag.jsonl"
    first = json.loads(path.open().readline())
    passages = load_corpus(path)
    assert len(passages) == 1000
    assert passages[0].id == first["id"] and passages[0].contents == first["contents"]


def test_corpus_title_text_and_contents(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": 1, "title": "T", "text": "body"}) + "\n\n"
                    + json.dumps({"id": "x", "contents": '"Paris"\nCapital of France.\nMore.'}) + "\n")
    a, b = load_corpus(path)
    assert (a.id, a.title, a.text) == ("1", "T", "body")
    assert (b.title, b.text) == ("Paris", "Capital of France.\nMore.")
    assert split_contents("no title line") == ("", "no title line")


def test_corpus_contents_kept_verbatim(tmp_path):
    """``contents`` comes back byte for byte; the split title loses only one pair of quotes."""
    rows = ['"I Cannot Say "Farewell""\nA song.', "Unquoted title\nbody", "no newline at all", '"CRLF"\r\nbody\r\n']
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in enumerate(rows)))
    passages = load_corpus(path)
    assert [p.contents for p in passages] == rows
    assert [p.title for p in passages] == ['I Cannot Say "Farewell"', "Unquoted title", "", "CRLF"]
    assert [p.text for p in passages] == ["A song.", "body", "no newline at all", "body\r\n"]


# ----------------------------------------------------------------------------- bad files

GOOD_QA = {"id": "q1", "question": "who?", "golden_answers": ["x"]}


@pytest.mark.parametrize(
    "bad_line, field",
    [
        ("{not json", "malformed JSON"),
        (json.dumps({"id": "q2", "golden_answers": ["x"]}), "'question': missing"),
        (json.dumps({"id": "q2", "question": 5, "golden_answers": ["x"]}), "'question': expected str"),
        (json.dumps({"id": "q2", "question": "  ", "golden_answers": ["x"]}), "'question': empty"),
        (json.dumps({"id": "q2", "question": "q"}), "'golden_answers': missing"),
        (json.dumps({"id": "q2", "question": "q", "golden_answers": [1]}), "'golden_answers[0]'"),
        (json.dumps({"id": "q2", "question": "q", "golden_answers": {"a": 1}}), "'golden_answers': expected"),
        (json.dumps({"question": "q", "golden_answers": ["x"]}), "'id': missing"),
        (json.dumps(["a", "list"]), "expected a JSON object"),
    ],
)
def test_bad_qa_line_names_file_line_field(tmp_path, bad_line, field):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(GOOD_QA) + "\n" + bad_line + "\n" + json.dumps(GOOD_QA) + "\n")
    with pytest.raises(DataError) as err:
        load_qa(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and field in str(err.value)
    exs = load_qa(path, skip_bad=True)
    assert len(exs) == 2 and len(exs.skipped) == 1 and "line 2" in exs.skipped[0]


def test_bad_parquet_row_names_row_and_field(tmp_path):
    rows = [{"question": "ok?", "reward_model": {"ground_truth": {"target": ["a"]}}},
            {"question": "bad?", "reward_model": {"ground_truth": {"target": None}}}]
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'reward_model\.ground_truth\.target': missing"):
        load_qa(path)
    assert len(load_qa(path, skip_bad=True)) == 1


def test_bad_corpus_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "1", "contents": '"A"\ntext'}) + "\n"
                    + json.dumps({"id": "2", "title": "B"}) + "\n"
                    + json.dumps({"id": "3", "contents": 7}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:line 2: field 'text': missing"):
        load_corpus(path)
    out = load_corpus(path, skip_bad=True)
    assert [p.id for p in out] == ["1"] and len(out.skipped) == 2 and "line 3" in out.skipped[1]


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_qa(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown QA file type"):
        load_qa(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no QA examples"):
        load_qa(tmp_path / "empty.jsonl")


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "bytes.jsonl"
    bad = b'{"id": "2", "question": "\xff?", "golden_answers": ["x"]}\n'
    path.write_bytes(json.dumps(GOOD_QA).encode() + b"\n" + bad)
    with pytest.raises(DataError, match=r"bytes\.jsonl:line 2: not UTF-8"):
        load_qa(path)
    assert [e.id for e in load_qa(path, skip_bad=True)] == ["q1"]
