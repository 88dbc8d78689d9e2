"""A thin FastAPI server speaking exactly Search-R1's ``/retrieve`` JSON.

Request: ``{"queries": [str, ...], "topk": 3, "return_scores": true}`` (``topk`` optional: the
server default; ``return_scores`` optional: false, as in Search-R1). Response:
``{"result": [[{"document": {"id": ..., "contents": "\\"Title\\"\\ntext"}, "score": s}, ...], ...]}``
with ``return_scores``; without it each item is the bare document ``{"id", "contents"}``, which
is what Search-R1's ``retrieval_server.py`` returns in that case (so clients written for it,
which read ``item["document"]["contents"]`` and always send ``return_scores: true``, work unchanged).

What Search-R1's clients send at their defaults is answered 200, as their own server does:
``{"queries": []}`` (a turn in which no rollout searched) -> ``{"result": []}``; an empty or
whitespace-only query (the model wrote ``<search> </search>``) -> an empty list in that row, the
other rows served normally; a whole GRPO batch in one request (512 prompts x 5 rollouts = 2,560
queries) fits the default limit of 4,096 queries and 32 MiB of body. A row may also hold fewer
than ``topk`` passages (BM25 returns only passages that match). ``contents`` is the corpus line's
own string, byte for byte.

Differences from Search-R1's server: requests are validated by hand so that every bad request is
a 4xx JSON ``{"detail": message, "field": name}`` (Search-R1 lets pydantic answer 422 for types);
the body size, query count, query length and ``topk`` are bounded (all configurable); an optional
API key header; retrieval runs in the thread pool, so the event loop keeps serving ``/health`` and
other requests while a batch is searched; ``GET /health``.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from rexrag.protocol import DEFAULT_TOPK
from rexrag.retrieval.base import Passage, Retriever

# Defaults admit one Search-R1 GRPO batch per request (2,560 queries) with room to spare; 32 MiB
# holds 4,096 queries of the 4,096-character maximum (ASCII, as JSON).
MAX_QUERIES = 4096
MAX_BODY_BYTES = 32 << 20
MAX_QUERY_CHARS = 4096


class BadRequest(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "body", f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, "body", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(raw: bytes, *, default_topk: int, max_topk: int, max_queries: int,
                  max_query_chars: int) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries, topk, return_scores); raises BadRequest naming the field."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, "body", f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(422, "body", "body must be a JSON object with 'queries'")
    queries = payload.get("queries")
    if queries is None:
        raise BadRequest(422, "queries", "field 'queries' is required (a list of strings)")
    if not isinstance(queries, list):
        raise BadRequest(422, "queries", f"'queries' must be a list of strings, got {type(queries).__name__}")
    if len(queries) > max_queries:
        raise BadRequest(422, "queries", f"{len(queries)} queries exceed the limit of {max_queries} per request")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise BadRequest(422, f"queries[{i}]", f"query must be a string, got {type(q).__name__}")
        if len(q) > max_query_chars:
            raise BadRequest(422, f"queries[{i}]", f"query longer than {max_query_chars} characters")
    topk = payload.get("topk")
    if topk is None:
        topk = default_topk
    elif not isinstance(topk, int) or isinstance(topk, bool):
        raise BadRequest(422, "topk", f"'topk' must be an integer, got {type(topk).__name__}")
    if not 1 <= topk <= max_topk:
        raise BadRequest(422, "topk", f"'topk' must be between 1 and {max_topk}, got {topk}")
    scores = payload.get("return_scores", False)
    if scores is None:
        scores = False
    if not isinstance(scores, bool):
        raise BadRequest(422, "return_scores", f"'return_scores' must be true or false, got {scores!r}")
    return queries, topk, scores


def search_rows(retriever: Retriever, queries: list[str], topk: int) -> list[list[Passage]]:
    """``retriever.search`` over the non-blank queries; a blank query's row is empty (the retriever
    never sees it: a tokenizer or encoder has nothing to work on, and one blank query must not
    cost the whole batch its answer)."""
    asked = [i for i, q in enumerate(queries) if q.strip()]
    rows: list[list[Passage]] = [[] for _ in queries]
    if not asked:
        return rows
    found = retriever.search([queries[i] for i in asked], topk)
    if len(found) != len(asked):
        raise RuntimeError(f"retriever returned {len(found)} result lists for {len(asked)} queries")
    for i, row in zip(asked, found):
        rows[i] = list(row)
    return rows


def format_results(results: list[list[Passage]], return_scores: bool) -> dict[str, Any]:
    """Search-R1's response shape (see module docstring)."""
    out = []
    for row in results:
        docs = [{"id": p.id, "contents": p.contents} for p in row]
        out.append([{"document": d, "score": p.score} for d, p in zip(docs, row)] if return_scores else docs)
    return {"result": out}


def create_app(retriever: Retriever, *, default_topk: int = DEFAULT_TOPK, max_topk: int = 100, max_queries: int = MAX_QUERIES,
               max_body_bytes: int = MAX_BODY_BYTES, max_query_chars: int = MAX_QUERY_CHARS,
               api_key: str | None = None, api_key_header: str = "X-API-Key") -> FastAPI:
    """The app serving ``retriever``; ``api_key`` set -> requests must send it in ``api_key_header``."""
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"default_topk={default_topk} must be within 1..max_topk={max_topk}")
    app = FastAPI(title="rexrag retrieval", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, field: str, message: str) -> JSONResponse:
        return JSONResponse({"detail": message, "field": field}, status_code=status)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        sent = request.headers.get(api_key_header, "")
        return hmac.compare_digest(sent.encode(), api_key.encode())

    @app.get("/health")
    async def health(request: Request):
        if not authorised(request):
            return error(401, api_key_header, f"missing or wrong {api_key_header} header")
        describe = getattr(retriever, "describe", None)
        return {"status": "ok", **(describe() if describe else {})}

    @app.post("/retrieve")
    async def retrieve(request: Request):
        if not authorised(request):
            return error(401, api_key_header, f"missing or wrong {api_key_header} header")
        try:
            raw = await _read_body(request, max_body_bytes)
            queries, topk, scores = parse_request(raw, default_topk=default_topk, max_topk=max_topk,
                                                  max_queries=max_queries, max_query_chars=max_query_chars)
        except BadRequest as exc:
            return error(exc.status, exc.field, exc.message)
        # Off the event loop: a long batch must not block other requests.
        results = await run_in_threadpool(search_rows, retriever, queries, topk)
        return JSONResponse(format_results(results, scores))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a retriever failure, not a bad request
        return error(500, "", f"retrieval failed: {type(exc).__name__}: {exc}")

    return app
