"""Client for any Search-R1-compatible ``POST /retrieve`` endpoint (ours or Search-R1's own).

This client is the one retry layer of the project (the agent does not retry). One request per
``search`` batch; a failed attempt is retried only when retrying can help: connection errors,
timeouts and HTTP 429 / 502 / 503 / 504 (a ``Retry-After`` header is honoured). Any other 4xx, a 500
or a 501 means the request or the server is wrong and fails at once. Attempts are bounded
(``retries + 1``), spaced by exponential back-off (``backoff_s * 2**i``), and all of them together
stay within ``deadline_s``: each attempt's timeout is cut to the time left. Every failure is a
``RetrievalError`` naming the URL and the last cause. Search-R1's clients call ``requests.post`` once
with no timeout or retry; a stalled retriever would hang training there.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from rexrag.errors import RetrievalError
from rexrag.retrieval.base import Passage

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


def _passage(item: Any) -> Passage:
    """One result item: ``{"document": {...}, "score": s}`` (return_scores) or a bare document.

    ``contents`` is kept verbatim (the prompt shows it as Search-R1 would); ``id`` is optional
    because Search-R1's BM25 server sends documents as ``{"title", "text", "contents"}`` only.
    """
    if not isinstance(item, dict):
        raise RetrievalError(f"result item is {type(item).__name__}, expected an object")
    doc, score = (item["document"], item.get("score", 0.0)) if "document" in item else (item, 0.0)
    if not isinstance(doc, dict):
        raise RetrievalError("result 'document' is not an object")
    pid = str(doc.get("id", ""))
    if isinstance(doc.get("contents"), str):
        return Passage.from_contents(pid, doc["contents"], float(score or 0.0))
    if not isinstance(doc.get("title", ""), str) or not isinstance(doc.get("text", ""), str):
        raise RetrievalError("result 'document' has no string 'contents' and no string 'title' / 'text'")
    return Passage(pid, doc.get("title", ""), doc.get("text", ""), float(score or 0.0))


class HTTPRetriever:
    """``search(queries, k)`` against ``url`` (e.g. ``http://127.0.0.1:8000/retrieve``).

    ``timeout_s``: per attempt; ``retries``: extra attempts after a retryable failure; ``backoff_s``:
    first back-off (doubled each time); ``deadline_s``: bound on one ``search`` call, retries, waits
    and back-off included."""

    kind = "http"

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 deadline_s: float = 60.0, api_key: str = "", api_key_header: str = "X-API-Key",
                 transport: httpx.BaseTransport | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retrieval url {url!r} must start with http:// or https://")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if timeout_s <= 0 or deadline_s <= 0 or backoff_s < 0:
            raise ValueError("timeout_s and deadline_s must be > 0 and backoff_s >= 0")
        self.url = url
        self.retries, self.backoff_s, self.deadline_s, self.timeout_s = retries, backoff_s, deadline_s, timeout_s
        headers = {api_key_header: api_key} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.manifest: dict = {}

    def _wait(self, attempt: int, resp: httpx.Response | None) -> float:
        """Back-off before attempt ``attempt`` (>= 1): exponential, or the server's ``Retry-After``."""
        wait = self.backoff_s * 2 ** (attempt - 1)
        try:
            wait = max(wait, float(resp.headers.get("retry-after", "")))
        except (AttributeError, ValueError):
            pass
        return wait

    def _post(self, payload: dict) -> dict:
        end = time.monotonic() + self.deadline_s
        last, resp, attempts, timed_out = "", None, 0, False
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self._wait(attempt, resp)
                if time.monotonic() + wait >= end:
                    last += f" (no time left for another attempt within deadline_s={self.deadline_s:g})"
                    break
                time.sleep(wait)
            left = end - time.monotonic()
            attempts += 1
            try:
                resp = self.client.post(self.url, json=payload, timeout=min(self.timeout_s, max(left, 0.001)))
            except httpx.TransportError as exc:  # connect errors, timeouts, a dropped connection
                last, resp = f"{type(exc).__name__}: {exc}", None
                timed_out |= isinstance(exc, httpx.TimeoutException)
                continue
            if resp.status_code in RETRYABLE_STATUS:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                what = "rejected the request" if resp.status_code < 500 else "failed"
                raise RetrievalError(f"{self.url} {what}: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                return resp.json()
            except ValueError:
                raise RetrievalError(f"{self.url} answered non-JSON: {resp.text[:200]!r}") from None
        hint = ""
        if timed_out:  # the one failure a setting fixes: say which
            hint = (f"; the server was too slow for retrieval.timeout_s={self.timeout_s:g} (per attempt) / "
                    f"retrieval.deadline_s={self.deadline_s:g} (per call): raise them, or serve a faster index "
                    "(hnsw_sq8, or `rexrag serve --gpu`)")
        raise RetrievalError(f"{self.url} failed after {attempts} attempt(s): {last}{hint}")

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        body = self._post({"queries": list(queries), "topk": int(k), "return_scores": True})
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalError(f"{self.url}: expected 'result' with {len(queries)} lists, got {str(body)[:200]}")
        if not all(isinstance(row, list) for row in result):
            raise RetrievalError(f"{self.url}: every 'result' row must be a list, got {str(body)[:200]}")
        return [[_passage(item) for item in row] for row in result]  # a row may be short or empty

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url}

    def close(self) -> None:
        self.client.close()
