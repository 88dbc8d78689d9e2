"""Dense index types beyond Flat: named presets or any faiss factory string, trained on a sample.

A Flat index of wiki-18 under e5-base-v2 is 21M x 768 x 4 B = 65 GB, which is what Search-R1 users load
(and run out of memory on). faiss's compressed types trade recall for size: scalar quantisation (``sq8``,
4x smaller; ``fp16``, 2x), inverted lists (``ivf_flat``: same size, searches ``nprobe`` of ``nlist`` lists),
product quantisation (``ivf_pq``: ``pq_m`` bytes a vector; ``opq_ivf_pq`` with a learned rotation first)
and HNSW over quantised storage (``hnsw_sq8``). Presets expand to faiss factory strings
(:data:`PRESETS`); ``--factory`` takes any string faiss accepts (the faiss wiki's "Guidelines to choose
an index"). Defaults follow those guidelines: ``nlist = 4 sqrt(N)`` (at most 65,536), ``pq_m = d / 8``
sub-quantisers (96 bytes a vector for e5's 768), training on ``max(65,536, 50 nlist)`` vectors drawn
without replacement (seed 0; faiss wants at least 39 a list), never more than N. Vectors are read in
chunks of ``CHUNK`` rows from wherever they live: the build's on-disk memmap, or an imported faiss file
(``rexrag.retrieval.faiss_files``: a Flat file's rows by ``pread``), so converting a 65 GB Flat index needs
RAM for the training sample, then for the output index (allocated once: :func:`reserve_codes`) and one
chunk, not for the file (BENCHMARKS.md, "Imported Flat index, memory-mapped").

Search-time knobs: ``nprobe`` (IVF lists visited per query) and ``ef_search`` (HNSW candidate list),
recorded in the manifest at build and settable per server (``rexrag serve --nprobe / --ef-search``); both
reach the IVF / HNSW part inside a pre-transform (``OPQ..,IVF..``, ``PCA..,HNSW..``) or an ID map.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from rexrag.errors import UserError

PRESETS = {
    "sq8": "SQ8",
    "fp16": "SQfp16",
    "ivf_flat": "IVF{nlist},Flat",
    "ivf_pq": "IVF{nlist},PQ{pq_m}",
    "opq_ivf_pq": "OPQ{pq_m},IVF{nlist},PQ{pq_m}",
    "hnsw_sq8": "HNSW{hnsw_m},SQ8",
}
CHUNK = 65536
DEFAULT_NPROBE = 32  # IVF lists visited per query unless --nprobe says otherwise (capped at nlist)
DEFAULT_EF_SEARCH = 128  # HNSW candidate list at build and serve unless --ef-search says otherwise (faiss's own: 16)


def default_nlist(n: int) -> int:
    return int(min(65536, max(1, round(4 * math.sqrt(n)))))


def default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` not above ``dim / 8`` (faiss needs ``dim % pq_m == 0``)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def default_train_size(n: int, nlist: int) -> int:
    return min(n, max(65536, 50 * nlist))


def factory_string(index_type: str, factory: str, dim: int, n: int, *, hnsw_m: int = 32, nlist: int = 0,
                   pq_m: int = 0) -> str:
    """``factory`` when given, else the preset ``index_type`` with its defaults filled in."""
    if factory:
        return factory
    if index_type not in PRESETS:
        raise UserError(f"unknown dense index type {index_type!r}; choose one of {['flat', 'hnsw', *PRESETS]} "
                        "or pass a faiss factory string with --factory")
    return PRESETS[index_type].format(nlist=nlist or default_nlist(n), pq_m=pq_m or default_pq_m(dim), hnsw_m=hnsw_m)


def new_index(factory: str, dim: int, ef_construction: int = 200):
    """An empty inner-product index for ``factory``; a string faiss rejects is a ``UserError`` naming it."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        why = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise UserError(f"faiss rejected the factory string {factory!r} for {dim}-d vectors: {why[:200]}") from None
    hnsw = find_hnsw(index)
    if hnsw is not None:
        hnsw.efConstruction = ef_construction
    return index


def find_hnsw(index):
    """The HNSW graph of ``index`` or of the index inside its pre-transform, ID map or refine wrapper
    (``PCA64,HNSW32`` is an ``IndexPreTransform``: ``efSearch`` set on the wrapper does nothing), or None.
    The graph belongs to ``index``: keep ``index`` alive while using it."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return index.hnsw
    for attr in ("index", "base_index"):  # IndexPreTransform / IndexIDMap, IndexRefine
        inner = getattr(index, attr, None)
        if isinstance(inner, faiss.Index):
            return find_hnsw(inner)
    return None


def fill(index, n: int, chunk: Callable[[int, int], np.ndarray], take: Callable[[np.ndarray], np.ndarray],
         train_size: int, seed: int = 0) -> int:
    """Train ``index`` (when it needs it) on ``train_size`` of the ``n`` vectors, then add all of them,
    ``CHUNK`` rows at a time: ``chunk(a, b)`` gives rows a..b-1 and ``take(ids)`` the rows ``ids`` (sorted),
    both float32 [*, d]. Returns the number of training vectors used (0 when none was needed)."""
    used = 0
    if not index.is_trained:
        used = min(n, train_size)
        ids = np.sort(np.random.default_rng(seed).choice(n, size=used, replace=False))
        index.train(np.ascontiguousarray(take(ids), dtype=np.float32))
    reserve_codes(index, n)
    for start in range(0, n, CHUNK):
        index.add(np.ascontiguousarray(chunk(start, min(n, start + CHUNK)), dtype=np.float32))
    return used


def reserve_codes(index, n: int) -> None:
    """Allocate the codes of an empty Flat / SQ / PQ index for ``n`` vectors once, and for an HNSW index
    its storage's codes and its graph's neighbour lists (their expected size, +1 %). Grown chunk by chunk,
    faiss's vectors double and copy: the old and new buffers coexist, and a 16 GB sq8 conversion of wiki-18
    would peak at ~26 GB. Resizing to the full size and back to 0 keeps the capacity (std::vector never
    shrinks), so the adds that follow do not reallocate."""
    import faiss

    index = faiss.downcast_index(index)
    if index.ntotal:
        return
    if isinstance(index, faiss.IndexHNSW):
        _reserve(index.hnsw.neighbors, int(n * _expected_links(index.hnsw) * 1.01))
        index = faiss.downcast_index(index.storage) if index.storage is not None else None
    if isinstance(index, faiss.IndexFlatCodes):
        _reserve(index.codes, n * index.code_size)


def _reserve(vector, size: int) -> None:
    vector.resize(size)
    vector.resize(0)


def _expected_links(hnsw) -> float:
    """Neighbour slots a vector takes in ``hnsw``: sum over levels of P(top level = l) x slots up to l."""
    import faiss

    probas = faiss.vector_to_array(hnsw.assign_probas)
    slots = faiss.vector_to_array(hnsw.cum_nneighbor_per_level)
    return float(sum(p * slots[level + 1] for level, p in enumerate(probas) if level + 1 < len(slots)))


def check_knobs(**knobs: int) -> None:
    """Every knob is a count, 0 meaning "the default": a negative one is a ``UserError`` naming its flag."""
    for name, value in knobs.items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 = the default), got {value}")


def set_search_params(index, nprobe: int = 0, ef_search: int = 0, where: str = "the index") -> dict:
    """Apply ``nprobe`` (IVF) and ``ef_search`` (HNSW) where the index has them, also inside a wrapper;
    returns what was set. ``nprobe`` above the list count is a ``UserError``."""
    import faiss

    check_knobs(nprobe=nprobe, ef_search=ef_search)
    out = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if nprobe > ivf.nlist:
            raise UserError(f"--nprobe {nprobe} exceeds the {ivf.nlist} inverted lists of {where}")
        if nprobe:
            ivf.nprobe = nprobe
        out["nprobe"] = int(ivf.nprobe)
    hnsw = find_hnsw(index)
    if hnsw is not None:
        if ef_search:
            hnsw.efSearch = ef_search
        out["ef_search"] = int(hnsw.efSearch)
    return out
