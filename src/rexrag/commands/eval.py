"""``rexrag eval``: score a model or checkpoint on QA sets (EM / F1 / cover-EM) and write a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rexrag.protocol import DEFAULT_TOPK

HELP = """Examples:
  rexrag eval --model runs/demo/train/checkpoints/step_000006/model --index runs/demo/index \\
              --dataset demo=src/rexrag/resources/demo/eval.jsonl --out runs/eval    # after `rexrag demo`
  rexrag eval --backend hf ...         # the transformers loop instead of vLLM
  rexrag eval --model smollm2-135m --benchmarks nq,hotpotqa,2wikimultihopqa --data-dir data \\
              --retriever-url http://127.0.0.1:8000/retrieve --method agent --limit 200 --out runs/eval

--data-dir layout (FlashRAG): DIR/<benchmark>/test.jsonl (or dev.jsonl / val.jsonl; otherwise the
first *test*, then *dev*, then *val* .jsonl/.parquet file, preferring names containing 'flashrag',
then the largest). Benchmarks: nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle.

Device: cuda when available (bf16 weights there when the GPU has bf16), else cpu in fp32; --device
and --dtype override. Data parallel: run it under `accelerate launch --num_processes N -m` (on a
CPU-only machine add --multi_gpu: torchrun workers over gloo); each process takes every N-th
question, and the main process merges the rows in the original order and writes the report:
  accelerate launch --num_processes 2 -m rexrag.cli eval --model smollm2-135m --benchmarks hotpotqa \
              --data-dir data --index runs/demo/index --out runs/eval_dp
"""


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model/checkpoint on QA sets (direct | rag | retrieve_once | agent)",
                       description=__doc__, epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model dir, `rexrag train`/`warmup` checkpoint (full or LoRA), or smollm2-135m")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=FILE", help="a QA file (FlashRAG jsonl or Search-R1 parquet; a parquet with several data_source values is scored per source); repeatable")
    p.add_argument("--benchmarks", default="", help="comma-separated benchmark names resolved under --data-dir")
    p.add_argument("--data-dir", default="", help="folder with one sub-folder per benchmark")
    p.add_argument("--index", default="", help="index directory built by `rexrag index`")
    p.add_argument("--retriever-url", default="", help="Search-R1-compatible /retrieve endpoint (instead of --index)")
    p.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="passages per search")
    p.add_argument("--method", default="agent", choices=["agent", "retrieve_once", "rag", "direct"],
                   help="agent: multi-turn search; retrieve_once: the agent's format with one search for the question "
                        "written for it, then one answer turn; rag / direct: one-shot baselines (see rexrag.eval.evaluate)")
    p.add_argument("--limit", type=int, default=0, help="at most N questions per dataset (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="questions decoded together")
    p.add_argument("--max-turns", type=int, default=4, help="agent: search turns before the answer-only turn")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per turn (agent) or per answer")
    p.add_argument("--template", default="rexrag", help="agent prompt template: rexrag | search-r1 | file | literal with {question}")
    p.add_argument("--label", default="", help="row label in the tables (default: model name + method)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", help="generation backend: auto (vllm when installed, else hf) | hf | vllm")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights: auto = bfloat16 on a GPU with bf16, float32 elsewhere")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (metrics.json, metrics.md, predictions.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rexrag.config import ModelConfig, RetrievalConfig
    from rexrag.eval.evaluate import EvalOptions, load_datasets, run_eval
    from rexrag.models import load_model, load_tokenizer
    from rexrag.rollout.backends import backend_line

    device, rank, world = eval_device(args.device)
    backend = args.backend
    if world > 1:  # the in-process vLLM engine would start a distributed world inside this one
        from rexrag.errors import UserError

        if backend == "vllm":
            raise UserError(f"--backend vllm runs in one process only (this run has {world}); use --backend hf")
        backend = "hf" if backend == "auto" else backend
    line = backend_line(backend, "--backend")  # an unknown or missing backend fails before any model loads
    if rank == 0:
        print(line, flush=True)
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device)
    opts = EvalOptions(method=args.method, topk=args.topk, batch_size=args.batch_size, max_turns=args.max_turns,
                       max_new_tokens=args.max_new_tokens, template=args.template, limit=args.limit,
                       seed=args.seed, device=str(device), backend=backend)
    benchmarks = [b for b in args.benchmarks.split(",") if b.strip()]
    datasets = load_datasets(args.dataset, benchmarks, args.data_dir or None, limit=args.limit)
    retriever = None
    if args.method != "direct":
        from rexrag.errors import UserError
        from rexrag.retrieval import load_retriever

        if not (args.index or args.retriever_url):
            raise UserError(f"--method {args.method} needs --index DIR or --retriever-url URL")
        retriever = load_retriever(RetrievalConfig(index=args.index, url=args.retriever_url, topk=args.topk))
    tokenizer = load_tokenizer(args.model)
    model = load_model(ModelConfig(name_or_path=args.model, dtype=dtype), device=device)
    parts = Path(args.model).parts
    # a train checkpoint is .../step_000123/model: name it by its step, not by "model"
    label = args.label or "/".join(parts[-2:] if parts and parts[-1] == "model" else parts[-1:])
    info = {"model": args.model, "method": args.method,
            "retriever": args.retriever_url or args.index or "none", "top-k": args.topk if retriever else 0}
    result = run_eval(datasets, model, tokenizer, retriever, opts, args.out, label, info)
    if rank != 0:  # data parallel: the main process merged the rows and wrote the report
        return 0
    per_source = {k: v for k, v in result["summary"].items() if k != "average"}
    if len(per_source) > 1:  # e.g. a merged Search-R1 test.parquet, scored per data_source
        for name, m in per_source.items():
            print(f"  {name}: EM {100 * m['em']:.1f}  F1 {100 * m['f1']:.1f}  cover-EM {100 * m['cover_em']:.1f}  ({m['n']} questions)")
    avg = result["summary"].get("average", {})
    print(f"EM {100 * avg.get('em', 0):.1f}  F1 {100 * avg.get('f1', 0):.1f}  cover-EM {100 * avg.get('cover_em', 0):.1f}"
          f"  ({avg.get('n', 0)} questions, {result['seconds']:.0f}s) -> {Path(args.out) / 'metrics.md'}")
    return 0


def eval_device(requested: str = ""):
    """(device, rank, world): ``requested`` (cpu | cuda | cuda:N), else cuda when available, else cpu.

    Under ``accelerate launch`` with several processes the process group is started here (gloo on
    CPU, nccl on GPUs) and each process gets its own GPU."""
    import os

    import torch

    from rexrag.eval.evaluate import data_parallel_rank

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not str(device).startswith("cuda"))
        if str(device).startswith("cuda"):
            device = str(state.device)
    rank, world = data_parallel_rank()
    return torch.device(device), rank, world


def auto_dtype(device) -> str:
    """bfloat16 on a GPU with bf16 support, float32 elsewhere (so CPU numbers do not change)."""
    import torch

    from rexrag.hardware import has_fast_bf16

    return "bfloat16" if torch.device(device).type == "cuda" and has_fast_bf16(device) else "float32"
