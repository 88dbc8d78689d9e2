"""bf16-moment AdamW under two CPU processes (slow: each launch starts two Python processes).

DDP: every process holds a full replica and applies the same averaged gradient, so its stochastic
rounding must draw the same noise, or the replicas drift apart silently (they are never re-synced,
each feeds its own engine, only rank 0's is saved). FSDP2: parameters, gradients and moments are
DTensor shards; the optimizer must update them through their local tensors. Both run the trainer
end to end, in strict collective mode (tests/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_fsdp import HERE, _fsdp, _launch

from toy_rl import toy_model

pytestmark = pytest.mark.slow

DDP = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
STEPS = ["trainer.steps=3", "trainer.optimizer_state_dtype=bfloat16", "trainer.lr=3e-3"]


def _replicas(out) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"params_rank{r}.pt") for r in (0, 1)]


def test_ddp_replicas_stay_bitwise_equal_with_bf16_moments(tmp_path):
    _launch(DDP, str(HERE / "fsdp_worker.py"), "train", str(tmp_path), *STEPS)
    a, b = _replicas(tmp_path)
    init = {n.removeprefix("module."): p for n, p in toy_model().named_parameters()}
    changed = sum(not torch.equal(init[n.removeprefix("module.")], p) for n, p in a.items())
    assert changed > len(a) // 2, "the run did not train"
    differing = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differing, f"replicas drifted apart in {len(differing)} of {len(a)} tensors, e.g. {differing[:3]}"


def test_fsdp2_trains_with_bf16_moments(tmp_path):
    _fsdp("train", str(tmp_path), *STEPS)
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["sharded"] and i["param_type"] == "DTensor" and i["steps"] == 3 for i in infos)
    assert all(h["actor/nan_skips"] == 0 for h in infos[0]["history"])
    shards = _replicas(tmp_path)
    init = dict(toy_model().named_parameters())
    # each shard is rank r's rows of the parameter (FSDP2 shards dim 0 evenly here)
    for n, p in shards[0].items():
        full = init[n].detach()
        rows = full.shape[0] // 2 if full.dim() else None
        if rows and p.shape[0] == rows:
            assert not torch.equal(p, full[:rows]) or not torch.equal(shards[1][n], full[rows:]), f"{n} did not train"


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, monkeypatch):
    """The NaN/inf skip is one decision: before it was agreed, the rank that saw the bad loss skipped
    while the other stepped, and the DDP replicas parted for good."""
    monkeypatch.setenv("REXRAG_TEST_NONFINITE_RANK", "1")
    _launch(DDP, str(HERE / "fsdp_worker.py"), "train", str(tmp_path), "trainer.steps=2")
    a, b = _replicas(tmp_path)
    assert all(torch.equal(a[n], b[n]) for n in a), "the replicas parted"
    infos = [json.loads((tmp_path / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    skips = [i["history"][-1]["actor/nan_skips"] for i in infos]
    assert skips[0] == skips[1] >= 2  # every update of both steps skipped
    init = {n: p for n, p in toy_model().named_parameters()}
    assert all(torch.equal(init[n.removeprefix("module.")], p) for n, p in a.items()), "a rank stepped"
