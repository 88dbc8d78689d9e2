"""``rexrag train``: RL-train a search agent (GRPO / PPO / REINFORCE++ / RLOO, optionally REX-RAG)."""

from __future__ import annotations

import argparse
from pathlib import Path

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


def _demo_retriever_index(out_dir: str) -> str:
    """Build (once) a BM25 index over the bundled demo corpus; return its directory."""
    from rexrag.demo import demo_file
    from rexrag.retrieval import build_index

    target = Path(out_dir) / "index"
    if not (target / "manifest.json").is_file():
        print(f"retrieval.index/url not set: building a BM25 index over the bundled demo corpus in {target}")
        build_index(demo_file("corpus.jsonl"), "bm25", target, overwrite=target.exists())
    return str(target)


def _examples(cfg):
    from rexrag.data import load_qa_files

    files = list(cfg.data.train_files)
    if not files:
        from rexrag.demo import demo_file

        files = [demo_file("train.jsonl")]
        print(f"data.train_files not set: using the bundled demo questions ({files[0].name})")
    return list(load_qa_files(files, skip_bad=cfg.data.skip_bad, limit=cfg.data.limit))


def _backend_name(name: str, world: int) -> str:
    """Under several processes the in-process vLLM engine would start its own distributed world
    inside accelerate's, so ``auto`` means hf there and an explicit ``vllm`` is refused."""
    from rexrag.errors import UserError

    if world > 1 and name == "vllm":
        raise UserError(f"rollout.backend=vllm runs in one process only (this run has {world}); use rollout.backend=hf")
    return "hf" if world > 1 and name == "auto" else name


def build_trainer(cfg, *, progress: bool = True, backend=None):
    """Model, tokenizer, retriever, data, SearchAgent and (if enabled) RexExplorer -> Trainer.

    ``backend``: an existing generation backend to reuse (the demo keeps one vLLM engine for all its
    phases); its weights are replaced by the policy's before the first rollout."""
    import torch
    from accelerate import Accelerator

    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import load_retriever
    from rexrag.rollout.agent import SearchAgent
    from rexrag.rollout.backends import build_backend, resolve_backend_name
    from rexrag.train.trainer import Trainer, seed_everything

    acc = Accelerator(cpu=not torch.cuda.is_available())
    if not (cfg.retrieval.index or cfg.retrieval.url):
        if acc.is_main_process:
            cfg.retrieval.index = _demo_retriever_index(cfg.trainer.out_dir)
        acc.wait_for_everyone()
        cfg.retrieval.index = str(Path(cfg.trainer.out_dir) / "index")
    # an unknown or not-installed backend fails here, before any model loads
    backend_name = None if backend is not None else resolve_backend_name(_backend_name(cfg.rollout.backend, acc.num_processes))
    seed_everything(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    model = load_model(cfg.model, device=acc.device)
    model.train()
    retriever = load_retriever(cfg.retrieval)
    seed = cfg.trainer.seed + 7919 * acc.process_index
    if backend is None:
        backend = build_backend(backend_name, model, tokenizer, cfg.rollout, device=acc.device, seed=seed)
    elif hasattr(backend, "generator"):
        backend.generator.manual_seed(seed)
    agent = SearchAgent(backend, tokenizer, retriever, cfg.rollout, topk=cfg.retrieval.topk, retries=cfg.retrieval.retries)
    explorer = None
    if cfg.rex.enabled:
        from rexrag.rex.explorer import RexExplorer

        explorer = RexExplorer(cfg.rex, cfg.rollout, tokenizer, seed=cfg.trainer.seed + acc.process_index,
                               clip_range=(cfg.algo.clip_low, cfg.algo.clip_high))
    return Trainer(cfg, model, tokenizer, _examples(cfg), agent=agent, explorer=explorer,
                   accelerator=acc, progress=progress)


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
