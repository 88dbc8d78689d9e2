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
queries at topk 3) fits the default limits of 4,096 queries, 12,288 results and 32 MiB of body.
A row may also hold fewer than ``topk`` passages (BM25 returns only passages that match).
``contents`` is the corpus line's own string, byte for byte.

Differences from Search-R1's server: requests are validated by hand so that every bad request is
a 4xx JSON ``{"detail": message, "field": name}`` (Search-R1 lets pydantic answer 422 for types),
including malformed JSON of any depth and numbers of any size; ``Content-Type: application/json``
is required (415 otherwise: a browser page cannot send it cross-origin without a preflight); the
body size, query count, query length, ``topk``, queries x topk and the number of JSON values are
bounded (all configurable); an optional API key header; a 500 says only that the search failed
(the traceback goes to the server log). Retrieval, parsing and JSON encoding run in a few worker
threads (``search_threads``), so the event loop keeps serving ``/health`` while batches are
searched, and memory is bounded by the limits rather than by the load.

Connections (``make_server``): a new connection must send its request head within ``timeout_read_s``
(so must a kept-alive one after its last response), and a body must arrive within the same time;
idle keep-alive connections close after ``timeout_keep_alive_s``; beyond ``max_connections`` open
sockets the longest-idle one is closed to admit the new one, so a flood of idle sockets cannot keep
``/health`` out; beyond ``max_concurrency`` requests in flight ``/retrieve`` answers 503 with
``Retry-After`` (uvicorn's own ``limit_concurrency`` counts idle connections too, so under such a
flood it would refuse ``/health`` as well). Access logging is off unless asked for (one line per
request); nothing is logged per connection.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import resource
from typing import Any

import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from rexrag.protocol import DEFAULT_TOPK
from rexrag.retrieval.base import Passage, Retriever

log = logging.getLogger(__name__)

# Defaults admit one Search-R1 GRPO batch per request (2,560 queries at topk 3) with room to spare;
# 32 MiB holds 4,096 queries of the 4,096-character maximum (ASCII, as JSON).
MAX_QUERIES = 4096
MAX_BODY_BYTES = 32 << 20
MAX_QUERY_CHARS = 4096
MAX_RESULTS = 3 * MAX_QUERIES  # queries x topk per request: every query at the default topk 3
MAX_CONCURRENCY = 64  # /retrieve requests in flight (reading, queued or searching); 503 beyond
SEARCH_THREADS = 4  # requests parsed + searched + encoded at once (the rest wait holding raw bytes)
MAX_CONNECTIONS = 1000  # open sockets; beyond, the longest-idle one is closed
TIMEOUT_KEEP_ALIVE_S = 5  # an idle kept-alive connection closes after this
TIMEOUT_READ_S = 10.0  # a request head (and, separately, a body) must arrive within this
MAX_HEAD_BYTES = 16 << 10  # h11's limit on a request line + headers (431/400 beyond)
_MAX_INT_DIGITS = 18  # longer JSON integers are never parsed into Python ints


class BadRequest(Exception):
    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > _MAX_INT_DIGITS or int(declared) > limit):
        raise BadRequest(413, "body", f"request body of {declared[:20]} bytes exceeds the limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadRequest(413, "body", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _LongInt:
    """A JSON integer too long to convert (Python refuses > 4,300 digits; we stop at 18)."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))


def _parse_int(text: str) -> int | _LongInt:
    return int(text) if len(text) <= _MAX_INT_DIGITS else _LongInt(text)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _count_values(raw: bytes, limit: int) -> int:
    """An upper bound on the JSON values in ``raw`` (each follows a comma, a bracket or a colon),
    counted outside strings once the quick count passes ``limit``. Bounds what parsing can
    allocate: ``[[],[],...]`` takes ~20x its size in Python objects."""

    def bound(b: bytes) -> int:
        return b.count(b",") + b.count(b"[") + b.count(b"{") + b.count(b":") + 1

    n = bound(raw)
    return n if n <= limit else bound(_JSON_STRING.sub(b'""', raw))  # commas inside queries don't count


def _load_json(raw: bytes, max_values: int) -> Any:
    n = _count_values(raw, max_values)
    if n > max_values:
        raise BadRequest(
            422,
            "body",
            f"body holds up to {n} JSON values; a request may hold {max_values} (one per query and a few fields)",
        )
    try:
        return json.loads(raw, parse_int=_parse_int, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            400, "body", f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise BadRequest(400, "body", "body is not UTF-8 JSON") from None
    except RecursionError:
        raise BadRequest(400, "body", "body nests lists or objects too deeply") from None
    except ValueError as exc:  # NaN / Infinity; anything else the decoder refuses
        raise BadRequest(400, "body", f"body is not valid JSON: {str(exc)[:80]}") from None


def _int_field(payload: dict, name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, _LongInt):
        raise BadRequest(422, name, f"'{name}' must be between {low} and {high}, got a {value.digits}-digit number")
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(422, name, f"'{name}' must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(422, name, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def parse_request(
    raw: bytes,
    *,
    default_topk: int,
    max_topk: int,
    max_queries: int,
    max_query_chars: int,
    max_results: int | None = None,
) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries, topk, return_scores); raises BadRequest naming the field."""
    payload = _load_json(raw, max_queries + 64)
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
        if not q.isascii():
            try:
                q.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(
                    422, f"queries[{i}]", "query holds a lone UTF-16 surrogate: not Unicode text"
                ) from None
    topk = _int_field(payload, "topk", default_topk, 1, max_topk)
    if max_results is not None and len(queries) * topk > max_results:
        raise BadRequest(
            422,
            "queries,topk",
            f"{len(queries)} queries x topk {topk} = {len(queries) * topk} "
            f"results exceed the limit of {max_results} per request; send fewer queries or a smaller topk",
        )
    scores = payload.get("return_scores", False)
    if scores is None:
        scores = False
    if not isinstance(scores, bool):
        raise BadRequest(422, "return_scores", f"'return_scores' must be true or false, got {type(scores).__name__}")
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


def _encode(obj: Any) -> bytes:
    """Bytes as Starlette's JSONResponse renders them (compact, UTF-8, no NaN)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode("utf-8")


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def create_app(
    retriever: Retriever,
    *,
    default_topk: int = DEFAULT_TOPK,
    max_topk: int = 100,
    max_queries: int = MAX_QUERIES,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_query_chars: int = MAX_QUERY_CHARS,
    max_results: int = MAX_RESULTS,
    max_concurrency: int = MAX_CONCURRENCY,
    search_threads: int = SEARCH_THREADS,
    timeout_read_s: float = TIMEOUT_READ_S,
    api_key: str | None = None,
    api_key_header: str = "X-API-Key",
) -> FastAPI:
    """The app serving ``retriever``; ``api_key`` set -> requests must send it in ``api_key_header``."""
    if not 1 <= default_topk <= max_topk:
        raise ValueError(f"default_topk={default_topk} must be within 1..max_topk={max_topk}")
    if min(max_results, max_concurrency, search_threads) < 1 or default_topk > max_results:
        raise ValueError("max_results, max_concurrency and search_threads must be >= 1, max_results >= default_topk")
    app = FastAPI(title="rexrag retrieval", docs_url=None, redoc_url=None, openapi_url=None)
    limits = {
        "default_topk": default_topk,
        "max_topk": max_topk,
        "max_queries": max_queries,
        "max_query_chars": max_query_chars,
        "max_results": max_results,
    }
    working = asyncio.Semaphore(search_threads)
    in_flight = 0

    def error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": message, "field": field}, status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if not api_key:
            return True
        sent = request.headers.get(api_key_header, "")
        return hmac.compare_digest(sent.encode(), api_key.encode())

    def answer(raw: bytes) -> bytes:  # in a worker thread
        queries, topk, scores = parse_request(raw, **limits)
        return _encode(format_results(search_rows(retriever, queries, topk), scores))

    @app.get("/health")
    async def health(request: Request):
        if not authorised(request):
            return error(401, api_key_header, f"missing or wrong {api_key_header} header")
        describe = getattr(retriever, "describe", None)
        return {"status": "ok", **(describe() if describe else {})}

    @app.post("/retrieve")
    async def retrieve(request: Request):
        nonlocal in_flight
        if in_flight >= max_concurrency:
            return error(
                503,
                "",
                f"server busy: {in_flight} requests in flight (limit {max_concurrency}); retry",
                headers={"Retry-After": "1"},
            )
        in_flight += 1
        try:
            if not authorised(request):
                return error(401, api_key_header, f"missing or wrong {api_key_header} header")
            if not _is_json(request.headers.get("content-type", "")):
                return error(415, "Content-Type", "send the body as JSON with 'Content-Type: application/json'")
            try:
                raw = await asyncio.wait_for(_read_body(request, max_body_bytes), timeout_read_s)
            except asyncio.TimeoutError:
                return error(408, "body", f"request body not received within {timeout_read_s:g} s")
            async with working:  # off the event loop, a few at a time: bounded memory, /health stays quick
                body = await run_in_threadpool(answer, raw)
            return Response(body, media_type="application/json")
        except BadRequest as exc:
            return error(exc.status, exc.field, exc.message)
        except ClientDisconnect:  # gone mid-body (or its request broke HTTP): nobody to answer
            return Response(status_code=400)
        except Exception:  # a retriever failure, not a bad request: details to the log, not the client
            log.exception("retrieval failed")
            return error(500, "", "retrieval failed on the server; its log has the details")
        finally:
            in_flight -= 1

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # anything else: no internals in the answer
        return error(500, "", "internal server error; the server log has the details")

    return app


# --------------------------------------------------------------------------- connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a cap on open connections.

    Configure with ``GuardedH11Protocol.configured(max_connections, timeout_read_s)`` (a subclass).
    """

    max_connections = MAX_CONNECTIONS
    timeout_read_s = TIMEOUT_READ_S
    _warned_at = -1e9  # last "connection limit" warning (per configured server: at most one a minute)

    @classmethod
    def configured(cls, max_connections: int, timeout_read_s: float) -> type[GuardedH11Protocol]:
        attrs = {"max_connections": max_connections, "timeout_read_s": timeout_read_s, "_warned_at": -1e9}
        return type(cls.__name__, (cls,), attrs)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._last_active = self.loop.time()
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._evict()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _evict(self) -> None:
        """Close the longest-idle other connection (or, when every one is busy, this new one)."""
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()]
        victim = min(idle, key=lambda c: c._last_active, default=self)
        victim.transport.close()
        now = self.loop.time()
        if now - type(self)._warned_at > 60:
            type(self)._warned_at = now
            self.logger.warning(
                "more than %d open connections: closing the longest-idle ones (warned once a minute)",
                self.max_connections,
            )

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.timeout_read_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()  # no request head in time: a silent or trickling client

    def data_received(self, data: bytes) -> None:
        self._last_active = self.loop.time()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived: the body has its own deadline in the app
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        self._last_active = self.loop.time()
        self._arm_head_timer()  # the next request head (if any) must come in time too
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A malformed request (bad chunk, bad header) while the app handles its head: the app's own
        answer would now break h11's state (uvicorn logs a traceback for it), so it is dropped; if
        the app has already answered, or begun to, the connection just closes."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's send() becomes a no-op, its receive() a disconnect
            cycle.message_event.set()
        if (cycle is not None and cycle.response_started) or self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        super().send_400_response(msg)


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_config(
    app,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int = MAX_CONNECTIONS,
    timeout_keep_alive_s: int = TIMEOUT_KEEP_ALIVE_S,
    timeout_read_s: float = TIMEOUT_READ_S,
    log_level: str = "info",
    access_log: bool = False,
    **uvicorn_kw: Any,
):
    """A ``uvicorn.Config`` with the connection guards above. Raises the soft file limit so that
    ``max_connections`` sockets fit; where the hard limit is lower, serves fewer (and says so)."""
    import uvicorn

    spare = 64  # the listening socket, index files, logs, worker threads
    soft = raise_fd_limit(max_connections + spare)
    if soft != resource.RLIM_INFINITY and soft < max_connections + spare:
        log.warning(
            "open-file limit %d: serving at most %d connections instead of %d",
            soft,
            max(1, soft - spare),
            max_connections,
        )
        max_connections = max(1, soft - spare)
    protocol = GuardedH11Protocol.configured(max_connections, timeout_read_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=timeout_keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        log_level=log_level,
        access_log=access_log,
        **uvicorn_kw,
    )
