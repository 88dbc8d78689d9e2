"""Worker for tests/test_packing_fsdp.py, run under
``accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml tests/packing_fsdp_worker.py OUT``.

Each process keeps an unsharded copy of a tiny Llama (tied and untied head), computes the plain head's
log-probs (whole logits, ``log_softmax``) and gradients for both processes' rows, then shards the model
with FSDP2 and runs ``models.sequence_logprobs`` (the chunked head, 5-token slices; padded and packed)
on its own rows. Writes OUT/head_rank<r>.json: max differences of log-probs and of the gathered
(averaged) gradients, and what the sharded forward saw (weight dtypes, the mixed-precision policy).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from rexrag.config import ModelConfig
from rexrag.logprobs import _FSDP_HEAD, _has_plain_head, sequence_logprobs
from rexrag.models import tiny_llama
from rexrag.sharding import is_fsdp_module, make_accelerator, set_fsdp_mixed_precision

VOCAB = 48


def rows(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    am = torch.zeros_like(ids)
    for i, n in enumerate([9, 4 + rank, 6]):
        am[i, :n] = 1
    return ids, am


def weights(lp: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1.0, 1.5, lp.numel()).view_as(lp)


def plain_head(model, ids, am) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference: whole logits, log_softmax, gather; zeros where sequence_logprobs puts them."""
    model.zero_grad()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp * (am[:, 1:] * am[:, :-1])], 1)
    (lp * weights(lp)).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def run(acc, tied: bool, mp: str, pack: bool) -> dict:
    rank, world = acc.process_index, acc.num_processes
    model = tiny_llama(VOCAB, hidden=32, layers=2, heads=2, seed=7, tie_word_embeddings=tied)
    model.train()
    full = copy.deepcopy(model)
    refs = [plain_head(full, *rows(r)) for r in range(world)]
    ref_grad = {n: sum(g[n] for _, g in refs) / world for n in refs[0][1]}  # FSDP averages over processes
    dtype = set_fsdp_mixed_precision(acc, ModelConfig(fsdp_mixed_precision=mp))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = acc.prepare(model, opt)
    seen = {}

    def saw(key):
        def hook(module, args):  # the weight a forward computes with (None: the inputs stay as they are)
            seen.setdefault(key, f"{type(module.weight).__name__}:{module.weight.dtype}")
        return hook

    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(saw("layer_weight"))
    model.get_output_embeddings().register_forward_pre_hook(saw("head_weight"))
    ids, am = rows(rank)
    lp = sequence_logprobs(model, ids, am, chunk_tokens=5, pack=pack)
    (lp * weights(lp)).sum().backward()
    diff_g = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor()
        diff_g[n] = float((g - ref_grad[n]).abs().max() / ref_grad[n].abs().max().clamp(min=1e-12))
    policy = acc.state.fsdp_plugin.mixed_precision_policy
    p0 = next(model.parameters())
    return {"tied": tied, "mp": mp, "pack": pack, "dtype": str(dtype), "fsdp": is_fsdp_module(model),
            "plain_head": _has_plain_head(model), "method_registered": _FSDP_HEAD in model.__dict__,
            "param": type(p0).__name__ + ":" + str(p0.dtype), "grad_dtype": str(p0.grad.dtype),
            "policy": None if policy is None else [str(policy.param_dtype), str(policy.reduce_dtype)],
            "lp_max_abs_diff": float((lp.detach() - refs[rank][0]).abs().max()), "grad_max_rel_diff": max(diff_g.values()),
            **seen}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    acc = make_accelerator()
    cases = [run(acc, tied, mp, pack) for tied, mp, pack in
             [(False, "float32", False), (True, "float32", True), (False, "bfloat16", True)]]
    (out / f"head_rank{acc.process_index}.json").write_text(json.dumps(cases))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
