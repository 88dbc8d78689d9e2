"""Index directories: build atomically, describe with a manifest, load with checks.

An index directory holds ``manifest.json`` (kind, model, corpus path + sha256, passage count,
parameters, library versions), the passages (``passages.jsonl`` + ``offsets.npy``, read lazily
through a memory map so a large corpus is not held in RAM) and the backend's own files.

Building happens in a hidden sibling temp directory; the manifest is written last and the directory
is then renamed into place, so an interrupted or failed build leaves nothing that ``load_index``
accepts (and the next build of the same directory deletes what a killed one left). Passage ids must
be unique: a repeated id is an error naming both corpus lines. (Search-R1 / FlashRAG keep index and corpus as two unrelated paths with no record of which
corpus or model built the index; here they travel together and are checked on load.)

Index kinds are a registry: ``register_index_kind(name, build, load)``; bm25 and dense register
themselves in ``rexrag.retrieval``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import mmap
import os
import platform
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata as _md
from pathlib import Path
from typing import Any

import numpy as np

from rexrag.errors import DataError, IndexMismatchError, UserError
from rexrag.fsutil import atomic_dir, atomic_write_text
from rexrag.registry import Registry
from rexrag.retrieval.base import Passage, Retriever

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
PASSAGES = "passages.jsonl"
OFFSETS = "offsets.npy"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- passage store


class PassageStore(Sequence):
    """Read-only passages of an index dir, parsed on access from a memory-mapped jsonl."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.offsets = np.load(directory / OFFSETS, mmap_mode="r")  # [N+1] byte offsets
        self._fh = open(directory / PASSAGES, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return _passage_from_row(json.loads(self._mm[int(self.offsets[i]) : int(self.offsets[i + 1])]))

    @staticmethod
    def write(directory: Path, passages: Iterable[Passage]) -> int:
        """Stream passages into ``directory``; returns the count."""
        offsets = array("q", [0])
        with open(directory / PASSAGES, "wb") as fh:
            for p in passages:
                fh.write((json.dumps(_passage_row(p), ensure_ascii=False) + "\n").encode("utf-8"))
                offsets.append(fh.tell())
        np.save(directory / OFFSETS, np.frombuffer(offsets, dtype=np.int64))
        return len(offsets) - 1


def _passage_row(p: Passage) -> dict:
    """A corpus ``contents`` is stored as it came (title / text are split again on read, so the
    store is not twice the corpus size); title + text corpora store their two fields."""
    if p.raw_contents is not None:
        return {"id": p.id, "contents": p.raw_contents}
    return {"id": p.id, "title": p.title, "text": p.text}


def _passage_from_row(row: dict) -> Passage:
    if "contents" in row:
        return Passage.from_contents(row["id"], row["contents"])
    return Passage(row["id"], row["title"], row["text"])


def iter_texts(passages: Sequence[Passage], prefix: str = "") -> Iterable[str]:
    """What backends index: the Search-R1 ``contents`` string (title line + text)."""
    for p in passages:
        yield prefix + p.contents


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class IndexKind:
    """``build(passages, out_dir, **params) -> {"model": str, "params": dict}``;
    ``load(dir, manifest, passages, device="cpu", **search) -> Retriever`` (``search``: the kind's
    search-time knobs, ignored by kinds that have none)."""

    name: str
    build: Callable[..., dict]
    load: Callable[[Path, dict, Sequence[Passage]], Retriever]


_KINDS: Registry[IndexKind] = Registry("index kind")


def register_index_kind(name: str, build: Callable[..., dict], load: Callable[..., Retriever]) -> None:
    """Register an index kind that ``rexrag index --kind NAME`` builds and ``load_index`` opens (see ``IndexKind``
    for the two callables); a name already taken raises."""
    _KINDS.add(name, IndexKind(name, build, load))


def get_index_kind(name: str) -> IndexKind:
    return _KINDS.get(name)


def index_kinds() -> list[str]:
    return _KINDS.names()


# --------------------------------------------------------------------------- build / load


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    dists = ("rexrag", "numpy", "bm25s", "PyStemmer", "faiss-cpu", "sentence-transformers", "torch", "transformers")
    for dist in dists:
        try:
            out[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            pass
    return out


def build_index(
    corpus: str | Path,
    kind: str,
    out: str | Path,
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    **params: Any,
) -> Path:
    """Build a ``kind`` index of the jsonl ``corpus`` into the directory ``out`` (atomically).

    ``params`` go to the backend (bm25: k1, b, method, stopwords, stemmer; dense: model, index_type,
    query_prefix, passage_prefix, batch_size, ...). Returns ``out``.
    """
    from rexrag.data import iter_corpus

    spec = get_index_kind(kind)
    corpus, out = Path(corpus), Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    with atomic_dir(out) as tmp:
        skipped: list[str] = []
        id_hashes = array("q")
        n = PassageStore.write(tmp, _hashing_ids(iter_corpus(corpus, skip_bad=skip_bad, skipped=skipped), id_hashes))
        if n == 0:
            raise UserError(f"{corpus}: no passages to index")
        _check_unique_ids(corpus, id_hashes)
        store = PassageStore(tmp)
        info = spec.build(store, tmp, **params)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "model": info.get("model", ""),
            "corpus": {"path": str(corpus), "sha256": file_sha256(corpus), "bytes": corpus.stat().st_size},
            "passages": n,
            "skipped_rows": len(skipped),
            "contents_verbatim": True,  # passages.jsonl keeps each corpus `contents` byte for byte
            "params": info.get("params", {}),
            "versions": library_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")  # last: marks a complete build
    return out


def _hashing_ids(passages: Iterable[Passage], into: array) -> Iterator[Passage]:
    """Pass ``passages`` through, appending ``hash(id)`` of each to ``into`` (8 bytes a passage:
    a set of 21 M Wikipedia ids as strings would take ~2 GB)."""
    for p in passages:
        into.append(hash(p.id))
        yield p


def _check_unique_ids(corpus: Path, id_hashes: array) -> None:
    """Raise a DataError naming the corpus lines of the first duplicated passage id. Equal hashes
    are confirmed by a second pass over the corpus (reading only the rows whose id hash repeats)."""
    hashes = np.sort(np.frombuffer(id_hashes, dtype=np.int64))
    repeated = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not repeated:
        return
    from rexrag.data import _parse_passage, _rows_jsonl

    parse, first_line = _parse_passage(corpus), {}
    for where, row in _rows_jsonl(corpus):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("id"), (str, int))
            or hash(str(row["id"])) not in repeated
        ):
            continue
        try:
            pid = parse(row, where).id
        except DataError:  # a bad row that --skip-bad left out of the index
            continue
        if pid in first_line:
            raise DataError(
                f"{corpus}: passage id {pid!r} appears twice: {first_line[pid]} and {where}; "
                "passage ids must be unique (results are reported by id)"
            )
        first_line[pid] = where


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexMismatchError(f"index directory {directory} does not exist; build it with `rexrag index`")
    path = directory / MANIFEST
    if not path.is_file():
        raise IndexMismatchError(
            f"{directory} has no {MANIFEST}: not a complete rexrag index (an interrupted build?); "
            "rebuild it with `rexrag index`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexMismatchError(f"{path}: unreadable manifest ({exc})") from None
    for key in ("format_version", "kind", "passages", "params"):
        if key not in manifest:
            raise IndexMismatchError(f"{path}: manifest lacks {key!r}; rebuild the index")
    if manifest["format_version"] != FORMAT_VERSION:
        raise IndexMismatchError(
            f"{path}: index format {manifest['format_version']} is not {FORMAT_VERSION}; rebuild the index"
        )
    return manifest


def load_index(
    directory: str | Path, expect_kind: str | None = None, expect_model: str | None = None, device: str = "cpu",
    **search: int,
) -> Retriever:
    """Open an index directory as a Retriever, checking it is complete and what was asked for.

    ``device`` is where a dense index encodes queries (BM25 ignores it); ``search`` are search-time knobs
    for the kind's loader (dense: ``nprobe``, ``ef_search``; 0 keeps the manifest's).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if expect_kind and manifest["kind"] != expect_kind:
        raise IndexMismatchError(f"{directory} is a {manifest['kind']!r} index, but {expect_kind!r} was asked for")
    if expect_model and manifest.get("model") != expect_model:
        raise IndexMismatchError(
            f"{directory} was built with model {manifest.get('model')!r}, but {expect_model!r} was asked for"
        )
    store = PassageStore(directory)
    if len(store) != manifest["passages"]:
        raise IndexMismatchError(
            f"{directory}: manifest says {manifest['passages']} passages but the store holds {len(store)}; rebuild"
        )
    if not manifest.get("contents_verbatim"):
        log.warning(
            "%s was built before corpus `contents` were stored verbatim: titles are re-quoted "
            "('\"Title\"\\ntext'); rebuild it with `rexrag index` to serve them byte-identical",
            directory,
        )
    retriever = get_index_kind(manifest["kind"]).load(directory, manifest, store, device=device, **search)
    retriever.manifest = manifest
    return retriever
