"""Faiss files stay on disk: an imported Flat index is checked, served and converted without being read
into RAM (``rexrag.retrieval.faiss_files``), IVF indexes keep their on-disk inverted lists, and a type
faiss cannot memory-map is refused with one line before any model loads.

RSS is read from ``/proc/self/status`` around the shipped calls on a 96 MiB Flat file (65,536 x 384-d,
the offline encoder's width); the peak of a call is ``VmHWM`` after resetting it (``clear_refs`` 5).
Reading the file whole, as faiss does for Flat under ``IO_FLAG_MMAP``, adds its full size; the bounds
allow a quarter of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rexrag.cli import main
from rexrag.errors import UserError
from rexrag.retrieval import build_index, load_index
from rexrag.retrieval import compressed as C
from rexrag.retrieval.dense import load_encoder

N, DIM = 65536, 384


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """Small trainings: faiss's OpenMP threads spin against each other on a busy 2-core machine (20 s
    instead of 0.1 s for a 1,000-vector IVF)."""
    import faiss

    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> float:
    """Reset VmHWM to the current RSS; returns that RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 96 MiB IndexFlatIP of unit vectors over a corpus of as many passages, written as Search-R1 does."""
    import faiss

    d = tmp_path_factory.mktemp("mmap")
    x = np.random.default_rng(0).standard_normal((N, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(DIM)
    index.add(x)
    faiss.write_index(index, str(d / "e5_Flat.index"))
    del index
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\npassage {i}'}) + "\n" for i in range(N)))
    load_encoder("all-MiniLM-L6-v2", "cpu")  # cached under the key build_dense uses: loaded before any measurement
    return {"dir": d, "faiss": d / "e5_Flat.index", "corpus": corpus, "x": x,
            "mib": (d / "e5_Flat.index").stat().st_size / 2**20}


def test_the_import_check_does_not_read_the_file(big, tmp_path):
    base = _reset_peak()
    build_index(big["corpus"], "dense", tmp_path / "idx", from_faiss=str(big["faiss"]))  # checked, then linked
    assert _status_mib("VmHWM") - base < big["mib"] / 4, "the import read the faiss file into RAM"


def test_an_imported_flat_is_served_mapped(big, tmp_path):
    build_index(big["corpus"], "dense", tmp_path / "idx", from_faiss=str(big["faiss"]))
    anon, before = _status_mib("RssAnon"), _status_mib("VmRSS")
    retriever = load_index(tmp_path / "idx")  # as `rexrag serve` opens it
    assert _status_mib("VmRSS") - before < big["mib"] / 4, "serving read the faiss file into RAM"
    q = big["x"][[3, 40000]] + 0.01
    scores, ids = retriever.index.search(q, 5)
    assert ids[:, 0].tolist() == [3, 40000] and np.allclose(scores, np.sort(q @ big["x"].T, axis=1)[:, ::-1][:, :5], atol=1e-4)
    assert np.array_equal(retriever.index.reconstruct(40000), big["x"][40000])
    # the search read every vector: they are resident now as file pages (RssFile), not as a private copy
    assert _status_mib("RssAnon") - anon < big["mib"] / 4


def test_conversion_holds_the_output_and_a_chunk_not_the_file(big, tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CHUNK", 4096)  # 6 MiB chunks of this file
    base = _reset_peak()
    build_index(big["corpus"], "dense", tmp_path / "sq8", from_faiss=str(big["faiss"]), index_type="sq8",
                train_size=4096)
    peak = _status_mib("VmHWM") - base
    out_mib = (tmp_path / "sq8" / "faiss.index").stat().st_size / 2**20  # 24 MiB: 1 byte a dimension
    assert peak < out_mib + big["mib"] / 4, f"peak +{peak:.0f} MiB converting a {big['mib']:.0f} MiB file"
    sq8 = load_index(tmp_path / "sq8")
    assert type(sq8.index).__name__ == "IndexScalarQuantizer"
    _, ids = sq8.index.search(big["x"][[7, 65535]], 1)
    assert ids[:, 0].tolist() == [7, 65535]


def _write(tmp_path: Path, name: str, spec: str, x: np.ndarray) -> Path:
    import faiss

    index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    faiss.write_index(index, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("spec", ["IVF16,Flat", "IVF16,SQ8", "PCA32,IVF16,Flat"])
def test_ivf_keeps_its_lists_on_disk(tmp_path, spec):
    """IVF indexes are opened with IO_FLAG_MMAP (their lists as OnDiskInvertedLists), in a wrapper too."""
    import faiss

    from rexrag.retrieval.faiss_files import open_mapped

    x = np.random.default_rng(1).standard_normal((1000, 64), dtype=np.float32)
    index = open_mapped(_write(tmp_path, "ivf.index", spec, x))
    lists = faiss.downcast_InvertedLists(faiss.try_extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert index.search(x[:2], 3)[1].shape == (2, 3)


@pytest.mark.parametrize("spec", ["PQ8x4fs", "PCA32,PQ8x4fs"])
def test_an_unmappable_type_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, spec):
    """faiss copies a fast-scan index into RAM whatever the flags: one line naming the file, exit 2,
    before the encoder loads, nothing written (at the top level from the file's type tag, unread)."""
    import rexrag.retrieval.dense as dense

    x = np.random.default_rng(2).standard_normal((500, 64), dtype=np.float32)
    path = _write(tmp_path, "fs.index", spec, x)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f"p {i}"}) + "\n" for i in range(500)))

    def no_model(*a, **k):
        raise AssertionError("the encoder loaded before the faiss file was refused")

    monkeypatch.setattr(dense, "load_encoder", no_model)
    out = tmp_path / "idx"
    assert main(["index", "--corpus", str(corpus), "--kind", "dense", "--from-faiss", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot memory-map" in err and "fs.index" in err, err
    assert not out.exists() and not any(p.name.startswith(".idx") for p in tmp_path.iterdir())
    from rexrag.retrieval.faiss_files import open_mapped

    with pytest.raises(UserError, match="cannot memory-map"):
        open_mapped(path)


def test_fill_allocates_the_output_codes_once(monkeypatch):
    """Grown chunk by chunk, faiss's code vector doubles and copies (old and new buffers both resident);
    ``fill`` sizes it once, so the peak is the output plus a chunk, not up to twice the output. 65 MiB of SQ8
    codes (just past 64, the worst case for doubling), added in 1 MiB chunks made on the fly."""
    import faiss

    n, dim = 65 * 4096, 256  # 256-byte codes: 65 MiB
    monkeypatch.setattr(C, "CHUNK", 4096)
    rng = np.random.default_rng(3)
    index = faiss.index_factory(dim, "SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = rng.random((4096, dim), dtype=np.float32)
    base = _reset_peak()
    C.fill(index, n, lambda a, b: rng.random((b - a, dim), dtype=np.float32), lambda ids: sample, train_size=4096)
    assert index.ntotal == n
    peak = _status_mib("VmHWM") - base
    assert peak < 65 * 1.25, f"peak +{peak:.0f} MiB for 65 MiB of codes"
