"""bench/dense_scale.py: its serving child opens and searches an index as `rexrag serve` does."""

from __future__ import annotations

import json

import numpy as np
from conftest import load_bench


def test_the_serving_child_uses_the_servers_mapping_and_search_defaults(tmp_path):
    ds = load_bench("dense_scale")
    from rexrag.retrieval.compressed import DEFAULT_EF_SEARCH

    vectors = ds.make_vectors(tmp_path / "v.npy", 600, 16, seed=1)
    ds.build("hnsw_sq8", vectors, tmp_path / "h.index", train_size=600)
    np.save(tmp_path / "q.npy", np.asarray(vectors[:8]))
    ds.serve(tmp_path / "h.index", tmp_path / "q.npy", None, tmp_path / "res.json", seconds=0.01)
    rec = json.loads((tmp_path / "res.json").read_text())
    assert rec["search"] == {"ef_search": DEFAULT_EF_SEARCH}  # faiss's own default is 16: the 2026-12-02 row's
    assert [row[0] for row in rec["ids"]] == list(range(8))  # each query finds itself first
