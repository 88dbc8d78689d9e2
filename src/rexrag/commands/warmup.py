"""``rexrag warmup``: teach a small model the search-tag protocol with a short supervised fine-tune."""

from __future__ import annotations

import argparse

HELP = """Example:
  rexrag index --corpus corpus.jsonl --kind bm25 --out indexes/bm25
  rexrag warmup --model smollm2-135m --train-file train.jsonl --index indexes/bm25 --out runs/warmup
  rexrag train --config configs/demo_cpu.yaml model.name_or_path=runs/warmup ...

Trajectories are built from the training questions and real retrieved passages (think, search,
information, optionally a second search, answer with the gold); only the model's own action tokens
are trained (retrieved text is masked out of the loss). The output directory is a normal
save_pretrained checkpoint that `rexrag train` and `rexrag eval` accept.
"""


def add_parser(sub) -> None:
    from rexrag.warmup import WarmupConfig

    d = WarmupConfig()
    p = sub.add_parser("warmup", help="format warm-up: short SFT on auto-built search trajectories",
                       description=__doc__, epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model dir or name (smollm2-135m = offline default)")
    p.add_argument("--train-file", action="append", default=[], help="QA file(s) (FlashRAG jsonl / Search-R1 parquet); default: bundled demo questions")
    p.add_argument("--index", default="", help="index directory built by `rexrag index`")
    p.add_argument("--retriever-url", default="", help="Search-R1-compatible /retrieve endpoint (instead of --index)")
    p.add_argument("--n-examples", type=int, default=d.n_examples, help="questions turned into trajectories (0 = all)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--max-obs-tokens", type=int, default=d.max_obs_tokens)
    p.add_argument("--second-hop", default=d.second_hop, choices=["auto", "never"])
    p.add_argument("--template", default=d.template)
    p.add_argument("--format", default=d.format, choices=["tags", "tool_calls"],
                   help="agent format taught: tags (default) | tool_calls (native calls through the chat template)")
    p.add_argument("--tool-parser", default=d.tool_parser, help="tool_calls: the call syntax taught: hermes | llama3_json")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0 = full fine-tune)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from rexrag.config import ModelConfig, RetrievalConfig
    from rexrag.data import demo_file, load_qa_files
    from rexrag.errors import UserError
    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import load_retriever
    from rexrag.warmup import WarmupConfig, run_warmup

    if not (args.index or args.retriever_url):
        raise UserError("warm-up needs a retriever: give --index DIR or --retriever-url URL")
    if args.train_file:
        examples = list(load_qa_files(args.train_file))
    else:
        examples = list(load_qa_files([demo_file("train.jsonl")]))
    cfg = WarmupConfig(n_examples=args.n_examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       topk=args.topk, max_obs_tokens=args.max_obs_tokens, second_hop=args.second_hop,
                       template=args.template, autocast_bf16=args.bf16, seed=args.seed, format=args.format,
                       tool_parser=args.tool_parser)
    retriever = load_retriever(RetrievalConfig(index=args.index, url=args.retriever_url, topk=args.topk))
    tokenizer = load_tokenizer(args.model)
    if cfg.format == "tool_calls":  # a tokenizer without a chat template: before the model loads
        from rexrag.rollout.tool_calls import require_chat_template, write_call

        require_chat_template(tokenizer, "--format tool_calls")
        write_call(cfg.tool_parser, "search", {})  # a parser we cannot write calls for: before the model loads
    torch_seed(args.seed)
    model = load_model(ModelConfig(name_or_path=args.model, lora_rank=args.lora_rank), device=args.device)
    summary = run_warmup(model, tokenizer, retriever, examples, cfg, args.out, device=args.device)
    losses = summary["losses"]
    print(f"warm-up: {summary['trajectories']} trajectories ({summary['two_hop']} two-hop), loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} in {summary['seconds_train']:.0f}s -> {args.out}")
    return 0


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
