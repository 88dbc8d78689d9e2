"""Failure policy (issue 13): one retry layer, in the HTTP client (bounded attempts, back-off, a total
deadline, only retryable failures), no retries in the agent, a stop after ``max_failed_turns`` failed
retrieval turns in a row, and a user's bugs propagating instead of becoming notices.
Every server here is on loopback and every test is bounded in time."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from _rollout_fakes import ScriptedBackend
from fake_tokenizer import FakeTokenizer

from rexrag.config import RolloutConfig, load_config
from rexrag.data import QAExample
from rexrag.errors import ConfigError, RetrievalError, RetrievalUnavailableError
from rexrag.protocol import NOTICES
from rexrag.retrieval import HTTPRetriever, load_retriever
from rexrag.rollout.agent import SearchAgent


def _mock(statuses: list[int], headers: dict | None = None):
    """A transport answering ``statuses`` in turn (then 200 with one passage); records the calls."""
    calls = []

    def handler(request):
        calls.append(time.monotonic())
        if len(calls) <= len(statuses):
            return httpx.Response(statuses[len(calls) - 1], text="trouble", headers=headers or {})
        return httpx.Response(200, json={"result": [[{"document": {"id": "1", "contents": "T\nbody"}, "score": 1.0}]]})

    return httpx.MockTransport(handler), calls


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_are_retried(status):
    transport, calls = _mock([status, status])
    r = HTTPRetriever("http://t/retrieve", retries=2, backoff_s=0.01, transport=transport)
    assert r.search(["q"], 1)[0][0].id == "1" and len(calls) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 413, 415, 422, 500, 501])
def test_client_errors_and_500_are_not_retried(status):
    transport, calls = _mock([status] * 5)
    r = HTTPRetriever("http://t/retrieve", retries=4, backoff_s=0.01, transport=transport)
    with pytest.raises(RetrievalError, match=f"HTTP {status}"):
        r.search(["q"], 1)
    assert len(calls) == 1


def test_retry_after_is_honoured_within_the_deadline():
    transport, calls = _mock([503], headers={"Retry-After": "0.2"})
    r = HTTPRetriever("http://t/retrieve", retries=1, backoff_s=0.01, transport=transport)
    r.search(["q"], 1)
    assert calls[1] - calls[0] >= 0.19
    transport, calls = _mock([503] * 3, headers={"Retry-After": "3600"})  # would blow the deadline: give up now
    r = HTTPRetriever("http://t/retrieve", retries=3, backoff_s=0.01, deadline_s=2.0, transport=transport)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError, match=r"failed after 1 attempt\(s\): HTTP 503.*deadline_s=2"):
        r.search(["q"], 1)
    assert time.monotonic() - t0 < 1.0 and len(calls) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hung_server_is_bounded_by_the_deadline():
    """A server that accepts connections and never answers: every attempt times out; the whole call
    ends within ``deadline_s`` (each attempt's timeout is cut to the time left)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/retrieve"
        r = HTTPRetriever(url, timeout_s=0.4, retries=10, backoff_s=0.05, deadline_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(RetrievalError, match="ReadTimeout"):
            r.search(["q"], 1)
        assert time.monotonic() - t0 < 1.5


def test_dead_server_fails_fast_and_stops_training_after_max_failed_turns():
    url = f"http://127.0.0.1:{_free_port()}/retrieve"
    r = HTTPRetriever(url, retries=2, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError, match=r"failed after 3 attempt\(s\): ConnectError"):
        r.search(["q"], 1)
    assert time.monotonic() - t0 < 2.0
    # the agent: notices for the first failed turns, then an error naming the retriever and its last error
    tok = FakeTokenizer()
    script = {"Q": ["<search> a </search>", "<search> b </search>", "<search> c </search>", "<answer> x </answer>"]}
    cfg = RolloutConfig(max_turns=5, max_new_tokens_per_turn=100, max_total_tokens=2000, template="Q: {question}\n")
    agent = SearchAgent(ScriptedBackend(tok, script), tok, r, cfg, max_failed_turns=2)
    with pytest.raises(RetrievalUnavailableError, match=rf"2 consecutive turns.*HTTPRetriever\({url}\).*ConnectError"):
        agent.rollout([QAExample(id="0", question="Q", golden_answers=["x"], group_id=0)])
    assert time.monotonic() - t0 < 6.0


def test_failure_policy_config():
    cfg = load_config(None, ["retrieval.url=http://127.0.0.1:9/retrieve", "retrieval.retries=1", "retrieval.deadline_s=5"])
    r = load_retriever(cfg.retrieval)
    assert (r.retries, r.deadline_s, cfg.retrieval.max_failed_turns) == (1, 5.0, 3)
    for bad in ("retrieval.max_failed_turns=-1", "retrieval.deadline_s=0", "retrieval.retries=-1"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_a_user_retriever_bug_reaches_the_caller_not_a_notice():
    class Mine:
        def search(self, queries, k):
            raise TypeError("my bug")

    tok = FakeTokenizer()
    cfg = RolloutConfig(max_turns=2, max_new_tokens_per_turn=100, max_total_tokens=2000, template="Q: {question}\n")
    agent = SearchAgent(ScriptedBackend(tok, {"Q": ["<search> a </search>", "<answer> x </answer>"]}), tok, Mine(), cfg)
    with pytest.raises(TypeError, match="my bug"):
        agent.rollout([QAExample(id="0", question="Q", golden_answers=["x"], group_id=0)])
    assert NOTICES["retrieval_failed"]  # (the notice exists, and is kept for RetrievalError only)
