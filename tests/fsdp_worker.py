"""Worker for the two-process FSDP tests (tests/test_fsdp.py), run under
``accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml tests/fsdp_worker.py MODE OUT [override ...]``.

``gen``: greedy HF-backend generation with the sharded policy (ranks with different numbers of
rows, calls and lengths, so the decode steps must run in lockstep) against the same generation with
the unsharded model; writes OUT/gen_rank<r>.json.
``train``: the toy RL setting (per-group seeded sampling, KL to a sharded reference) trained with
FSDP for ``trainer.steps`` (resuming when ``trainer.resume=true``); writes OUT/info_rank<r>.json.
``reshard``: ``train`` under any launch (FSDP2, DDP, or plain ``python`` for one process), and right after
the checkpoint loads, the whole model and optimizer state as this layout holds it (gathered:
OUT/loaded.pt from the main process) and each process's torch RNG state (OUT/rng_rank<r>.pt);
tests/test_reshard.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer

from rexrag.rollout.engine import HFBackend, SamplingParams
from rexrag.sharding import is_fsdp_module, make_accelerator
from rexrag.train.trainer import Trainer

# rank -> generate() calls -> prompts; rank 0 makes two calls, rank 1 one short one
PROMPTS = {0: [[[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[3, 3, 3, 3, 3]]], 1: [[[9, 8]]]}
NEW_TOKENS = {0: [7, 4], 1: [2]}


def _generate(backend, rank: int) -> list[list[dict]]:
    out = []
    for prompts, n in zip(PROMPTS[rank], NEW_TOKENS[rank]):
        res = backend.generate(prompts, [[] for _ in prompts], SamplingParams(temperature=0.0, max_new_tokens=n))
        out.append([{"ids": r.token_ids, "lp": r.logprobs, "finish": r.finish} for r in res])
    backend.drain()
    return out


def gen(out: Path) -> None:
    acc = make_accelerator()
    rank = acc.process_index
    tok, model = toy_tokenizer(), toy_model()
    full = _generate(HFBackend(model, tok, device="cpu", seed=0), rank)  # unsharded: each process has all weights
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model, opt = acc.prepare(model, opt)
    from rexrag.sharding import Lockstep, dummy_forward

    backend = HFBackend(model, tok, device="cpu", seed=0)
    backend.lockstep = Lockstep(dummy_forward(model, acc.device))
    sharded = _generate(backend, rank)
    p = next(model.parameters())
    info = {"full": full, "sharded": sharded, "fsdp_module": is_fsdp_module(model), "param_type": type(p).__name__,
            "local_numel": p.to_local().numel() if hasattr(p, "to_local") else p.numel(), "numel": p.numel(),
            "dummy_forwards": backend.lockstep.dummy_forwards, "distributed_type": str(acc.distributed_type)}
    (out / f"gen_rank{rank}.json").write_text(json.dumps(info))
    acc.wait_for_everyone()


def train(out: Path, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    bad_rank = os.environ.get("REXRAG_TEST_NONFINITE_RANK")
    if bad_rank is not None and int(os.environ.get("RANK", "0")) == int(bad_rank):
        import rexrag.train.passes as passes_mod

        passes_mod._finite = lambda x: False  # this process alone sees a non-finite loss
    cfg = toy_config(out, "algo.kl_coef=0.01", "trainer.mini_batch_size=16", "trainer.micro_batch_size=4", *overrides)
    model = toy_model()
    roll = ToyRollout(model, per_group_seed=True)
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=roll, reward_fn=early_target_reward, progress=False)
    roll.trainer = tr
    hist = tr.train()
    p = next(tr.model.parameters())
    info = {"sharded": tr.sharded, "fsdp_module": is_fsdp_module(tr.model), "param_type": type(p).__name__,
            "reference_fsdp": is_fsdp_module(tr.reference), "steps": len(hist), "step_idx": tr.step_idx,
            "history": hist, "distributed_type": str(tr.acc.distributed_type)}
    (out / f"info_rank{tr.rank}.json").write_text(json.dumps(info))
    # this process's own copy (DDP: a full replica; FSDP: its shards), to compare replicas bitwise
    local = {n: (q.to_local() if hasattr(q, "to_local") else q).detach().clone() for n, q in tr.model.named_parameters()}
    torch.save(local, out / f"params_rank{tr.rank}.pt")
    tr.acc.wait_for_everyone()


def reshard(out: Path, overrides: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from rexrag.train import checkpoint as ckpt

    load = ckpt.load_checkpoint

    def load_and_dump(path, *, accelerator):
        state = load(path, accelerator=accelerator)
        torch.save(torch.get_rng_state(), out / f"rng_rank{accelerator.process_index}.pt")
        module, optimizers = ckpt._stateful(accelerator)
        model_sd, optim_sd = get_state_dict(module, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if accelerator.is_main_process:
            torch.save({"model": model_sd, "optim": optim_sd}, out / "loaded.pt")
        return state

    ckpt.load_checkpoint = load_and_dump
    train(out, overrides)


if __name__ == "__main__":
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    {"gen": lambda: gen(out_dir), "train": lambda: train(out_dir, sys.argv[3:]),
     "reshard": lambda: reshard(out_dir, sys.argv[3:])}[mode]()
