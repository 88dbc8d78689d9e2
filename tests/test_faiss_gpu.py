"""`rexrag serve --gpu`: what is sent to faiss's GPU build (a stand-in records it: no GPU here), and the
one-line refusals on a CPU build, a BM25 index and an index type faiss cannot clone."""

from __future__ import annotations

import json
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from rexrag.cli import main
from rexrag.errors import UserError
from rexrag.retrieval.faiss_gpu import index_to_gpus, require_gpus
from rexrag.retrieval.index import FORMAT_VERSION, MANIFEST


class FakeGpuFaiss:
    """The calls Search-R1's `--faiss_gpu` path makes, recorded: GpuMultipleClonerOptions, index_cpu_to_all_gpus."""

    __version__ = "1.x-gpu"

    def __init__(self, gpus: int = 8, refuse: bool = False):
        self.gpus, self.refuse, self.cloned, self.params = gpus, refuse, [], []

    class StandardGpuResources:  # present in the GPU build only
        pass

    def get_num_gpus(self):
        return self.gpus

    def GpuMultipleClonerOptions(self):  # noqa: N802 (faiss's name)
        return SimpleNamespace(shard=False, useFloat16=False)

    def index_cpu_to_all_gpus(self, index, co=None):
        if self.refuse:
            raise RuntimeError("Error in ToGpuCloner: unsupported index type\nmore lines")
        self.cloned.append((index, co))
        return SimpleNamespace(on_gpu=index)

    def downcast_index(self, index):
        return faiss.downcast_index(index)

    def GpuParameterSpace(self):  # noqa: N802
        return SimpleNamespace(set_index_parameter=lambda idx, name, value: self.params.append((name, value)))


def test_index_goes_to_every_gpu_sharded_in_fp16():
    fake, index = FakeGpuFaiss(), faiss.IndexFlatIP(4)
    assert require_gpus(fake) == 8
    out = index_to_gpus(index, nprobe=64, module=fake)
    (cloned, options), = fake.cloned
    assert cloned is index and out.on_gpu is index
    assert options.shard is True and options.useFloat16 is True  # as Search-R1: 1/G of the vectors a GPU
    assert fake.params == [("nprobe", 64)]
    index_to_gpus(index, fp16=False, module=fake)
    assert fake.cloned[-1][1].useFloat16 is False and len(fake.params) == 1  # nprobe 0: left alone


def test_cpu_build_and_no_visible_gpu_are_one_line_errors():
    with pytest.raises(UserError, match="CPU build: install faiss's GPU build") as info:
        require_gpus(faiss)  # the faiss installed here is faiss-cpu
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="sees no GPU"):
        require_gpus(FakeGpuFaiss(gpus=0))


def test_type_without_gpu_version_names_it():
    hnsw = faiss.IndexHNSWFlat(4, 8)
    with pytest.raises(UserError, match="cannot put a IndexHNSWFlat on a GPU") as info:
        index_to_gpus(hnsw, module=FakeGpuFaiss(refuse=True))
    assert "\n" not in str(info.value) and "ivf_flat" in str(info.value)


def _index_dir(path, kind: str):
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": kind, "passages": 0,
                                             "params": {}}))
    return path


def test_serve_gpu_refused_before_loading(tmp_path, capsys):
    # the dense directory has a manifest only: a refusal that came after loading would fail on the store instead
    assert main(["serve", "--index", str(_index_dir(tmp_path / "dense", "dense")), "--gpu"]) == 2
    err = capsys.readouterr().err
    assert "faiss-gpu-cu12" in err and "serve without --gpu" in err
    assert main(["serve", "--index", str(_index_dir(tmp_path / "bm25", "bm25")), "--gpu"]) == 2
    assert "'bm25' index; only dense" in capsys.readouterr().err


def test_serve_gpu_puts_the_loaded_index_on_the_gpus(tmp_path, shared_data, monkeypatch, capsys):
    """`rexrag serve --gpu` on a real dense index: the app serves the GPU clone of the loaded index (a stand-in
    faiss records the clone), with the server's nprobe; uvicorn is not started."""
    import rexrag.retrieval.faiss_gpu as faiss_gpu
    import rexrag.retrieval.server as server
    from rexrag.retrieval import build_index

    src = shared_data / "derived" / "multihop_dev_corpus.flashrag.jsonl"
    corpus = tmp_path / "c.jsonl"
    with src.open() as fh:
        corpus.write_text("".join(next(fh) for _ in range(40)))
    index_dir = build_index(corpus, "dense", tmp_path / "dense")
    fake, served = FakeGpuFaiss(gpus=2), {}
    monkeypatch.setattr(faiss_gpu, "_faiss", lambda module=None: fake)
    monkeypatch.setattr(server, "create_app", lambda retriever, **kw: served.setdefault("retriever", retriever))
    monkeypatch.setattr(server, "server_config", lambda app, **kw: None)
    monkeypatch.setattr("uvicorn.Server", lambda config: SimpleNamespace(run=lambda: None))
    assert main(["serve", "--index", str(index_dir), "--gpu", "--device", "cpu"]) == 0
    (cpu_index, options), = fake.cloned
    assert served["retriever"].index.on_gpu is cpu_index and cpu_index.ntotal == 40
    assert options.shard and options.useFloat16
    assert "index on 2 GPU(s), sharded, fp16" in capsys.readouterr().out
