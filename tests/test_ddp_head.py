"""The chunked LM head under DDP (two CPU processes over gloo): it runs through DDP's own forward, so the
gradients are all-reduced as after a plain forward, and equal those of one process on both ranks' rows."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rexrag.logprobs import _has_plain_head, sequence_logprobs
from rexrag.models import tiny_llama

VOCAB = 97


def _rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # ragged rows: padding must not count
    return ids, mask


def _loss(model, ids, mask, **kw) -> torch.Tensor:
    return (sequence_logprobs(model, ids, mask, **kw) * mask).sum()


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_llama(VOCAB, seed=3))
        assert _has_plain_head(ddp), "DDP hid the plain head: full-vocabulary logits would be built"
        ids, mask = _rows(rank)
        _loss(ddp, ids, mask, chunk_tokens=4).backward()  # 4-token slices: several chunks per row
        torch.save({n: p.grad for n, p in ddp.module.named_parameters()}, os.path.join(out, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _join(ctx, seconds: float) -> None:
    """Wait for the spawned workers (raising what one raised), killing them after ``seconds``."""
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers still running after {seconds:g} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_ddp_chunked_head_gradients_are_all_reduced(tmp_path):
    _join(mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False), 150)
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1)]
    # one process, both ranks' rows, full logits path: DDP averages the two ranks' gradients
    model = tiny_llama(VOCAB, seed=3)
    total = sum(_loss(model, *_rows(r), chunk_tokens=10_000) for r in (0, 1)) / 2
    total.backward()
    for name, p in model.named_parameters():
        for r in (0, 1):
            torch.testing.assert_close(ranks[r][name], p.grad, rtol=1e-4, atol=1e-6, msg=f"rank {r} {name}")
