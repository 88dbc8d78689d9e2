"""Retrieval library: bm25s vs rank_bm25, dense MiniLM Flat/HNSW, index dirs (manifest, atomic build,
mismatch errors), load_retriever, format_information and the `rexrag index` command."""

from __future__ import annotations

import os
import json
from pathlib import Path

import numpy as np
import pytest

from rexrag.cli import main as cli_main
from rexrag.config import ConfigError, RetrievalConfig
from rexrag.data import load_corpus, load_qa
from rexrag.errors import DataError, IndexMismatchError, UserError
from rexrag.retrieval import (
    BM25Retriever,
    DenseRetriever,
    HTTPRetriever,
    Passage,
    Retriever,
    build_index,
    format_information,
    load_index,
    load_retriever,
    read_manifest,
    register_index_kind,
)
from rexrag.retrieval import index as index_mod
from rexrag.retrieval.index import file_sha256, get_index_kind


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shared_data) -> Path:
    """The first 50 passages of the real multi-hop corpus (HotpotQA paragraphs)."""
    src = shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    out = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with src.open() as fh:
        out.write_text("".join(next(fh) for _ in range(50)))
    return out


@pytest.fixture(scope="module")
def bm25_dir(small_corpus, tmp_path_factory) -> Path:
    return build_index(small_corpus, "bm25", tmp_path_factory.mktemp("idx") / "bm25")


# ----------------------------------------------------------------------------- BM25


def test_bm25s_matches_rank_bm25(shared_data):
    """Same ranking as the reference rank_bm25 on real passages and questions (robertson variant:
    rank_bm25's BM25Okapi scores are bm25s' times (k1 + 1))."""
    from rank_bm25 import BM25Okapi

    passages = load_corpus(shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl")[:400]
    questions = [e.question for e in load_qa(shared_data / "derived" / "hotpotqa_dev_ctx.flashrag.jsonl", limit=30)]
    ours = BM25Retriever.from_passages(passages, method="robertson", k1=1.5, b=0.75)
    tok = ours.tokenizer
    ref = BM25Okapi(tok.tokenize([p.contents for p in passages], update_vocab=False, return_as="string",
                                 show_progress=False), k1=1.5, b=0.75)
    q_tokens = tok.tokenize(questions, update_vocab=False, return_as="string", show_progress=False)
    for q, row in zip(q_tokens, ours.search(questions, 3)):
        scores = ref.get_scores(q)
        top = np.argsort(-scores, kind="stable")[:3]
        assert [passages[i].id for i in top] == [p.id for p in row]
        np.testing.assert_allclose([p.score * 2.5 for p in row], scores[top], rtol=1e-4)


def test_bm25_stemming_and_stopwords_configurable():
    passages = [Passage("a", "Runner", "She was running fast."), Passage("b", "Other", "the the the cat")]
    stemmed = BM25Retriever.from_passages(passages, stemmer="english")
    plain = BM25Retriever.from_passages(passages, stemmer=None, stopwords=None)
    assert stemmed.search(["runs"], 1)[0][0].id == "a" and stemmed.search(["runs"], 1)[0][0].score > 0
    assert plain.search(["runs"], 1) == [[]]  # no stemming: "runs" != "running", so nothing matches
    assert plain.search(["the"], 1)[0][0].id == "b" and plain.search(["the"], 1)[0][0].score > 0
    assert stemmed.search(["the"], 1) == [[]]  # stop word removed: an empty query matches nothing
    with pytest.raises(UserError, match="unknown stemmer"):
        BM25Retriever.from_passages(passages, stemmer="klingon")


def test_bm25_query_tokens_match_bm25s_and_never_grow_the_vocabulary(bm25_dir, small_corpus):
    """Queries map to the ids bm25s' own tokenizer gives the corpus words (unknown words dropped), and
    searching unseen words leaves the tokenizer's dictionaries as they were (bm25s caches them)."""
    import random

    from rexrag.retrieval.bm25 import query_token_ids

    r = load_index(bm25_dir)
    words = " ".join(p.contents for p in load_corpus(small_corpus)).split()
    rng = random.Random(0)
    queries = [" ".join(rng.sample(words, 6)) + f" zq{i}xv runnings the" for i in range(40)] + ["", "the of"]
    reference = load_index(bm25_dir).tokenizer  # a second, fresh copy of the same vocabulary
    want = reference.tokenize(queries, update_vocab=False, return_as="ids", show_progress=False)
    known = r.model.unique_token_ids_set - {r.tokenizer.word_to_id.get("")}  # bm25s' "no words" marker
    assert query_token_ids(r.tokenizer, queries) == [[t for t in q if t in known] for q in want]
    sizes = [len(d) for d in (r.tokenizer.word_to_id, r.tokenizer.word_to_stem, r.tokenizer.stem_to_sid)]
    unseen = [" ".join(f"w{rng.getrandbits(40):x}ing" for _ in range(200)) for _ in range(20)]
    assert r.search(unseen, 3) == [[]] * 20
    assert r.search(queries[:3], 3) == [r.search([q], 3)[0] for q in queries[:3]]
    assert [len(d) for d in (r.tokenizer.word_to_id, r.tokenizer.word_to_stem, r.tokenizer.stem_to_sid)] == sizes
    assert len(reference.word_to_stem) > sizes[1]  # what bm25s itself would have kept


def test_bm25_index_dir_roundtrip(bm25_dir, small_corpus):
    r = load_index(bm25_dir, expect_kind="bm25")
    assert isinstance(r, BM25Retriever) and isinstance(r, Retriever)
    m = read_manifest(bm25_dir)
    assert m["kind"] == "bm25" and m["passages"] == 50 and m["corpus"]["sha256"] == file_sha256(small_corpus)
    assert m["params"]["stemmer"] == "english" and "bm25s" in m["versions"]
    corpus = load_corpus(small_corpus)
    hit = r.search([corpus[7].title + " " + corpus[7].text[:80]], 3)[0]
    assert hit[0].id == corpus[7].id and hit[0].text == corpus[7].text and hit[0].score > hit[1].score
    wide = r.search(["band song album drummer rock film"], 100)[0]  # k larger than the corpus is clamped
    assert 3 < len(wide) <= 50 and all(p.score > 0 for p in wide)
    assert r.search([], 3) == []


# ----------------------------------------------------------------------------- index dirs


def test_manifest_mismatch_and_missing(bm25_dir, tmp_path):
    with pytest.raises(IndexMismatchError, match="is a 'bm25' index, but 'dense'"):
        load_index(bm25_dir, expect_kind="dense")
    with pytest.raises(IndexMismatchError, match="built with model 'bm25s-lucene'"):
        load_index(bm25_dir, expect_model="e5-base-v2")
    (tmp_path / "half").mkdir()
    with pytest.raises(IndexMismatchError, match="no manifest.json"):
        load_index(tmp_path / "half")
    with pytest.raises(IndexMismatchError, match="does not exist"):
        load_index(tmp_path / "nothing")
    with pytest.raises(UserError, match="already exists"):
        build_index(bm25_dir.parent / "x.jsonl", "bm25", bm25_dir)
    with pytest.raises(UserError, match=r"unknown index kind 'colbert'; choose one of \['bm25', 'dense'"):
        build_index(bm25_dir, "colbert", tmp_path / "o")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_index_kind("bm25", lambda *a, **k: {}, lambda *a: None)


def test_atomic_build_failure_leaves_nothing(small_corpus, tmp_path, monkeypatch):
    """A build that dies after the backend wrote its files (before the manifest) leaves no directory."""
    out = tmp_path / "idx" / "bm25"

    def boom(path):
        raise KeyboardInterrupt  # as if the user hit Ctrl-C right before the manifest

    monkeypatch.setattr(index_mod, "file_sha256", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(small_corpus, "bm25", out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_build_in_progress_is_never_loadable(small_corpus, tmp_path, monkeypatch):
    """While the backend is building (a kill at this instant leaves exactly this state), neither the
    target nor the temp dir loads."""
    out = tmp_path / "bm25"
    real = get_index_kind("bm25")
    seen = {}

    def spying_build(passages, tmp, **params):
        info = real.build(passages, tmp, **params)
        seen["tmp"] = tmp
        assert not out.exists()
        with pytest.raises(IndexMismatchError, match="no manifest.json"):
            load_index(tmp)
        return info

    monkeypatch.setitem(index_mod._KINDS._items, "bm25", index_mod.IndexKind("bm25", spying_build, real.load))
    build_index(small_corpus, "bm25", out)
    assert load_index(out).search(["drummer"], 1)[0]
    assert not seen["tmp"].exists()


def test_overwrite_swaps_in_new_index(small_corpus, tmp_path):
    out = build_index(small_corpus, "bm25", tmp_path / "i")
    build_index(small_corpus, "bm25", out, overwrite=True, stemmer=None)
    assert read_manifest(out)["params"]["stemmer"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["i"]


def test_next_build_removes_what_killed_builds_left(small_corpus, tmp_path):
    """A kill -9 mid-build leaves ``.NAME.building-*`` (and mid-swap ``.NAME.old-*``) behind; the next
    build of the same directory deletes them, but not a build whose process is still running."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = [tmp_path / f".i.building-{int(dead.stdout)}-0badc0de", tmp_path / ".i.building-1a2b3c4d",
             tmp_path / ".i.old-5e6f7a8b"]
    live = tmp_path / f".i.building-{os.getpid()}-feedbeef"  # this process: a build in progress
    other = tmp_path / ".j.building-1a2b3c4d"  # another index's leftovers are not ours to judge
    for d in [*stale, live, other]:
        d.mkdir()
        (d / "passages.jsonl").write_text("half\n")
    build_index(small_corpus, "bm25", tmp_path / "i")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["i", live.name, other.name])
    assert load_index(tmp_path / "i").search(["drummer"], 1)[0]


def test_duplicate_passage_ids_name_both_lines(tmp_path):
    rows = [{"id": "a", "contents": "alpha"}, {"id": 7, "contents": "seven"}, {"id": "b", "contents": "beta"},
            {"id": "7", "title": "Seven again", "text": "as a string id"}, {"id": "a", "contents": "alpha again"}]
    corpus = tmp_path / "dup.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    with pytest.raises(DataError, match=r"dup.jsonl: passage id '7' appears twice: line 2 and line 5"):
        build_index(corpus, "bm25", tmp_path / "i")
    assert list(tmp_path.iterdir()) == [corpus]  # nothing left behind
    corpus.write_text("".join(json.dumps({"id": i, "contents": f"passage {i}"}) + "\n" for i in range(2000)))
    assert read_manifest(build_index(corpus, "bm25", tmp_path / "i"))["passages"] == 2000


# ----------------------------------------------------------------------------- dense


@pytest.fixture(scope="module")
def dense_corpus(small_corpus, tmp_path_factory) -> Path:
    """30 passages: MiniLM encodes ~40 passages/s on 2 idle cores; keep the fast tier fast."""
    out = tmp_path_factory.mktemp("dense") / "c30.jsonl"
    out.write_text("".join(small_corpus.read_text().splitlines(keepends=True)[:30]))
    return out


@pytest.fixture(scope="module")
def dense_dirs(dense_corpus):
    import torch

    # One torch thread: on a 2-core machine shared with other jobs, tiny ops otherwise wait on a
    # descheduled second thread (measured: 2-7x slower encoding); restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = dense_corpus.parent
    try:
        flat = build_index(dense_corpus, "dense", root / "flat", index_type="flat")
        hnsw = build_index(dense_corpus, "dense", root / "hnsw", index_type="hnsw", query_prefix="query: ",
                           passage_prefix="")
        yield flat, hnsw
    finally:
        torch.set_num_threads(threads)


def test_dense_flat_and_hnsw(dense_dirs, dense_corpus):
    small_corpus = dense_corpus
    flat_dir, hnsw_dir = dense_dirs
    flat, hnsw = load_index(flat_dir, expect_kind="dense"), load_index(hnsw_dir, expect_model="all-MiniLM-L6-v2")
    assert isinstance(flat, DenseRetriever) and type(flat.index).__name__ == "IndexFlatIP"
    assert type(hnsw.index).__name__ == "IndexHNSWFlat" and hnsw.query_prefix == "query: "
    assert not (flat_dir / "embeddings.npy").exists()  # the memmap is dropped once faiss holds the vectors
    corpus = load_corpus(small_corpus)
    res = flat.search([corpus[3].contents, "Jeff Porcaro Toto drummer"], 5)
    assert res[0][0].id == corpus[3].id and res[0][0].score == pytest.approx(1.0, abs=1e-4)  # normalised
    assert all(a.score >= b.score for a, b in zip(res[1], res[1][1:]))
    # On 30 passages HNSW finds the exact neighbours (prefix aside, same embeddings family).
    plain_hnsw = DenseRetriever(flat.encoder, hnsw.index, hnsw.passages)
    assert [p.id for p in plain_hnsw.search(["Jeff Porcaro Toto drummer"], 3)[0]] == [p.id for p in res[1][:3]]
    m = read_manifest(hnsw_dir)
    assert m["params"]["index_type"] == "hnsw" and m["params"]["dim"] == 384 and m["model"] == "all-MiniLM-L6-v2"


def test_encode_to_memmap_unit_rows(tmp_path):
    from rexrag.retrieval.dense import encode_to_memmap, load_encoder

    passages = [Passage(str(i), f"T{i}", f"text number {i}") for i in range(5)]
    mm = encode_to_memmap(load_encoder("all-MiniLM-L6-v2"), passages, tmp_path / "e.npy", chunk=2)
    assert mm.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "e.npy"), axis=1), 1.0, rtol=1e-5)


def test_dense_bad_index_type(small_corpus, tmp_path):
    with pytest.raises(UserError, match=r"unknown dense index type 'ivf'; choose one of \['flat', 'hnsw', 'sq8', .*'hnsw_sq8'\] or pass a faiss factory string"):
        build_index(small_corpus, "dense", tmp_path / "d", index_type="ivf")
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- helpers and CLI


def test_load_retriever_dispatch(bm25_dir):
    assert isinstance(load_retriever(RetrievalConfig(index=str(bm25_dir))), BM25Retriever)
    http = load_retriever(RetrievalConfig(url="http://127.0.0.1:9/retrieve", retries=0))
    assert isinstance(http, HTTPRetriever) and http.url.endswith("/retrieve")
    with pytest.raises(ConfigError, match="retrieval.index"):
        load_retriever(RetrievalConfig())


def test_format_information_is_search_r1_style():
    text = format_information([Passage("1", "Paris", "Capital of France.", 2.0), Passage("2", "Rome", "Italy.")])
    assert text == 'Doc 1(Title: "Paris") Capital of France.\nDoc 2(Title: "Rome") Italy.'
    assert format_information([]) == ""  # BM25 found nothing: <information></information>, as in Search-R1
    # From the stored contents, split on the first newline as Search-R1 splits it.
    tricky = [Passage.from_contents("a", '"I Cannot Say "Farewell""\nA song.'), Passage.from_contents("b", "no newline"),
              Passage.from_contents("c", 'Unquoted\r\nline one\nline two')]
    assert format_information(tricky) == ('Doc 1(Title: "I Cannot Say "Farewell"") A song.\nDoc 2(Title: no newline) '
                                          '\nDoc 3(Title: Unquoted\r) line one\nline two')


def test_index_command(tmp_path, small_corpus, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(small_corpus.read_text() + '{"id": "bad", "title": 3}\n')
    out = tmp_path / "idx"
    assert cli_main(["index", "--corpus", str(corpus), "--kind", "bm25", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 51" in err and "'title'" in err and not out.exists()
    assert cli_main(["index", "--corpus", str(corpus), "--kind", "bm25", "--out", str(out), "--skip-bad"]) == 0
    assert "50 passages" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passages"] == 50 and manifest["skipped_rows"] == 1


def test_bm25s_import_keeps_jax_off_the_gpu(monkeypatch):
    """bm25s imports JAX when installed; JAX would preallocate 75% of each GPU (seen: OOM on an H200)."""
    from rexrag.retrieval.bm25 import _bm25s

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert _bm25s().__name__ == "bm25s"
    assert os.environ["JAX_PLATFORMS"] == "cpu" and os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
