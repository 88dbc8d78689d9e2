"""The one retrieval protocol every backend (BM25, dense, HTTP) implements.

``Passage`` (the corpus record a search returns) lives with the corpus reader in ``rexrag.data``
and is re-exported here, so ``rexrag.data`` never imports the retrieval package.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rexrag.data import Passage, split_contents  # noqa: F401 (re-exported: the protocol's result type)


@runtime_checkable
class Retriever(Protocol):
    """Anything with ``search(queries, k)``: ``BM25Retriever``, ``DenseRetriever``, ``HTTPRetriever`` or a
    user's own object. Raise ``rexrag.errors.RetrievalError`` for transient service trouble (the agent
    turns it into a notice for the model); any other exception is treated as a bug and propagates."""

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Up to ``k`` passages for each query, best first (BM25 returns only passages that match)."""
        ...
