"""BM25 retrieval on ``bm25s`` (sparse scores precomputed at index time; ~100x rank_bm25's speed).

Differences from Search-R1's BM25 (pyserini/Lucene): tokenisation is bm25s' regex tokenizer with
optional PyStemmer stemming and a stop-word list (both configurable and recorded in the manifest);
the scoring variant defaults to bm25s' "lucene". A query returns at most ``k`` passages, best first,
and only passages with a positive score: like pyserini, a query none of whose terms occur in the
corpus (or that is all stop words) gets an empty list. Padding with zero-score passages would hand
the model arbitrary text as if it had been found.

Queries are tokenised against the frozen corpus vocabulary (``query_token_ids``) without writing to
it: bm25s' ``Tokenizer.tokenize`` caches every word it stems (``word_to_stem``) and every new word
whose stem is known (``word_to_id``) even with ``update_vocab=False``, so a server fed unique words
grew by ~21 MB per 1 MB request, for good. Unknown words are dropped; the ids of known words are
the ones bm25s would give.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rexrag.retrieval.base import Passage
from rexrag.retrieval.index import iter_texts

BM25_DIR = "bm25"


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[N] scores -> [<=k] indices of positive scores, best first (ties: lower index first).

    Selection runs over the positive scores only: BM25 score vectors are mostly zeros, and numpy's
    argpartition (what bm25s' numpy backend uses) is ~15x slower on such tie-heavy input. Fewer
    than k passages match -> fewer than k indices (no zero-score filler, as in pyserini).
    """
    pos = np.flatnonzero(scores > 0)
    if len(pos) > k:
        pos = pos[np.argpartition(-scores[pos], k - 1)[:k]]
    return pos[np.lexsort((pos, -scores[pos]))]


def _bm25s():
    """``import bm25s`` without letting it take the GPU: bm25s imports JAX when installed, and JAX
    preallocates 75% of every GPU's memory on first use (seen on an H200: 105 GiB gone before the
    policy's first forward). BM25 here is numpy-only, so JAX is kept on the CPU."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import bm25s

    return bm25s


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(language)
    except KeyError:
        from rexrag.errors import UserError

        raise UserError(f"unknown stemmer language {language!r}; choose one of {Stemmer.algorithms()}") from None


def _stopwords(stopwords: str | list[str] | None):
    # bm25s: a language code ("en") or an explicit list; [] disables.
    if stopwords in (None, "", "none"):
        return []
    return stopwords


def query_token_ids(tokenizer, queries: Sequence[str]) -> list[list[int]]:
    """[Q] queries -> [Q] lists of corpus token ids, as bm25s' ``Tokenizer.tokenize(update_vocab=False)``
    maps them, minus the words the corpus lacks; reads ``tokenizer``'s vocabulary, never writes it.

    Per word, as in bm25s' ``streaming_tokenize``: a word already in ``word_to_id`` -> its id; else a
    stop word is skipped; else (with a stemmer) the id of its stem if the corpus has that stem.
    """
    stop = set(tokenizer.stopwords or ())
    word_to_id, stem_to_sid, stem = tokenizer.word_to_id, tokenizer.stem_to_sid, tokenizer.stemmer
    out = []
    for text in queries:
        ids = []
        for word in tokenizer.splitter(text.lower() if tokenizer.lower else text):
            wid = word_to_id.get(word)
            if wid is None and word not in stop and stem is not None:
                wid = stem_to_sid.get(stem(word))
            if wid is not None:
                ids.append(wid)
        out.append(ids)
    return out


class BM25Retriever:
    """``search(queries, k)`` over a bm25s index; ``passages`` is any Sequence[Passage]."""

    kind = "bm25"

    def __init__(self, model, tokenizer, passages: Sequence[Passage]):
        self.model = model
        self.tokenizer = tokenizer
        self.passages = passages
        self.manifest: dict = {}

    @classmethod
    def from_passages(
        cls,
        passages: Sequence[Passage],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | list[str] | None = "en",
        stemmer: str | None = "english",
        show_progress: bool = False,
    ) -> BM25Retriever:
        """Index ``passages`` in memory (no directory)."""
        bm25s = _bm25s()
        from bm25s.tokenization import Tokenizer

        tokenizer = Tokenizer(stopwords=_stopwords(stopwords), stemmer=_stemmer(stemmer))
        ids = tokenizer.tokenize(
            list(iter_texts(passages)), update_vocab=True, return_as="ids", show_progress=show_progress
        )
        model = bm25s.BM25(k1=k1, b=b, method=method)
        model.index(ids, show_progress=show_progress)
        return cls(model, tokenizer, passages)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """``[Q]`` queries -> ``[Q][<=k]`` passages with positive BM25 scores, best first (maybe none)."""
        if not queries:
            return []
        k = min(int(k), len(self.passages))
        known = self.model.unique_token_ids_set
        out = []
        for q_ids in query_token_ids(self.tokenizer, queries):
            q_ids = [t for t in q_ids if t in known]
            if not q_ids:  # no term of the query is in the corpus vocabulary: nothing matches
                out.append([])
                continue
            scores = self.model.get_scores_from_ids(q_ids)
            out.append([self.passages[idx].with_score(scores[idx]) for idx in top_k(scores, k)])
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "passages": len(self.passages)}


# --------------------------------------------------------------------------- index-dir hooks


def build_bm25(
    passages: Sequence[Passage],
    out: Path,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    method: str = "lucene",
    stopwords: str | list[str] | None = "en",
    stemmer: str | None = "english",
) -> dict:
    retriever = BM25Retriever.from_passages(
        passages, k1=k1, b=b, method=method, stopwords=stopwords, stemmer=stemmer, show_progress=False
    )
    target = out / BM25_DIR
    retriever.model.save(target, show_progress=False)
    retriever.tokenizer.save_vocab(target)
    params = {"k1": k1, "b": b, "method": method, "stopwords": stopwords, "stemmer": stemmer}
    return {"model": f"bm25s-{method}", "params": params}


def load_bm25(directory: Path, manifest: dict, passages: Sequence[Passage], device: str = "cpu",
              **search: int) -> BM25Retriever:
    """Open the bm25s files of an index dir (memory-mapped); BM25 always runs on the CPU."""
    bm25s = _bm25s()
    from bm25s.tokenization import Tokenizer

    params = manifest["params"]
    target = directory / BM25_DIR
    model = bm25s.BM25.load(target, mmap=True, show_progress=False)
    tokenizer = Tokenizer(stopwords=_stopwords(params.get("stopwords")), stemmer=_stemmer(params.get("stemmer")))
    tokenizer.load_vocab(target)
    return BM25Retriever(model, tokenizer, passages)
