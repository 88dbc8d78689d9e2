"""``rexrag train``: RL-train a search agent (GRPO / PPO / REINFORCE++ / RLOO, optionally REX-RAG)."""

from __future__ import annotations

import argparse
import os

from rexrag.train.build import build_trainer

HELP = """Examples:
  rexrag train --config configs/demo_cpu.yaml
  rexrag train --config configs/demo_cpu.yaml model.name_or_path=runs/warmup trainer.steps=20 rex.enabled=true
  rexrag train --resume trainer.out_dir=runs/demo_cpu        # continue with the run's saved config.yaml
  rexrag train --resume trainer.out_dir=runs/demo_cpu trainer.steps=20   # ... and train further
  rexrag train --config configs/demo_cpu.yaml --overwrite   # start over in an out_dir that holds a run
  accelerate launch --config_file configs/accelerate/ddp.yaml -m rexrag.cli train --config configs/rexrag_grpo_3b.yaml
  rexrag train --help-config            # every key with its default and meaning

With neither retrieval.index nor retrieval.url set, a BM25 index over the bundled demo corpus is
built once into <trainer.out_dir>/index. With no data.train_files the bundled demo questions are used.

The resolved config is saved as <trainer.out_dir>/config.yaml. --resume reads it: keys the command
line sets to other values are an error (naming them) unless --allow-override; trainer.steps,
save_every, keep_last, log_tensorboard and wandb_project may change. A fresh run refuses an out_dir
holding another run; --overwrite removes config.yaml, metrics.jsonl, checkpoints/ and tensorboard/
there (nothing else: a demo index/ is kept).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="RL-train a policy (GRPO / PPO / REINFORCE++ / RLOO, REX-RAG)",
                       description=__doc__, epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.steps=20")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in trainer.out_dir, with the run's saved config.yaml")
    p.add_argument("--allow-override", action="store_true",
                   help="with --resume: let command-line keys replace the run's saved values")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even if trainer.out_dir holds one (removes its config.yaml, metrics.jsonl, "
                        "checkpoints/, tensorboard/)")
    p.add_argument("--help-config", action="store_true", help="list every config key with default and doc, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--max-memory-gb", default=None, metavar="GIB",
                   help="host-memory cap in GiB for a CPU run: turns on gradient checkpointing, a token budget per "
                        "forward/backward and a smaller vLLM KV cache as far as needed (rexrag.memory_plan), or "
                        "stops with the floor for this model and configuration (exit 2) before anything loads")
    p.add_argument("--plan", action="store_true",
                   help="print the GPU memory plan of the config (what each GPU holds in each phase, the vLLM engine's "
                        "share) for --gpus x --gpu-memory-gb, then exit; offline, no model loads (rexrag.gpu_plan)")
    p.add_argument("--gpus", type=int, default=None, help="with --plan: processes, one a GPU (default: this machine's)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="with --plan: GiB of one GPU (default: this one's, else 80)")
    p.add_argument("--sharding", choices=("fsdp", "ddp"), default=None, help="with --plan: FSDP2 full shard (default) or DDP")
    p.set_defaults(func=run)


def _print_config_help() -> None:
    from rexrag.config import describe

    for key, default, text in describe():
        print(f"{key:40s} {default!r:28s} {text}")


def _resolve_config(args):
    """The command line's config; on resume the run's saved one (``rexrag.train.rundir``)."""
    from rexrag.config import load_config
    from rexrag.errors import UserError
    from rexrag.train import rundir

    cfg = load_config(args.config or None, args.overrides)
    resume = args.resume or cfg.trainer.resume
    if resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if args.allow_override and not resume:
        raise UserError("--allow-override applies to --resume only")
    if resume:
        keys = rundir.explicit_keys(args.config or None, args.overrides)
        return rundir.resume_config(cfg, keys, allow_override=args.allow_override)
    if args.overwrite and int(os.environ.get("RANK", "0")) == 0:  # one process clears (accelerate sets RANK)
        for path in rundir.clear_run(cfg.trainer.out_dir):
            print(f"--overwrite: removed {path}")
    return cfg


def _plan_memory(cfg, cap_gb: str) -> None:
    """Fit ``cfg`` to ``--max-memory-gb`` (rexrag.memory_plan) or raise its one-line error."""
    import torch

    from rexrag.errors import UserError
    from rexrag.memory import bound_heap_caching
    from rexrag.memory_plan import apply_plan, describe_run, parse_cap_gb, plan, workload_from_config

    if torch.cuda.is_available():
        raise UserError("--max-memory-gb plans host memory for CPU runs; on a GPU the engine's share is "
                        "rollout.vllm_gpu_memory_utilization")
    w = workload_from_config(cfg)
    what = describe_run(cfg)
    chosen = plan(w, parse_cap_gb(cap_gb, w, what), what)
    apply_plan(cfg, chosen)
    bound_heap_caching()  # the estimate's heap slack assumes freed activations go back to the OS, as in the demo
    print(chosen.summary())


def _print_backend(requested: str) -> None:
    """Say which generation backend runs (``auto`` resolves by what is installed), or stop (exit 2)
    before anything loads when ``auto`` finds a CUDA machine without vLLM; the main process prints."""
    from rexrag.rollout.backends import backend_line

    line = backend_line(requested)
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, flush=True)


def _print_gpu_plan(args) -> int:
    """``--plan``: the config's GPU memory plan as a table; a plan that cannot fit then stops (exit 2)."""
    from rexrag.config import load_config
    from rexrag.gpu_plan import plan_from_config, print_plan

    cfg = load_config(args.config or None, args.overrides)
    plan, source = plan_from_config(cfg, args.gpus, args.gpu_memory_gb, args.sharding)
    print_plan(plan, cfg.model.name_or_path, source)
    plan.check()
    return 0


def run(args) -> int:
    if args.help_config:
        _print_config_help()
        return 0
    if args.plan:
        return _print_gpu_plan(args)
    cfg = _resolve_config(args)
    _print_backend(cfg.rollout.backend)
    if args.max_memory_gb is not None:
        _plan_memory(cfg, args.max_memory_gb)
    from rexrag.gpu_plan import planned_gpu_memory

    with planned_gpu_memory(cfg):  # on CUDA: a phase that cannot fit stops here (exit 2), before any model loads
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
