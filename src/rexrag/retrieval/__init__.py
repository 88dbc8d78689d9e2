"""Retrieval: one protocol (``search(queries, k) -> list[list[Passage]]``), three backends.

* ``BM25Retriever`` (bm25s), ``DenseRetriever`` (sentence-transformers + faiss): built into an
  index directory by ``build_index`` / ``rexrag index`` and opened by ``load_index``.
* ``HTTPRetriever``: any Search-R1-compatible ``/retrieve`` server (``rexrag serve`` or Search-R1's).

``load_retriever(cfg)`` picks one from a ``RetrievalConfig``; ``format_information`` (its home is
``rexrag.protocol``) renders passages the way Search-R1 puts them inside ``<information>``.
"""

from __future__ import annotations

from rexrag.protocol import format_information
from rexrag.retrieval.base import Passage, Retriever
from rexrag.retrieval.bm25 import BM25Retriever, build_bm25, load_bm25
from rexrag.retrieval.dense import DenseRetriever, build_dense, load_dense
from rexrag.retrieval.http import HTTPRetriever, RetrievalError
from rexrag.retrieval.index import (
    PassageStore,
    build_index,
    index_kinds,
    load_index,
    read_manifest,
    register_index_kind,
)

register_index_kind("bm25", build_bm25, load_bm25)
register_index_kind("dense", build_dense, load_dense)

__all__ = [
    "BM25Retriever", "DenseRetriever", "HTTPRetriever", "Passage", "PassageStore", "RetrievalError", "Retriever",
    "build_index", "format_information", "index_kinds", "load_index", "load_retriever", "read_manifest",
    "register_index_kind",
]


def load_retriever(cfg) -> Retriever:
    """``cfg.url`` set -> HTTPRetriever; else ``load_index(cfg.index)``."""
    from rexrag.errors import ConfigError

    if cfg.url:
        return HTTPRetriever(cfg.url, timeout_s=cfg.timeout_s, retries=cfg.retries, deadline_s=cfg.deadline_s,
                             api_key=cfg.api_key)
    if cfg.index:
        return load_index(cfg.index, device=cfg.device)
    raise ConfigError("set retrieval.index (an index dir from `rexrag index`) or retrieval.url (a /retrieve endpoint)")
