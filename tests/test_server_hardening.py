"""The retrieval server under abuse (loopback only): hostile bodies, absurd numbers, slow and idle
connections, a connection flood, unique-word floods against memory, and a seeded fuzz run."""

from __future__ import annotations

import json
import logging
import random
import resource
import socket
import string
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server import FakeRetriever, running, serve_process

from rexrag.retrieval import build_index, load_index
from rexrag.retrieval.server import create_app, raise_fd_limit

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fake_server():
    with running(
        create_app(FakeRetriever(), max_topk=10, max_queries=8, max_results=12, max_body_bytes=64000),
        timeout_read_s=2.0,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory, shared_data) -> Path:
    src = shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    corpus = tmp_path_factory.mktemp("hard") / "c.jsonl"
    with src.open() as fh:
        corpus.write_text("".join(next(fh) for _ in range(200)))
    return build_index(corpus, "bm25", corpus.parent / "bm25")


@pytest.fixture(scope="module")
def ivf_index(bm25_index) -> Path:
    """A compressed dense index (IVF, MiniLM) over the same 200 passages: the new index kinds get the same abuse."""
    corpus = bm25_index.parent / "c.jsonl"
    return build_index(corpus, "dense", corpus.parent / "ivf", index_type="ivf_flat", nlist=8)


class Captured(logging.Handler):
    """Records of the root and ``uvicorn`` loggers (uvicorn's do not propagate to the root, so
    pytest's caplog would miss them). Enter it after the server started: uvicorn's logging set-up
    replaces the handlers of its loggers."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for name in ("", "uvicorn"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("", "uvicorn"):
            logging.getLogger(name).removeHandler(self)

    def tracebacks(self) -> list[str]:
        return [f"{r.getMessage()}: {r.exc_info[0].__name__}: {r.exc_info[1]}" for r in self.records if r.exc_info]


def post_raw(url: str, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(f"{url}/retrieve", content=body, headers=headers, timeout=10)


# ----------------------------------------------------------------------------- bodies and numbers


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"],
)
def test_json_content_type_is_required(fake_server, content_type):
    r = post_raw(fake_server, b'{"queries": ["a"]}', content_type)
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"
    assert post_raw(fake_server, b'{"queries": ["a"]}', "Application/JSON; charset=utf-8").status_code == 200


HOSTILE = [
    ('{"queries": ["a"], "topk": ' + "9" * 5000 + "}", 422, "topk"),
    ('{"queries": ["a"], "topk": -' + "9" * 5000 + "}", 422, "topk"),
    ('{"queries": ["a"], "topk": -3}', 422, "topk"),
    ('{"queries": ["a"], "topk": 2.0}', 422, "topk"),
    ('{"queries": ["a"], "topk": 1e999}', 422, "topk"),
    ('{"queries": ["a"], "topk": [3]}', 422, "topk"),
    ('{"queries": ["a"], "topk": {"n": 3}}', 422, "topk"),
    ('{"queries": ["a"], "topk": false}', 422, "topk"),
    ('{"queries": ["a"], "topk": NaN}', 400, "body"),
    ('{"queries": ["a"], "topk": Infinity}', 400, "body"),
    ('{"queries": [' + "1" * 6000 + "]}", 422, "queries[0]"),
    ('{"queries": [["a"]]}', 422, "queries[0]"),
    ('{"queries": ' + "[" * 50 + "]" * 50 + "}", 422, "queries[0]"),
    ("[" * 3000, 422, "body"),  # more values than a request may hold (the decoder never sees it)
    ('{"queries": ["a"], "return_scores": ' + "1" * 5000 + "}", 422, "return_scores"),
    ('{"queries": ["a", "b", "c", "d", "e"], "topk": 3}', 422, "queries,topk"),  # 15 results > 12
    ('{"queries": "a"}', 422, "queries"),
    ('{"queries": ["a", "\\ud800"]}', 422, "queries[1]"),  # a lone surrogate: not Unicode text
    ("\ufeff{}", 422, "queries"),
    ("", 400, "body"),
]


@pytest.mark.parametrize("body, status, field", HOSTILE)
def test_hostile_bodies_are_4xx_naming_the_field(fake_server, body, status, field):
    r = post_raw(fake_server, body.encode("utf-8", "surrogatepass"))
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["field"] == field and r.json()["detail"]
        assert "Traceback" not in r.text and "Error" not in r.text  # no exception names or internals
        assert len(r.text) < 400
    assert httpx.get(f"{fake_server}/health").status_code == 200


@pytest.mark.parametrize(
    "body, field",
    [
        ("[" * 3000, "body"),
        ('{"queries": ' + "[" * 3000 + "]}", "body"),
        ('{"queries": [], "topk": ' + "9" * 100000 + "}", "topk"),
    ],
)
def test_parser_depth_and_digits_are_400_or_422(body, field):
    """Straight to the parser at a query limit that lets the body through the value count."""
    from rexrag.retrieval.server import BadRequest, parse_request

    with pytest.raises(BadRequest) as info:
        parse_request(body.encode(), default_topk=3, max_topk=10, max_queries=5000, max_query_chars=100)
    assert info.value.status in (400, 422) and info.value.field == field


def test_results_cap_names_both_fields_and_admits_what_fits(fake_server):
    r = post_raw(fake_server, json.dumps({"queries": ["a"] * 4, "topk": 3}).encode())
    assert r.status_code == 200 and [len(row) for row in r.json()["result"]] == [3] * 4
    r = post_raw(fake_server, json.dumps({"queries": ["a"] * 7, "topk": 2}).encode())
    assert r.status_code == 422 and r.json()["field"] == "queries,topk" and "14" in r.json()["detail"]


def test_concurrency_cap_answers_503_and_health_still_answers():
    with running(create_app(FakeRetriever(delay=1.0), max_concurrency=2)) as url:
        answers: list[tuple[int, str]] = []

        def call():
            r = httpx.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=30)
            answers.append((r.status_code, r.headers.get("retry-after", "")))

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # both in flight
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert time.perf_counter() - start < 1.0
        call()  # the third: refused at once
        for t in threads:
            t.join()
    assert sorted(answers) == [(200, ""), (200, ""), (503, "1")]


# ----------------------------------------------------------------------------- connections


def _recv_all(sock: socket.socket, deadline_s: float) -> bytes:
    sock.settimeout(deadline_s)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def test_silent_trickling_and_slow_body_connections_are_closed():
    with running(create_app(FakeRetriever(), timeout_read_s=0.5), timeout_read_s=0.5) as url, Captured() as logs:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as gone:  # leaves halfway through its body
            gone.sendall(
                b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"que'
            )
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        slow_body = socket.create_connection(("127.0.0.1", port))
        start = time.perf_counter()
        trickle.sendall(b"GET /hea")
        slow_body.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"queries"'
        )
        assert _recv_all(silent, 3) == b""  # closed without a word
        assert _recv_all(trickle, 3) == b""
        answer = _recv_all(slow_body, 3)
        assert answer.startswith(b"HTTP/1.1 408") and b'"field":"body"' in answer
        assert time.perf_counter() - start < 2.5
        for s in (silent, trickle, slow_body):
            s.close()
        # a kept-alive connection may idle for timeout_keep_alive, then it is closed too
        with httpx.Client() as client:
            assert client.get(f"{url}/health").status_code == 200
            assert client.get(f"{url}/health").status_code == 200
    assert not logs.tracebacks() and not [r for r in logs.records if r.levelno >= logging.WARNING]


def test_health_answers_within_a_second_under_an_idle_connection_flood():
    """A few thousand idle loopback sockets (beyond max_connections): /health still answers quickly,
    the server logs a line or two and no traceback, and serves normally afterwards."""
    soft = raise_fd_limit(8000)
    flood = min(3000, (soft - 300) // 2) if soft != resource.RLIM_INFINITY else 3000
    if flood < 500:
        pytest.skip(f"open-file limit {soft} leaves too few descriptors for a flood")
    # one client, a new connection per request: the latency is the server's, not httpx's set-up (an
    # SSL context per httpx.get costs ~0.1 s), and no pooled keep-alive socket joins the flood
    fresh = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=5)
    with running(create_app(FakeRetriever()), max_connections=256, timeout_read_s=30) as url, Captured() as logs, fresh:
        port = int(url.rsplit(":", 1)[1])
        socks: list[socket.socket] = []
        latencies = []
        start = time.perf_counter()
        try:
            for i in range(flood):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                socks.append(s)
                if i % 1000 == 999:
                    t = time.perf_counter()
                    assert fresh.get(f"{url}/health").status_code == 200
                    latencies.append(time.perf_counter() - t)
            time.sleep(0.5)  # let the server accept the rest
            for _ in range(5):
                t = time.perf_counter()
                assert fresh.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - t)
            r = httpx.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=5)
            assert r.status_code == 200
        finally:
            for s in socks:
                s.close()
        assert max(latencies) < 1.0, latencies
        assert time.perf_counter() - start < 20
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    assert not logs.tracebacks()
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "closing the longest-idle" in warnings[0]  # evicted, and said so once


# ----------------------------------------------------------------------------- memory


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _unique_words_request(rng: random.Random, queries: int = 64, chars: int = 4000) -> dict:
    """~256 KB of words no corpus holds (``q`` + 14 hex digits each)."""
    return {
        "queries": [" ".join(f"q{rng.getrandbits(56):014x}" for _ in range(chars // 16)) for _ in range(queries)],
        "topk": 3,
        "return_scores": True,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_server_memory_stays_bounded_under_unique_words(bm25_index):
    """Words never seen before: bm25s' own tokenizer would cache each for good (~10x the request size,
    ~35 MB here); 15 requests of 256 KB of them grow the server by well under that. The flags of
    `rexrag serve` apply."""
    rng = random.Random(0)
    flags = ("--max-results", "300", "--max-concurrency", "8", "--timeout-read", "5", "--max-connections", "100")
    with serve_process(bm25_index, *flags) as (url, proc), httpx.Client(timeout=60) as client:
        for _ in range(3):  # warm-up: first-use allocations, thread pool
            assert client.post(f"{url}/retrieve", json=_unique_words_request(rng)).status_code == 200
        before = _rss_mb(proc.pid)
        for _ in range(15):
            r = client.post(f"{url}/retrieve", json=_unique_words_request(rng))
            assert r.status_code == 200 and r.json()["result"] == [[]] * 64
        growth = _rss_mb(proc.pid) - before
        known = client.post(f"{url}/retrieve", json={"queries": ["Jeff Porcaro"], "topk": 2})
        assert known.json()["result"][0][0]["id"] == "hotpotqa-0"  # known words still found
        over = client.post(f"{url}/retrieve", json={"queries": ["a"] * 101, "topk": 3})
        assert over.status_code == 422 and over.json()["field"] == "queries,topk"
        assert client.post(f"{url}/retrieve", content=b'{"queries": []}').status_code == 415
    assert growth < 12, f"server RSS grew {growth:.1f} MB over 3.8 MB of unique query words"


def test_serve_warns_when_binding_beyond_loopback_without_a_key(tmp_path, capsys):
    from rexrag.cli import main

    assert main(["serve", "--index", str(tmp_path / "none"), "--host", "0.0.0.0"]) == 2  # fails at the index
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path / "none"), "--host", "127.0.0.1"]) == 2
    assert "without an API key" not in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path / "none"), "--max-concurrency", "0"]) == 2
    assert "--max-concurrency must be positive" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fuzz


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 6 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 3, 2**31, -(2**63), 10 ** rng.randrange(1, 60)])
    if kind == 2:
        return rng.choice([0.5, -1e308, 1e-308, 3.0, float("1e300") * 10])
    if kind in (3, 4, 5):
        alphabet = string.printable + "\x00\u00e9\u2028\ud7ff\U0001f600"
        return "".join(rng.choices(alphabet, k=rng.choice([0, 1, 5, 40, 5000])))
    if kind in (6, 7):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["queries", "topk", "return_scores", "x"]): _random_json(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def _hostile_body(rng: random.Random) -> tuple[bytes, str | None]:
    """One generated hostile request: (body, content type)."""
    kind = rng.randrange(8)
    ctype = "application/json" if rng.random() < 0.85 else rng.choice([None, "text/plain", "application/json;x"])
    if kind == 0:  # well-formed shape, hostile values
        body = {"queries": _random_json(rng), "topk": _random_json(rng), "return_scores": _random_json(rng)}
        text = json.dumps(body, allow_nan=True)
    elif kind == 1:  # valid queries, odd topk text
        topk = rng.choice(["9" * rng.randrange(10, 6000), "-0", "1e5", "0x10", "3.", "-" + "9" * 30, "true", '"3"'])
        text = '{"queries": ["rock band", "drummer"], "topk": ' + topk + "}"
    elif kind == 2:  # deep nesting, balanced or not
        d = rng.randrange(100, 50000)
        text = rng.choice(["[", '{"a":', '{"queries":[']) * d + rng.choice(["", "]" * d, "1"])
    elif kind == 3:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))), ctype
    elif kind == 4:  # a valid request cut short or spliced
        text = json.dumps({"queries": ["Jeff Porcaro", "Toto"], "topk": 2})
        cut = rng.randrange(len(text))
        text = text[:cut] + rng.choice(["", "\x00", "}", "]]]", "\\", '"'])
    elif kind == 5:  # many tiny values
        text = "[" + ",".join(["[]"] * rng.randrange(4000, 20000)) + "]"
    elif kind == 6:  # too many queries or too long ones
        text = json.dumps({"queries": ["x" * rng.choice([10, 5000])] * rng.choice([1, 300]), "topk": 3})
    else:  # arbitrary JSON at the top
        text = json.dumps(_random_json(rng), allow_nan=True)
    return text.encode("utf-8", "surrogatepass"), ctype


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
    b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n[[[[[",
    b"DELETE /retrieve HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /retrieve?queries=a HTTP/1.1\r\nHost: x\r\n\r\n",
]


def _raw_status(port: int, request: bytes) -> int | None:
    """Send ``request`` on a fresh socket; the status code of the answer, or None if it just closed."""
    head = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(request)
            while b"\r\n" not in head and (chunk := s.recv(4096)):
                head += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize("kind, budget_s", [("bm25_index", 20), ("ivf_index", 90)])
def test_fuzz_hostile_requests_get_no_5xx(kind, budget_s, request):
    """300 seeded hostile requests against a real BM25 server, and a compressed dense (IVF) one, at small
    limits: never a 5xx, never a traceback, never exception text in an answer; /health answers after every
    batch of 50 (a dense server encodes every query, hence its larger time budget)."""
    rng = random.Random(13)
    index = request.getfixturevalue(kind)
    app = create_app(load_index(index), max_topk=20, max_queries=64, max_results=256, max_body_bytes=1 << 20)
    seen: dict[int, int] = {}
    with running(app, timeout_read_s=3) as url, Captured() as logs, httpx.Client(timeout=15) as client:
        port = int(url.rsplit(":", 1)[1])
        start = time.perf_counter()
        for batch in range(6):
            for _ in range(50):
                body, ctype = _hostile_body(rng)
                r = client.post(f"{url}/retrieve", content=body, headers={"Content-Type": ctype} if ctype else {})
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
                if r.status_code != 200:
                    assert "Traceback" not in r.text and "Error:" not in r.text and r.json()["field"] is not None
            status = _raw_status(port, RAW_REQUESTS[batch % len(RAW_REQUESTS)])
            assert status is None or status < 500
            assert client.get(f"{url}/health").status_code == 200, f"server down after batch {batch}"
        for raw in RAW_REQUESTS:
            status = _raw_status(port, raw)
            assert status is None or status < 500, raw[:60]
        assert client.post(f"{url}/retrieve", json={"queries": ["Jeff Porcaro"], "topk": 1}).status_code == 200
        assert time.perf_counter() - start < budget_s
    assert seen.get(200, 0) > 0 and sum(n for code, n in seen.items() if 400 <= code < 500) > 150
    assert not logs.tracebacks()
