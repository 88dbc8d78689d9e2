"""Client for any Search-R1-compatible ``POST /retrieve`` endpoint (ours or Search-R1's own).

One request per ``search`` batch, with a timeout and a bounded number of retries (exponential
backoff) on connection errors, timeouts, 429 and 5xx. Other 4xx answers are not retried: they mean
the request itself is wrong. Search-R1's clients call ``requests.post`` once with no timeout or
retry; a stalled retriever would hang training there.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from rexrag.retrieval.base import Passage


class RetrievalError(RuntimeError):
    """The retrieval service failed or answered something that is not Search-R1's format."""


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
    """``search(queries, k)`` against ``url`` (e.g. ``http://127.0.0.1:8000/retrieve``)."""

    kind = "http"

    def __init__(self, url: str, *, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 api_key: str = "", api_key_header: str = "X-API-Key", transport: httpx.BaseTransport | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retrieval url {url!r} must start with http:// or https://")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {api_key_header: api_key} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.manifest: dict = {}

    def _post(self, payload: dict) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self.client.post(self.url, json=payload)
            except httpx.TransportError as exc:  # connect errors and timeouts
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code >= 400:
                raise RetrievalError(f"{self.url} rejected the request: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                return resp.json()
            except ValueError:
                raise RetrievalError(f"{self.url} answered non-JSON: {resp.text[:200]!r}") from None
        raise RetrievalError(f"{self.url} failed after {self.retries + 1} attempt(s): {last}")

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
