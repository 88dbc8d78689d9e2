"""Opening faiss index files memory-mapped, and reading an index's vectors back in chunks.

faiss has two ways to map a file, and each covers only some types (faiss 1.15.1, measured 2026-12-06):

* ``IO_FLAG_MMAP`` maps the inverted lists of IVF indexes (``OnDiskInvertedLists``) and nothing else:
  a Flat, SQ or HNSW file read with it is copied into RAM whole.
* ``IO_FLAG_MMAP_IFC`` maps the codes of Flat, scalar-quantised and PQ indexes (an HNSW's storage among
  them) and HNSW's neighbour lists, which faiss reads through once while loading, so they are resident
  (as file pages) from the start: ~4 (2M + 1) bytes a vector, ~260 for HNSW32. HNSW's levels and offsets
  (12 bytes a vector) and an ID map's ids (8) are copied.

:func:`open_mapped` therefore opens IVF indexes with the first and every other type with the second,
and refuses, with one line naming the file, a type faiss copies whole under both (fast-scan, NSG,
additive quantisers, IVF-PQR, ...): a 65 GB file read into RAM is the failure this module exists to
prevent. The top-level type is checked from the file's first four bytes before anything is read; the
parts inside a wrapper (pre-transform, ID map, refine) once it is open.

Mapped is not free. The pages a search touches become resident and count in the process's RSS as
file-backed pages (``RssFile`` in ``/proc/PID/status``); a Flat search reads every vector, so after
its first query a served Flat file is resident where RAM allows it, and is read again from disk per
query where it does not. What mapping removes is the private copy (``RssAnon``), which the kernel
cannot drop, and the read of the whole file before the server starts.

Converting (:func:`vector_reader`) reads a Flat file's rows with ``pread`` into one chunk at a time (the
file's pages stay in the page cache, outside the process), and any other type through faiss's
``reconstruct`` on the mapped file (an IVF index after building its direct map: 8 bytes a vector);
there the pages read stay mapped, so RSS grows by the part of the source read so far.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rexrag.errors import UserError

# Top-level type tags (a file's first 4 bytes) whose storage faiss maps: Flat, SQ, PQ, HNSW over those,
# IVF-Flat / SQ / PQ, and the wrappers whose inner parts are checked once open.
MAPPED_TAGS = frozenset({"IxFI", "IxF2", "IxFl", "IxSQ", "IxPQ", "IxPo", "IxPq", "IHNf", "IHNs", "IHNp",
                         "IwFl", "IwSq", "IwSQ", "IwPQ", "IxPT", "IxMp", "IxM2", "IxRF"})
_MAPPED_CODES = ("IndexFlat", "IndexFlatIP", "IndexFlatL2", "IndexScalarQuantizer", "IndexPQ")
_MAPPED_IVF = ("IndexIVFFlat", "IndexIVFScalarQuantizer", "IndexIVFPQ")  # lists as OnDiskInvertedLists
_WRAPPERS = {"IndexPreTransform": ("index",), "IndexIDMap": ("index",), "IndexIDMap2": ("index",),
             "IndexRefine": ("base_index", "refine_index"), "IndexRefineFlat": ("base_index", "refine_index")}
CHANGE = ("use a Flat, SQ, PQ, HNSW (over those) or IVF-Flat/SQ/PQ index instead, e.g. build one from the corpus "
          "with `rexrag index --kind dense --index-type sq8`")


def copied_parts(index) -> list[str]:
    """Class names of the parts of ``index`` whose storage faiss copies into RAM even when the file is
    opened memory-mapped ([] for a fully mappable index). Works on an open index and on an empty new one
    (a ``--factory`` string is checked before anything is encoded)."""
    import faiss

    index = faiss.downcast_index(index)
    name = type(index).__name__
    if isinstance(index, faiss.IndexIVF):
        return [] if name in _MAPPED_IVF else [name]
    if isinstance(index, faiss.IndexHNSW):
        return copied_parts(index.storage) if index.storage is not None else []
    if name in _WRAPPERS:
        return [part for attr in _WRAPPERS[name] for part in copied_parts(getattr(index, attr))]
    return [] if name in _MAPPED_CODES else [name]


def _ivf_inside(index) -> bool:
    """Whether ``index`` is an IVF index inside pre-transforms / ID maps only: then ``IO_FLAG_MMAP`` maps all
    of its bulk (the lists). Next to a refine index's codes it would copy those, so a refine wrapper stays
    on ``IO_FLAG_MMAP_IFC``, which maps IVF lists too (as views of the file)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        return True
    if type(index).__name__ in ("IndexPreTransform", "IndexIDMap", "IndexIDMap2"):
        return _ivf_inside(index.index)
    return False


def _type_tag(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(4).decode("latin-1")


def _read(path: Path, flags: int, label: str):
    import faiss

    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        why = next((ln.strip() for ln in str(exc).splitlines() if "Error" in ln or "error" in ln), str(exc).strip())
        raise UserError(f"{label}: not a readable faiss index (truncated, or another format): {why[:200]}") from None


def open_mapped(path: Path, label: str = ""):
    """The faiss index in ``path``, memory-mapped: IVF lists with ``IO_FLAG_MMAP``, every other supported
    type with ``IO_FLAG_MMAP_IFC`` (see the module docstring). A missing or unreadable file, or a type
    faiss would copy into RAM whole, is a ``UserError`` that starts with ``label`` (default: the path)."""
    import faiss

    label = label or str(path)
    if not path.is_file():
        raise UserError(f"{label}: no such file")
    tag = _type_tag(path)
    if tag not in MAPPED_TAGS and re.fullmatch(r"I[A-Za-z0-9]{3}", tag):
        raise UserError(f"{label}: faiss cannot memory-map this index type (tag {tag!r}): it would be read into "
                        f"RAM whole; {CHANGE}")
    ivf_flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    ifc = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if ifc is None and not tag.startswith("Iw"):
        raise UserError(f"{label}: faiss {faiss.__version__} maps only IVF lists (it has no IO_FLAG_MMAP_IFC), so "
                        "this index would be read into RAM whole; upgrade faiss-cpu (1.15 maps Flat, SQ, PQ and HNSW)")
    index = _read(path, ivf_flags if tag.startswith("Iw") else ifc, label)
    if not tag.startswith("Iw") and _ivf_inside(index):
        index = _read(path, ivf_flags, label)  # an IVF inside a pre-transform (OPQ..,IVF..): its lists on disk
    copied = copied_parts(index)
    if copied:
        raise UserError(f"{label}: faiss cannot memory-map {', '.join(copied)} (it copies it into RAM whole); {CHANGE}")
    return index


# --------------------------------------------------------------------------- reading vectors back


class FlatRows:
    """Rows of a Flat index file read with ``pread``, never through a mapping: a chunk of rows costs
    its own size in RSS, and the file's pages stay in the page cache, outside the process. A Flat
    file ends with its vectors (``ntotal * d`` float32, preceded by their count as 8 bytes)."""

    def __init__(self, path: Path, n: int, dim: int, label: str):
        self.dim, self.row_bytes, self.label = dim, dim * 4, label
        self.offset = path.stat().st_size - n * self.row_bytes
        self.fd = os.open(path, os.O_RDONLY)
        count = os.pread(self.fd, 8, self.offset - 8) if self.offset >= 8 else b""
        if int.from_bytes(count, "little") != n * dim:
            os.close(self.fd)
            raise UserError(f"{label}: its vectors are not where a Flat index keeps them (at the end of the file); "
                            "is it truncated?")

    def _read_into(self, out: np.ndarray, first: int) -> None:
        view, pos = memoryview(out).cast("B"), self.offset + first * self.row_bytes
        while view:
            got = os.preadv(self.fd, [view], pos)
            if got <= 0:
                raise UserError(f"{self.label}: the file ended early, at byte {pos} (truncated while being read?)")
            view, pos = view[got:], pos + got

    def chunk(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1, [b-a, d] float32."""
        out = np.empty((b - a, self.dim), dtype=np.float32)
        self._read_into(out, a)
        return out

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids``, [len(ids), d] float32 (one read a row: a training sample, not a scan)."""
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for row, i in enumerate(ids.tolist()):
            self._read_into(out[row], i)
        return out

    def close(self) -> None:
        os.close(self.fd)


def vector_reader(index, path: Path, label: str) -> tuple[int, Callable, Callable, Callable]:
    """``(n, chunk(a, b), take(ids), close())`` over the vectors of the open index ``index`` read from
    ``path``: a plain Flat file by :class:`FlatRows`, anything else by ``reconstruct`` (an IVF index gets
    its direct map first). A type that cannot give its vectors back is a ``UserError`` naming the file."""
    import faiss

    flat = faiss.downcast_index(index)
    if type(flat).__name__ in ("IndexFlat", "IndexFlatIP", "IndexFlatL2"):
        rows = FlatRows(path, index.ntotal, index.d, label)
        return index.ntotal, rows.chunk, rows.take, rows.close
    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is not None:
            ivf.make_direct_map()
        index.reconstruct(0)
    except RuntimeError as exc:
        why = str(exc).strip().splitlines()[0].rsplit(": ", 1)[-1] if str(exc).strip() else ""
        raise UserError(f"{label}: faiss cannot read the vectors back from an {type(flat).__name__} ({why[:160]}); "
                        "serve it as it is (leave --index-type flat) or convert from a Flat, SQ, HNSW or IVF file") from None
    return index.ntotal, (lambda a, b: index.reconstruct_n(a, b - a)), index.reconstruct_batch, (lambda: None)
