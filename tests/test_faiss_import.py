"""``rexrag index --kind dense --from-faiss``: serving a faiss index someone else built, as Search-R1 users
download it (``e5_Flat.index``: an ``IndexFlatIP`` over unit vectors, vector i = corpus line i).

The index is built here with faiss directly, the way Search-R1's index builder does it (encode, normalise,
``IndexFlatIP``, ``add``, ``write_index``), over a small corpus with the offline MiniLM encoder. Served by
``rexrag serve``'s app, it must answer what Search-R1's server answers on the same files: the passages of
``index.search`` in its order, with its scores. Bad files fail with exit code 2, one line naming the file,
no index directory, the file untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from rexrag.cli import main
from rexrag.errors import IndexMismatchError
from rexrag.retrieval import load_index
from rexrag.retrieval.dense import encode, load_encoder
from rexrag.retrieval.server import create_app

TOPICS = ["Paris is the capital of France", "The Nile flows through Egypt", "Mount Everest is in Nepal",
          "Shakespeare wrote Hamlet", "Photosynthesis happens in leaves", "The Moon orbits the Earth"]
QUERIES = ["which river is in Egypt", "who wrote Hamlet", "what orbits the Earth", "capital of France"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import faiss

    d = tmp_path_factory.mktemp("faiss")
    rows = [{"id": str(i), "contents": f'"Doc {i}"\n{TOPICS[i % len(TOPICS)]}, note {i}.'} for i in range(30)]
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = encode(load_encoder("all-MiniLM-L6-v2", "cpu"), [r["contents"] for r in rows])  # unit vectors; the key build_dense uses
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    faiss.write_index(index, str(d / "e5_Flat.index"))
    return {"dir": d, "corpus": corpus, "rows": rows, "faiss": d / "e5_Flat.index", "emb": emb}


def _digest(path: Path) -> tuple[str, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime


def _import(files, out: Path, source: Path, *extra: str) -> int:
    return main(["index", "--corpus", str(files["corpus"]), "--kind", "dense", "--from-faiss", str(source),
                 "--out", str(out), *extra])


def test_imported_index_answers_as_search_r1s_server(files, tmp_path):
    import faiss
    from test_server import running

    before = _digest(files["faiss"])
    assert _import(files, tmp_path / "idx", files["faiss"]) == 0
    link = tmp_path / "idx" / "faiss.index"
    assert link.is_symlink() and Path(os.readlink(link)) == files["faiss"].resolve()  # linked, not copied
    assert _digest(files["faiss"]) == before
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["params"]["index_type"] == "imported" and manifest["params"]["faiss_class"] == "IndexFlatIP"
    # Search-R1's server: encode the queries, index.search(query_emb, k), corpus[idx] per hit, with scores
    ref_index = faiss.read_index(str(files["faiss"]))
    q = encode(load_encoder("all-MiniLM-L6-v2"), QUERIES)
    scores, idxs = ref_index.search(q, 3)
    retriever = load_index(tmp_path / "idx")
    with running(create_app(retriever)) as url:
        body = httpx.post(f"{url}/retrieve", json={"queries": QUERIES, "topk": 3, "return_scores": True}, timeout=30).json()
    for row, want_ids, want_scores in zip(body["result"], idxs.tolist(), scores.tolist()):
        assert [hit["document"]["contents"] for hit in row] == [files["rows"][i]["contents"] for i in want_ids]
        assert np.allclose([hit["score"] for hit in row], want_scores, atol=1e-5)


def test_a_changed_source_file_is_refused_on_load(files, tmp_path):
    import shutil

    src = tmp_path / "copy.index"
    shutil.copy(files["faiss"], src)
    assert _import(files, tmp_path / "idx", src) == 0
    with open(src, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IndexMismatchError, match="changed since it was imported"):
        load_index(tmp_path / "idx")


def _bad_files(files, d: Path) -> dict[str, tuple[Path, str]]:
    import faiss

    garbage = d / "garbage.index"
    garbage.write_bytes(b"this is not a faiss index" * 10)
    truncated = d / "truncated.index"
    truncated.write_bytes(files["faiss"].read_bytes()[: files["faiss"].stat().st_size // 2])
    fewer = faiss.IndexFlatIP(files["emb"].shape[1])
    fewer.add(files["emb"][:29])
    faiss.write_index(fewer, str(d / "fewer.index"))
    narrow = faiss.IndexFlatIP(16)
    narrow.add(np.random.default_rng(0).standard_normal((30, 16)).astype("float32"))
    faiss.write_index(narrow, str(d / "narrow.index"))
    l2 = faiss.IndexFlatL2(files["emb"].shape[1])
    l2.add(files["emb"])
    faiss.write_index(l2, str(d / "l2.index"))
    fast_scan = faiss.index_factory(files["emb"].shape[1], "PQ8x4fs", faiss.METRIC_INNER_PRODUCT)
    fast_scan.train(files["emb"])
    fast_scan.add(files["emb"])
    faiss.write_index(fast_scan, str(d / "fastscan.index"))
    return {"garbage": (garbage, "not a readable faiss index"), "truncated": (truncated, "not a readable faiss index"),
            "fewer": (d / "fewer.index", "holds 29 vectors but the corpus has 30 passages"),
            "narrow": (d / "narrow.index", "16-d vectors, but the encoder gives 384-d"),
            "l2": (d / "l2.index", "is not inner product"),
            "fastscan": (d / "fastscan.index", "faiss cannot memory-map this index type")}


def test_bad_faiss_files_fail_cleanly(files, tmp_path, capsys):
    for name, (path, message) in _bad_files(files, tmp_path).items():
        before = _digest(path)
        out = tmp_path / f"idx_{name}"
        assert _import(files, out, path) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(path.name) in err, (name, err)
        assert not out.exists() and not any(p.name.startswith(f".idx_{name}") for p in tmp_path.iterdir()), name
        assert _digest(path) == before, name  # the original is untouched
    assert main(["index", "--corpus", str(files["corpus"]), "--kind", "bm25", "--from-faiss", str(files["faiss"]),
                 "--out", str(tmp_path / "bm25")]) == 2
    assert "use it with --kind dense" in capsys.readouterr().err


# --------------------------------------------------------------------------- compressed index types


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around 50 random centres (a documented stand-in for real embeddings' clusters)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


@pytest.mark.parametrize("preset, min_recall, max_size", [("sq8", 0.9, 0.3), ("fp16", 0.99, 0.55), ("ivf_flat", 0.8, 1.1),
                                                        ("ivf_pq", 0.3, 0.2), ("opq_ivf_pq", 0.3, 0.25),
                                                        ("hnsw_sq8", 0.85, 1.4)])
def test_presets_trade_recall_for_size_against_flat(preset, min_recall, max_size):
    """Each preset, built by the shipped path (factory string, training on a sample, chunked add, search
    knobs), keeps most of Flat's top-10 on clustered unit vectors and is smaller (bytes as serialised).
    HNSW's graph (2 x 32 links of 4 B a vector) outweighs 64-d vectors; at e5's 768-d it is a third of Flat."""
    import faiss

    from rexrag.retrieval import compressed as C

    base, queries = _clustered(8000, 64), _clustered(200, 64, seed=1)
    flat = faiss.IndexFlatIP(64)
    flat.add(base)
    _, truth = flat.search(queries, 10)
    spec = C.factory_string(preset, "", 64, len(base))
    index = C.new_index(spec, 64)
    used = C.fill(index, len(base), lambda a, b: base[a:b], lambda ids: base[ids], train_size=4000)
    assert used in (0, 4000) and index.is_trained and index.ntotal == len(base)
    C.set_search_params(index, nprobe=16, ef_search=64)
    _, got = index.search(queries, 10)
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got.tolist(), truth.tolist())])
    size = len(faiss.serialize_index(index)) / len(faiss.serialize_index(flat))
    assert recall >= min_recall and size <= max_size, (spec, recall, size)


def test_compressed_cli_builds_converts_and_checks_its_knobs(files, tmp_path, capsys):
    before = _digest(files["faiss"])
    out = tmp_path / "ivf"
    assert _import(files, out, files["faiss"], "--index-type", "ivf_flat", "--nlist", "4") == 0  # converted, not linked
    manifest = json.loads((out / "manifest.json").read_text())["params"]
    assert not (out / "faiss.index").is_symlink() and manifest["factory"] == "IVF4,Flat" and manifest["nprobe"] == 4
    assert _digest(files["faiss"]) == before
    exact = load_index(tmp_path / "ivf").search(QUERIES, 3)  # nprobe = nlist: exhaustive, so Flat's answers
    assert _import(files, tmp_path / "flat", files["faiss"]) == 0
    flat = load_index(tmp_path / "flat").search(QUERIES, 3)
    assert [[p.id for p in row] for row in exact] == [[p.id for p in row] for row in flat]
    one = load_index(tmp_path / "ivf", nprobe=1)
    assert one.index.nprobe == 1
    from rexrag.errors import UserError

    with pytest.raises(UserError, match="--nprobe 9 exceeds the 4 inverted lists"):
        load_index(tmp_path / "ivf", nprobe=9)
    assert _import(files, tmp_path / "bad_nprobe", files["faiss"], "--index-type", "ivf_flat", "--nlist", "4",
                   "--nprobe", "9") == 2
    assert "exceeds the 4 inverted lists" in capsys.readouterr().err and not (tmp_path / "bad_nprobe").exists()
    assert _import(files, tmp_path / "neg", files["faiss"], "--index-type", "ivf_flat", "--train-size", "-5") == 2
    assert "--train-size must be >= 0" in capsys.readouterr().err and not (tmp_path / "neg").exists()
    with pytest.raises(UserError, match="--nprobe must be >= 0"):
        load_index(tmp_path / "ivf", nprobe=-1)
    assert main(["index", "--corpus", str(files["corpus"]), "--kind", "dense", "--factory", "Bogus,77",
                 "--out", str(tmp_path / "bogus")]) == 2
    err = capsys.readouterr().err.strip()
    assert "faiss rejected the factory string 'Bogus,77'" in err and len(err.splitlines()) == 1
    assert main(["index", "--corpus", str(files["corpus"]), "--kind", "dense", "--index-type", "sq8",
                 "--out", str(tmp_path / "sq8")]) == 0
    hits = load_index(tmp_path / "sq8").search(["who wrote Hamlet"], 3)[0]
    assert "Hamlet" in hits[0].contents


def _source(files, d: Path, spec: str) -> Path:
    """The corpus's vectors written as a ``spec`` index, as someone else might have built them."""
    import faiss

    index = faiss.index_factory(files["emb"].shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    index.train(files["emb"])
    if spec.startswith("IDMap"):
        index.add_with_ids(files["emb"], np.arange(len(files["emb"])))
    else:
        index.add(files["emb"])
    path = d / f"{spec.replace(',', '_')}.index"
    faiss.write_index(index, str(path))
    return path


@pytest.mark.parametrize("spec", ["IVF2,Flat", "HNSW16", "IDMap2,Flat"])
def test_converting_from_an_imported_ivf_or_hnsw_file(files, tmp_path, spec):
    """An IVF, HNSW or ID-mapped file holding the exact vectors converts to the same sq8 index as the
    Flat file does (IVF through its direct map, built on the fly)."""
    source = _source(files, tmp_path, spec)
    assert _import(files, tmp_path / "from_flat", files["faiss"], "--index-type", "sq8") == 0
    assert _import(files, tmp_path / "from_src", source, "--index-type", "sq8") == 0
    want = load_index(tmp_path / "from_flat").search(QUERIES, 3)
    got = load_index(tmp_path / "from_src").search(QUERIES, 3)
    assert [[(p.id, round(p.score, 5)) for p in row] for row in got] == [[(p.id, round(p.score, 5)) for p in row] for row in want]


def test_a_source_that_cannot_give_its_vectors_back_fails_cleanly(files, tmp_path, capsys):
    source = _source(files, tmp_path, "IDMap,Flat")  # IndexIDMap has no reconstruct (IDMap2 has)
    assert _import(files, tmp_path / "idx", source, "--index-type", "sq8") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read the vectors back from an IndexIDMap" in err and source.name in err
    assert not (tmp_path / "idx").exists()
    assert _import(files, tmp_path / "linked", source) == 0  # served as it is, it needs no vectors back


def _inner_hnsw(index):
    """The HNSW graph inside an IndexPreTransform, reached with faiss directly (not the shipped helper)."""
    import faiss

    return faiss.downcast_index(faiss.downcast_index(index).index).hnsw


def test_ef_search_reaches_the_hnsw_inside_a_pre_transform(files, tmp_path):
    """``PCA..,HNSW..`` / ``OPQ..,HNSW..`` are IndexPreTransform: efSearch / efConstruction are set on the
    HNSW inside, at build (manifest) and by ``--ef-search`` when served."""
    from rexrag.retrieval import compressed as C
    from rexrag.retrieval.dense import DenseRetriever

    index = C.new_index("PCA32,HNSW16", 384, ef_construction=40)
    assert _inner_hnsw(index).efConstruction == 40
    assert C.set_search_params(index, ef_search=77) == {"ef_search": 77} and _inner_hnsw(index).efSearch == 77
    DenseRetriever(None, index, [], ef_search=55)
    assert _inner_hnsw(index).efSearch == 55
    assert _import(files, tmp_path / "pca_hnsw", files["faiss"], "--factory", "PCA16,HNSW16", "--ef-search", "64") == 0
    assert json.loads((tmp_path / "pca_hnsw" / "manifest.json").read_text())["params"]["ef_search"] == 64
    assert _inner_hnsw(load_index(tmp_path / "pca_hnsw").index).efSearch == 64
    served = load_index(tmp_path / "pca_hnsw", ef_search=200)  # rexrag serve --ef-search 200
    assert _inner_hnsw(served.index).efSearch == 200 and C.find_hnsw(served.index).efSearch == 200
    hamlet = {r["id"] for r in files["rows"] if "Hamlet" in r["contents"]}
    assert served.search(["who wrote Hamlet"], 3)[0][0].id in hamlet
