"""Conformance with the retrieval clients of Search-R1 and verl, against a real `rexrag serve`.

Written from their documented request/response behaviour (our own code, not theirs):

* Search-R1's trainer (``search_r1/llm_agent/generation.py``) POSTs ``{"queries": [...], "topk": k,
  "return_scores": true}`` to ``/retrieve`` once per turn, with every search of the batch in it
  (none: ``[]``; a ``<search> </search>``: ``""``; a whole GRPO batch: 512 x 5 = 2,560 queries), and
  reads ``resp.json()["result"]``: per query a list of ``{"document": {"id", "contents"}, "score"}``.
  Its ``_passages2string`` splits ``contents`` on the first newline (title = the first line as it
  is, text = the rest) into ``Doc i(Title: title) text\\n`` and the agent ``strip()``s the block.
* verl's search tool (``verl/tools/utils/search_r1_like_utils.py``) sends the same body with JSON
  ``Content-Type`` / ``Accept`` headers and a timeout, raises on 4xx, and reads
  ``.json().get("result", [])`` with the same first-newline split.
* Search-R1's own server returns bare documents when ``return_scores`` is false, and its BM25
  backend sends documents as ``{"title", "text", "contents"}`` without an ``id``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Optional

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from rexrag.data import load_corpus
from rexrag.retrieval import BM25Retriever, HTTPRetriever, build_index, format_information, load_index
from test_server import running, serve_subprocess

# Titles and line ends that a rebuild of '"Title"\ntext' would change; each row has its own rare words.
TRICKY = {
    "quote": '"I Cannot Say "Farewell""\nA ballad recorded by the Zanzibar Quintet in 1994.',
    "unquoted": "Unquoted Heading\nThe xylophone orchestra of Qwerton tours every spring.",
    "no-newline": "A passage without any newline about the marmalade lighthouse of Brixham",
    "crlf": '"Carriage Return"\r\nA windows line ending story about a narwhal.\r\n',
    "unicode": '"Café “Zoë”"\nÜber die Straße: ein Kapitel über Quokkas und Wombats.',
    "spaces": '  "Padded"  \nTrailing blanks near the albatross harbour.   ',
}
QUERY = {
    "quote": "Zanzibar Quintet ballad", "unquoted": "xylophone orchestra Qwerton",
    "no-newline": "marmalade lighthouse Brixham", "crlf": "narwhal windows", "unicode": "Quokkas Wombats",
    "spaces": "albatross harbour",
}
FILLER = [f'"Topic {i}"\nFiller passage {i} about rivers, mountains and old stone bridges.' for i in range(30)]
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


# ----------------------------------------------------------------------------- the two client flows


def post_like_requests(url: str, payload: dict, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    """POST ``payload`` encoded as ``requests.post(url, json=payload)`` encodes it (ASCII-escaped JSON)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(url, content=json.dumps(payload).encode(), headers=headers, timeout=timeout)


def search_r1_batch_search(url: str, queries: list[str], topk: int = 3) -> list:
    """Search-R1's trainer: one POST, no status check, ``["result"]`` (a KeyError on any error body)."""
    return post_like_requests(url, {"queries": queries, "topk": topk, "return_scores": True}).json()["result"]


def search_r1_passages2string(row: list) -> str:
    """Search-R1's rendering of one result row (before the agent strips it into <information>)."""
    out = ""
    for i, item in enumerate(row, 1):
        title, _, text = item["document"]["contents"].partition("\n")
        out += f"Doc {i}(Title: {title}) {text}\n"
    return out


def verl_search(url: str, queries: list[str], topk: int = 3) -> list:
    """verl's ``call_search_api``: JSON headers, a timeout, HTTP errors raised, ``.get("result", [])``."""
    resp = post_like_requests(url, {"queries": queries, "topk": topk, "return_scores": True}, JSON_HEADERS, 30)
    resp.raise_for_status()
    return resp.json().get("result", [])


def verl_passages2string(row: list) -> str:
    out = ""
    for i, item in enumerate(row, 1):
        title, _, text = item["document"]["contents"].partition("\n")
        out += f"Doc {i} (Title: {title})\n{text}\n\n"
    return out.strip()


# ----------------------------------------------------------------------------- a real `rexrag serve`


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conf") / "corpus.jsonl"
    rows = [{"id": k, "contents": c} for k, c in TRICKY.items()]
    rows += [{"id": f"f{i}", "contents": c} for i, c in enumerate(FILLER)]
    rows.append({"id": "tt", "title": "Title Text Row", "text": "Stored as title and text about a pelican."})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def index(corpus) -> Path:
    return build_index(corpus, "bm25", corpus.parent / "bm25")


@pytest.fixture(scope="module")
def server(index):
    """`rexrag serve` at its default limits: the point is that Search-R1's defaults fit them."""
    with serve_subprocess(index) as url:
        yield f"{url}/retrieve"


@pytest.fixture(scope="module")
def local(index):
    return load_index(index)


def _corpus_contents(corpus: Path) -> dict[str, str]:
    out = {}
    for line in corpus.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[row["id"]] = row.get("contents", f'"{row.get("title")}"\n{row.get("text")}')
    return out


def test_search_r1_flow_scores_and_verbatim_contents(server, corpus, local):
    stored = _corpus_contents(corpus)
    keys = list(QUERY)
    result = search_r1_batch_search(server, [QUERY[k] for k in keys], topk=3)
    assert len(result) == len(keys)
    for key, row in zip(keys, result):
        assert 1 <= len(row) <= 3
        assert all(set(item) == {"document", "score"} and isinstance(item["score"], float) for item in row)
        assert all(item["score"] > 0 for item in row)  # BM25: only passages that match
        assert [item["score"] for item in row] == sorted((item["score"] for item in row), reverse=True)
        top = row[0]["document"]
        assert top["id"] == key and top["contents"] == stored[key]  # byte for byte, tricky title or not
        assert top["contents"].encode("utf-8") == stored[key].encode("utf-8")
        for item in row:
            assert item["document"]["contents"] == stored[item["document"]["id"]]
    # What the Search-R1 model reads is what our own agent shows it for the same passages.
    for key, row in zip(keys, result):
        assert search_r1_passages2string(row).strip() == format_information(local.search([QUERY[key]], 3)[0])


def test_return_scores_false_gives_bare_documents(server, corpus):
    stored = _corpus_contents(corpus)
    r = post_like_requests(server, {"queries": [QUERY["quote"], QUERY["crlf"]], "topk": 2, "return_scores": False})
    assert r.status_code == 200
    rows = r.json()["result"]
    assert [row[0]["id"] for row in rows] == ["quote", "crlf"]
    for row in rows:
        for doc in row:
            assert set(doc) == {"id", "contents"} and doc["contents"] == stored[doc["id"]]
    # return_scores left out: Search-R1's default (false), and the server's default topk (3)
    r = post_like_requests(server, {"queries": [QUERY["unicode"]]})
    assert r.status_code == 200 and "score" not in r.json()["result"][0][0]


def test_title_text_rows_are_served_in_search_r1_form(server):
    (row,) = search_r1_batch_search(server, ["pelican"], topk=1)
    assert row[0]["document"] == {"id": "tt", "contents": '"Title Text Row"\nStored as title and text about a pelican.'}


def test_no_search_in_a_turn_empty_queries(server):
    assert search_r1_batch_search(server, []) == []
    assert verl_search(server, []) == []
    r = post_like_requests(server, {"queries": [], "topk": 3, "return_scores": True})
    assert r.status_code == 200 and r.json() == {"result": []}


def test_blank_query_gets_an_empty_row_and_others_are_served(server):
    queries = ["", QUERY["quote"], "   ", "\t\n", QUERY["unquoted"]]
    result = search_r1_batch_search(server, queries)
    assert [len(row) > 0 for row in result] == [False, True, False, False, True]
    assert result[1][0]["document"]["id"] == "quote" and result[4][0]["document"]["id"] == "unquoted"
    assert search_r1_passages2string(result[0]) == ""  # Search-R1 shows <information></information>
    assert [len(row) > 0 for row in verl_search(server, queries)] == [False, True, False, False, True]


def test_no_zero_score_padding(server):
    """pyserini returns nothing when no term matches; neither do we (and a row may be short)."""
    result = search_r1_batch_search(server, ["zzyzx qqqqv", "the of and", "Brixham"], topk=5)
    assert result[0] == [] and result[1] == []  # unknown words; stop words only
    assert [item["document"]["id"] for item in result[2]] == ["no-newline"]


def test_a_whole_grpo_batch_in_one_request(server, local):
    """512 prompts x 5 rollouts = 2,560 queries in one request, blank ones among them."""
    distinct = [*QUERY.values(), "rivers mountains", "stone bridges 17", "", "Topic 3 filler"]
    queries = [distinct[i % len(distinct)] for i in range(2560)]
    result = search_r1_batch_search(server, queries)
    assert len(result) == 2560
    want = {q: [p.id for p in local.search([q], 3)[0]] if q.strip() else [] for q in distinct}
    assert all([item["document"]["id"] for item in row] == want[q] for q, row in zip(queries, result))
    assert len(verl_search(server, queries)) == 2560


def test_default_query_limit_is_4096(server):
    ok = post_like_requests(server, {"queries": ["rivers"] * 4096, "topk": 1, "return_scores": True})
    assert ok.status_code == 200 and len(ok.json()["result"]) == 4096
    over = post_like_requests(server, {"queries": ["rivers"] * 4097, "topk": 1})
    assert over.status_code == 422 and over.json()["field"] == "queries"


def test_http_retriever_against_rexrag_serve(server, corpus, local):
    stored = _corpus_contents(corpus)
    client = HTTPRetriever(server, timeout_s=30, retries=0)
    try:
        rows = client.search([QUERY[k] for k in TRICKY], 3)
    finally:
        client.close()
    for key, row in zip(TRICKY, rows):
        assert row[0].id == key and row[0].contents == stored[key]
        assert [(p.id, p.contents) for p in row] == [(p.id, p.contents) for p in local.search([QUERY[key]], 3)[0]]


# ----------------------------------------------------------------------------- our client, their server


class QueryRequest(BaseModel):
    queries: list[str]
    topk: Optional[int] = None
    return_scores: bool = False


def search_r1_like_app(docs: list[str], seen: list[dict]) -> FastAPI:
    """Answers as Search-R1's BM25 server does: pydantic request, documents ``{"title", "text",
    "contents"}`` (no ``id``), ``{"document", "score"}`` items with return_scores, rows that may be
    short or empty. Matching is a plain word overlap: the shape is what is under test."""
    app = FastAPI()

    def hits(query: str, k: int) -> list[tuple[str, float]]:
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(c, float(len(words & set(re.findall(r"\w+", c.lower()))))) for c in docs]
        return sorted([h for h in scored if h[1] > 0], key=lambda h: -h[1])[:k]

    @app.post("/retrieve")
    def retrieve(request: QueryRequest):
        seen.append(request.model_dump())
        rows = []
        for q in request.queries:
            found = [({"title": c.split("\n")[0].strip('"'), "text": c.partition("\n")[2], "contents": c}, s)
                     for c, s in hits(q, request.topk or 3)]
            rows.append([{"document": d, "score": s} for d, s in found] if request.return_scores else [d for d, _ in found])
        return {"result": rows}

    return app


def test_http_retriever_against_a_search_r1_style_server():
    docs = list(TRICKY.values())
    seen: list[dict] = []
    with running(search_r1_like_app(docs, seen)) as url:
        client = HTTPRetriever(f"{url}/retrieve", timeout_s=10, retries=0)
        rows = client.search(["zanzibar quintet", "nothing-matches-this", "narwhal"], 2)
        assert client.search([], 2) == []
        client.close()
    assert seen == [{"queries": ["zanzibar quintet", "nothing-matches-this", "narwhal"], "topk": 2,
                     "return_scores": True}]
    assert [len(row) for row in rows] == [1, 0, 1]
    (quote,), (crlf,) = rows[0], rows[2]
    assert (quote.id, quote.contents, quote.score) == ("", TRICKY["quote"], 2.0)  # no id field: ""
    assert quote.title == 'I Cannot Say "Farewell"' and crlf.contents == TRICKY["crlf"]
    assert format_information(rows[0]) == search_r1_passages2string(
        [{"document": {"contents": TRICKY["quote"]}}]).strip()
    assert format_information(rows[1]) == ""


# ----------------------------------------------------------------------------- our own consumers


def test_agent_copes_with_short_and_empty_rows(corpus):
    """Our agent shows an empty <information></information> for a search that found nothing, and
    a short row as it is; the rollout goes on to the answer."""
    from _rollout_fakes import ScriptedBackend
    from fake_tokenizer import FakeTokenizer
    from rexrag.config import RolloutConfig
    from rexrag.data import QAExample
    from rexrag.protocol import INFO_CLOSE, INFO_OPEN
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.trajectory import Seg

    tok = FakeTokenizer()
    ascii_rows = [p for p in load_corpus(corpus) if p.contents.isascii()]
    retriever = BM25Retriever.from_passages(ascii_rows)
    script = {"Q?": ["<search> zzyzx </search>", "<search> Brixham </search>", "<answer> x </answer>"]}
    cfg = RolloutConfig(max_turns=3, max_new_tokens_per_turn=200, max_obs_tokens=500, max_total_tokens=4000)
    agent = SearchAgent(ScriptedBackend(tok, script), tok, retriever, cfg, topk=3)
    (t,) = agent.rollout([QAExample(id="0", question="Q?", golden_answers=["x"], group_id=0)])
    runs = itertools.groupby(zip(t.segments, t.token_ids), key=lambda st: st[0])
    infos = [tok.decode([tid for _, tid in run]) for seg, run in runs if seg == Seg.INFO]
    assert infos == [INFO_OPEN + INFO_CLOSE,
                     INFO_OPEN + format_information(retriever.search(["Brixham"], 3)[0]) + INFO_CLOSE]
    assert "(Title: A passage without any newline" in infos[1]
    assert (t.stop_reason, t.answer, t.n_searches) == ("answer", "x", 2)
