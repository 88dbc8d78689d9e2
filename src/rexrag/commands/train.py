"""``rexrag train``: RL-train a search agent (GRPO / PPO / REINFORCE++ / RLOO, optionally REX-RAG)."""

from __future__ import annotations

import argparse

from rexrag.train.build import build_trainer

HELP = """Examples:
  rexrag train --config configs/demo_cpu.yaml
  rexrag train --config configs/demo_cpu.yaml model.name_or_path=runs/warmup trainer.steps=20 rex.enabled=true
  rexrag train --config configs/demo_cpu.yaml --resume
  accelerate launch --config_file configs/accelerate/ddp.yaml -m rexrag.cli train --config configs/rexrag_grpo_3b.yaml
  rexrag train --help-config            # every key with its default and meaning

With neither retrieval.index nor retrieval.url set, a BM25 index over the bundled demo corpus is
built once into <trainer.out_dir>/index. With no data.train_files the bundled demo questions are used.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="RL-train a policy (GRPO / PPO / REINFORCE++ / RLOO, REX-RAG)",
                       description=__doc__, epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in trainer.out_dir")
    p.add_argument("--help-config", action="store_true", help="list every config key with default and doc, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run)


def _print_config_help() -> None:
    from rexrag.config import describe

    for key, default, text in describe():
        print(f"{key:40s} {default!r:28s} {text}")


def run(args) -> int:
    from rexrag.config import load_config

    if args.help_config:
        _print_config_help()
        return 0
    cfg = load_config(args.config or None, args.overrides)
    if args.resume:
        cfg.trainer.resume = True
    trainer = build_trainer(cfg, progress=not args.no_progress)
    history = trainer.train()
    if trainer.acc.is_main_process:
        if history:
            last = history[-1]
            print(f"trained to step {trainer.step_idx}: reward {last.get('reward/mean', float('nan')):.3f}, "
                  f"{trainer.nan_skips} skipped updates -> {cfg.trainer.out_dir}")
        else:
            print(f"nothing to do: {cfg.trainer.out_dir} is already at step {trainer.step_idx} of {cfg.trainer.steps}")
    return 0
