"""The Search-R1-compatible server, run for real on loopback (uvicorn), and the HTTP client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from rexrag.retrieval import HTTPRetriever, Passage, RetrievalError, build_index, load_index
from rexrag.retrieval.server import create_app, server_config


class FakeRetriever:
    """Deterministic passages; records calls; optional delay to hold a request in flight."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[tuple[list[str], int]] = []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        time.sleep(self.delay)
        return [[Passage(f"{q}-{i}", f"T{i}", f"text {i}", float(k - i)) for i in range(k)] for q in queries]


@contextmanager
def running(app, **limits):
    """Serve ``app`` with uvicorn on a free loopback port in a thread, with ``rexrag serve``'s
    connection guards (``limits``: ``server_config`` keywords); yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, log_level="warning", lifespan="off", **limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(index: Path, *flags: str, env: dict | None = None, headers: dict | None = None):
    """`rexrag serve --index index *flags` as a separate process on a free loopback port; yields the
    base URL once /health answers 200 (with ``headers``), and stops the process afterwards."""
    with serve_process(index, *flags, env=env, headers=headers) as (url, _):
        yield url


@contextmanager
def serve_process(index: Path, *flags: str, env: dict | None = None, headers: dict | None = None):
    """As ``serve_subprocess``, yielding ``(base URL, Popen)``."""
    port = free_port()
    cmd = [sys.executable, "-m", "rexrag.cli", "serve", "--index", str(index), "--port", str(port),
           "--log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "rexrag serve did not come up"
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)


JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeRetriever()
    with running(create_app(fake, default_topk=3, max_topk=10, max_queries=4, max_body_bytes=2000)) as url:
        yield url, fake


# ----------------------------------------------------------------------------- the JSON contract


def test_response_shape_matches_search_r1(fake_server):
    url, _ = fake_server
    r = httpx.post(f"{url}/retrieve", json={"queries": ["a", "b"], "topk": 2, "return_scores": True})
    assert r.status_code == 200
    assert r.json() == {"result": [
        [{"document": {"id": f"{q}-{i}", "contents": f'"T{i}"\ntext {i}'}, "score": float(2 - i)} for i in range(2)]
        for q in ("a", "b")
    ]}
    # return_scores false: bare documents, as Search-R1's retrieval_server.py returns them
    r = httpx.post(f"{url}/retrieve", json={"queries": ["a"], "topk": 1, "return_scores": False})
    assert r.json() == {"result": [[{"id": "a-0", "contents": '"T0"\ntext 0'}]]}
    # defaults: topk -> server default (3), return_scores -> false (Search-R1's default)
    r = httpx.post(f"{url}/retrieve", json={"queries": ["c"]})
    assert len(r.json()["result"][0]) == 3 and "score" not in r.json()["result"][0][0]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


BAD_REQUESTS = [
    ({"topk": 3}, 422, "queries"),
    ({"queries": "who?"}, 422, "queries"),
    ({"queries": ["a", 3]}, 422, "queries[1]"),
    ({"queries": ["a"] * 5}, 422, "queries"),
    ({"queries": ["a"], "topk": "3"}, 422, "topk"),
    ({"queries": ["a"], "topk": True}, 422, "topk"),
    ({"queries": ["a"], "topk": 0}, 422, "topk"),
    ({"queries": ["a"], "topk": 11}, 422, "topk"),
    ({"queries": ["a"], "return_scores": "yes"}, 422, "return_scores"),
    (["a", "b"], 422, "body"),
]


@pytest.mark.parametrize("body, status, field", BAD_REQUESTS)
def test_bad_requests_get_4xx_naming_the_field(fake_server, body, status, field):
    url, fake = fake_server
    before = len(fake.calls)
    r = httpx.post(f"{url}/retrieve", json=body)
    assert r.status_code == status and r.json()["field"] == field and r.json()["detail"]
    assert len(fake.calls) == before  # never reached the retriever
    assert httpx.post(f"{url}/retrieve", json={"queries": ["ok"]}).status_code == 200  # still serving


def test_empty_batch_and_blank_queries_are_served(fake_server):
    """Search-R1 sends these at its defaults and its own server answers 200: so must ours."""
    url, fake = fake_server
    before = len(fake.calls)
    r = httpx.post(f"{url}/retrieve", json={"queries": []})
    assert r.status_code == 200 and r.json() == {"result": []}
    r = httpx.post(f"{url}/retrieve", json={"queries": ["a", "", " \t\n", "b"], "topk": 1})
    assert r.status_code == 200 and [len(row) for row in r.json()["result"]] == [1, 0, 0, 1]
    assert r.json()["result"][3][0]["id"] == "b-0"
    assert fake.calls[before:] == [(["a", "b"], 1)]  # blank queries never reach the retriever


def test_default_limits_admit_a_search_r1_batch():
    from rexrag.retrieval.server import MAX_BODY_BYTES, MAX_QUERIES

    assert MAX_QUERIES >= 4096 and MAX_BODY_BYTES >= MAX_QUERIES * (4096 + 4)


def test_malformed_and_oversized_bodies(fake_server):
    url, _ = fake_server
    r = httpx.post(f"{url}/retrieve", content=b"{not json", headers=JSON)
    assert r.status_code == 400 and r.json()["field"] == "body"
    big = json.dumps({"queries": ["x" * 3000]}).encode()
    r = httpx.post(f"{url}/retrieve", content=big, headers=JSON)
    assert r.status_code == 413 and r.json()["field"] == "body"
    r = httpx.post(f"{url}/retrieve", content=iter([big[:1500], big[1500:]]), headers=JSON)  # chunked
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert httpx.get(f"{url}/health").status_code == 200


def test_api_key_required_when_set():
    with running(create_app(FakeRetriever(), api_key="s3cret")) as url:
        assert httpx.post(f"{url}/retrieve", json={"queries": ["a"]}).status_code == 401
        wrong = httpx.post(f"{url}/retrieve", json={"queries": ["a"]}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.json()["field"] == "X-API-Key"
        ok = httpx.post(f"{url}/retrieve", json={"queries": ["a"]}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        assert HTTPRetriever(f"{url}/retrieve", api_key="s3cret").search(["a"], 1)[0][0].id == "a-0"


def test_concurrent_requests_are_served_in_parallel():
    """Retrieval runs off the event loop: two 1.5 s searches overlap, and /health answers meanwhile."""
    with running(create_app(FakeRetriever(delay=1.5))) as url:
        times: list[float] = []

        def call():
            start = time.perf_counter()
            assert httpx.post(f"{url}/retrieve", json={"queries": ["q"]}, timeout=30).status_code == 200
            times.append(time.perf_counter() - start)

        threads = [threading.Thread(target=call) for _ in range(2)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(0.3)
        health_start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        health_s = time.perf_counter() - health_start
        for t in threads:
            t.join()
        total = time.perf_counter() - start
    assert len(times) == 2 and total < 2.7  # serial would take >= 3.0 s
    assert health_s < 1.0


def test_internal_error_is_json_500_and_server_survives():
    class Broken:
        def search(self, queries, k):
            raise RuntimeError("disk gone")

    with running(create_app(Broken())) as url:
        r = httpx.post(f"{url}/retrieve", json={"queries": ["a"]})
        assert r.status_code == 500 and r.json()["detail"] and "disk gone" not in r.text  # internals stay in the log
        assert "RuntimeError" not in r.text
        assert httpx.get(f"{url}/health").status_code == 200


# ----------------------------------------------------------------------------- real index + client


@pytest.fixture(scope="module")
def bm25_index(tmp_path_factory, shared_data) -> Path:
    src = shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    corpus = tmp_path_factory.mktemp("srv") / "c.jsonl"
    with src.open() as fh:
        corpus.write_text("".join(next(fh) for _ in range(200)))
    return build_index(corpus, "bm25", corpus.parent / "bm25")


def test_http_retriever_against_real_bm25_server(bm25_index):
    local = load_index(bm25_index)
    queries = ["Canadian rock band song Counterparts", "Jeff Porcaro drummer Toto", "Carmine Appice"]
    with running(create_app(local)) as url:
        remote = HTTPRetriever(f"{url}/retrieve", timeout_s=10, retries=0)
        got, want = remote.search(queries, 3), local.search(queries, 3)
        remote.close()
    assert [[(p.id, p.title, p.text, p.contents) for p in row] for row in got] == [
        [(p.id, p.title, p.text, p.contents) for p in row] for row in want
    ]
    assert [p.score for row in got for p in row] == pytest.approx([p.score for row in want for p in row])


def test_http_retriever_retries_then_succeeds():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(json.loads(request.content))
        if len(attempts) < 3:
            return httpx.Response(503, text="busy")
        # a server answering bare documents (return_scores ignored) is parsed too
        return httpx.Response(200, json={"result": [[{"id": "7", "contents": '"Title"\nbody'}]]})

    r = HTTPRetriever("http://test/retrieve", retries=2, backoff_s=0.01, transport=httpx.MockTransport(handler))
    (row,) = r.search(["q"], 1)
    assert len(attempts) == 3 and attempts[0] == {"queries": ["q"], "topk": 1, "return_scores": True}
    assert row == [Passage.from_contents("7", '"Title"\nbody')]
    assert (row[0].title, row[0].text, row[0].contents) == ("Title", "body", '"Title"\nbody')


def test_http_retriever_bounded_retries_and_no_retry_on_4xx():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(503 if request.url.path == "/busy" else 422, json={"detail": "bad", "field": "topk"})

    busy = HTTPRetriever("http://t/busy", retries=1, backoff_s=0.01, transport=httpx.MockTransport(handler))
    with pytest.raises(RetrievalError, match="failed after 2 attempt"):
        busy.search(["q"], 3)
    assert len(calls) == 2
    calls.clear()
    bad = HTTPRetriever("http://t/bad", retries=3, backoff_s=0.01, transport=httpx.MockTransport(handler))
    with pytest.raises(RetrievalError, match="rejected the request: HTTP 422"):
        bad.search(["q"], 3)
    assert len(calls) == 1


def test_http_retriever_timeout_and_refused():
    with running(create_app(FakeRetriever(delay=2.0))) as url:
        slow = HTTPRetriever(f"{url}/retrieve", timeout_s=0.3, retries=0)
        with pytest.raises(RetrievalError, match="ReadTimeout") as info:
            slow.search(["q"], 1)
        # a timeout names the settings that fix it; a refused connection (below) does not
        assert "retrieval.timeout_s=0.3" in str(info.value) and "retrieval.deadline_s=60" in str(info.value)
    dead = HTTPRetriever(f"http://127.0.0.1:{free_port()}/retrieve", retries=1, backoff_s=0.01)
    with pytest.raises(RetrievalError, match="ConnectError") as info:
        dead.search(["q"], 1)
    assert "retrieval.timeout_s" not in str(info.value)


def test_serve_command_subprocess(bm25_index):
    """`rexrag serve` for real: a separate process, loopback, API key from an env var."""
    headers = {"X-API-Key": "k123"}
    with serve_subprocess(bm25_index, "--api-key-env", "REXRAG_TEST_KEY", "--max-topk", "5",
                          env={"REXRAG_TEST_KEY": "k123"}, headers=headers) as url:
        body = {"queries": ["Jeff Porcaro"], "topk": 2, "return_scores": True}
        r = httpx.post(f"{url}/retrieve", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["result"][0][0]["document"]["id"] == "hotpotqa-0"
        assert httpx.post(f"{url}/retrieve", json={**body, "topk": 6}, headers=headers).json()["field"] == "topk"
        assert httpx.post(f"{url}/retrieve", json=body).status_code == 401


def test_serve_command_rejects_empty_key_env(bm25_index, monkeypatch, capsys):
    from rexrag.cli import main

    monkeypatch.delenv("REXRAG_UNSET_KEY", raising=False)
    assert main(["serve", "--index", str(bm25_index), "--api-key-env", "REXRAG_UNSET_KEY"]) == 2
    assert "REXRAG_UNSET_KEY" in capsys.readouterr().err
