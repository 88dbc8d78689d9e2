"""Worker for the two-process weight-stream tests (tests/test_weight_stream_dist.py): FSDP2 over gloo, a
recording stand-in for the engine, and failures injected into rank 1's stream part-way.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/stream_worker.py OUT

Runs, on both ranks and in this order, each a ``Colocation.sync`` of a sharded model: a plain sync of a
tied-embedding model (odd vocabulary: uneven shards); the same with rank 1's preparation of its 4th
tensor failing (what an out-of-memory while casting / allocating it looks like); a plain sync again; the
same three steps for a LoRA model, whose failure is in rank 1's second LoRA merge, after the gathers.
Writes OUT/rank<r>.json: per step the error (or None), the seconds it took, the streamed names and
bytes, and whether the tensors equal the unsharded model's. The process group times out after 60 s, so a
desynchronised stream ends in a gloo error instead of a hang (the test tells them apart).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rexrag.models import tiny_llama
from rexrag.rollout import weights
from rexrag.rollout.colocate import Colocation

VOCAB = 101  # odd: the embedding's rows split 51 / 50


class RecordingEngine:
    """What ``Colocation.sync`` needs of a backend: consumes the stream and keeps what came through."""

    dtype = "float32"

    def __init__(self):
        self.stats = {"weight_sync_bytes": 0}
        self.loaded: dict[str, torch.Tensor] = {}

    def load_weights(self, pairs) -> int:
        self.loaded = {}
        n = 0
        for name, t in pairs:
            self.loaded[name] = t.clone()
            n += t.numel() * t.element_size()
        self.stats["weight_sync_bytes"] += n
        return n


class BrokenTensor:
    """A state-dict entry whose preparation fails on this rank (it stands for a shard whose cast or
    buffer allocation runs out of memory); it looks sharded, as the real entry does."""

    full_tensor = None

    def detach(self):
        raise RuntimeError("CUDA out of memory (injected on rank 1)")


def sharded(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in list(model.modules()):
        if type(m).__name__ == "LlamaDecoderLayer":
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tied_model():
    return tiny_llama(VOCAB, hidden=32, layers=2, heads=2, tie_word_embeddings=True)


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # PEFT draws A from the global RNG: the same factors on every rank
    model = get_peft_model(tiny_llama(VOCAB, hidden=32, layers=2, heads=2),
                           LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a non-zero delta makes the merge visible
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def expected(model) -> dict[str, torch.Tensor]:
    """The engine's tensors from the unsharded model (one process, no collective)."""
    return {n: t.clone() for n, t in weights.stream_weights(model, torch.float32)}


def step(colo, model, reference) -> dict:
    t0 = time.monotonic()
    error = None
    try:
        colo.sync(model)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error = f"{type(exc).__name__}: {exc}"
    loaded = colo.backend.loaded
    return {"error": error, "seconds": time.monotonic() - t0, "names": sorted(loaded),
            "bytes": sum(t.numel() * t.element_size() for t in loaded.values()),
            "equal": error is None and sorted(loaded) == sorted(reference)
            and all(torch.equal(loaded[n], reference[n]) for n in reference)}


def inject_prep_failure(model, index: int) -> None:
    """Rank 1's ``model.state_dict()`` gets a :class:`BrokenTensor` at position ``index`` (once)."""
    real = model.state_dict

    def state_dict(*a, **k):
        sd = real(*a, **k)
        key = list(sd)[index]
        sd[key] = BrokenTensor()
        del model.state_dict
        return sd

    model.state_dict = state_dict


def inject_merge_failure(call: int) -> None:
    """Rank 1's ``call``-th LoRA merge raises (after its gathers)."""
    real, calls = weights.lora_delta, {"n": 0}

    def lora_delta(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            weights.lora_delta = real
            raise RuntimeError("LoRA merge failed (injected on rank 1)")
        return real(*a, **k)

    weights.lora_delta = lora_delta


def main(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from rexrag.sharding import install_strict_mode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    install_strict_mode()  # NCCL's rules checked at every collective (REXRAG_STRICT_COLLECTIVES, set by the tests)
    rank, mesh = dist.get_rank(), init_device_mesh("cpu", (dist.get_world_size(),))
    info: dict = {"rank": rank}
    for kind, build, inject in (("tied", tied_model, lambda m: inject_prep_failure(m, 3)),
                                ("lora", lora_model, lambda m: inject_merge_failure(2))):
        model = build()
        reference = expected(model)
        info[f"{kind}_state_keys"] = len(model.state_dict())
        model = sharded(model, mesh)
        colo = Colocation(RecordingEngine())
        info[f"{kind}_ok"] = step(colo, model, reference)
        if rank == 1:
            inject(model)
        info[f"{kind}_fail"] = step(colo, model, reference)
        info[f"{kind}_ok_after"] = step(colo, model, reference)
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(out_dir)
