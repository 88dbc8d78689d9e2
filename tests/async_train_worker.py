"""Two trainer processes with a rollout worker each (tests/test_async_rollout.py):
``accelerate launch [--multi_gpu | --config_file configs/accelerate/cpu_fsdp.yaml] --num_processes 2
async_train_worker.py OUT`` (DDP, or FSDP2: the weight push then gathers every tensor on both processes).

Trains the toy setting with ``rollout.mode=async`` (k = 1); every process writes OUT/rank<r>.json: the group ids it
trained per step, the staleness per step, and a checksum of its final parameters (DDP keeps them equal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rexrag.train.async_source import AsyncSource
from rexrag.train.trainer import Trainer
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer


def main(out: str) -> None:
    torch.set_num_threads(1)
    cfg = toy_config(out, "trainer.steps=3", "rollout.mode=async", "rollout.max_staleness=1", "rollout.worker_timeout_s=120")
    model = toy_model()
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=ToyRollout(model), reward_fn=early_target_reward,
                 progress=False)
    source = AsyncSource(cfg, factory="async_fakes:build_toy", threads=1, rank=tr.rank, world=tr.world)
    tr.rollout_source = source.start()
    trained, sample = [], source.sample

    def recording(trainer, examples, t):
        trained.append([ex.group_id for ex in examples])
        return sample(trainer, examples, t)

    source.sample = recording
    try:
        hist = tr.train()
    finally:
        source.close()
    # DDP replicas must stay equal; FSDP2 shards differ by construction
    params = None if tr.sharded else sum(float(p.double().sum()) for p in tr.acc.unwrap_model(tr.model).parameters())
    Path(out, f"rank{tr.rank}.json").write_text(json.dumps({"trained": trained, "params": params, "sharded": tr.sharded,
                                                            "staleness": [m["async/staleness_max"] for m in hist]}))


if __name__ == "__main__":
    main(sys.argv[1])
