"""Worker for the multi-process test: ``accelerate launch [--num_processes N] train_worker.py OUT``.

Trains the toy setting with per-group seeded sampling (so samples do not depend on the process a
prompt lands on) and saves the final parameters to OUT/final_params.pt from the main process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rexrag.train.trainer import Trainer
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer


def main(out: str) -> None:
    torch.set_num_threads(1)
    cfg = toy_config(out, "trainer.steps=3", "algo.kl_coef=0.01", "trainer.mini_batch_size=16", "trainer.micro_batch_size=4")
    model = toy_model()
    roll = ToyRollout(model, per_group_seed=True)
    tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=roll, reward_fn=early_target_reward, progress=False)
    roll.trainer = tr
    tr.train()
    if tr.acc.is_main_process:
        params = {n: p.detach().cpu().clone() for n, p in tr.acc.unwrap_model(tr.model).named_parameters()}
        torch.save(params, Path(out) / "final_params.pt")
    tr.acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
