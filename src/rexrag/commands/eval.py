"""``rexrag eval``: score a model or checkpoint on QA sets (EM / F1 / cover-EM) and write a report."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rexrag.protocol import DEFAULT_TOPK

if TYPE_CHECKING:
    from rexrag.config import RetrievalConfig

HELP = """Examples:
  rexrag eval --model runs/demo/train/checkpoints/step_000006/model --index runs/demo/index \\
              --dataset demo=src/rexrag/resources/demo/eval.jsonl --out runs/eval    # after `rexrag demo`
  rexrag eval --backend hf ...         # the transformers loop instead of vLLM
  rexrag eval --model smollm2-135m --benchmarks nq,hotpotqa,2wikimultihopqa --data-dir data \\
              --retriever-url http://127.0.0.1:8000/retrieve --method agent --limit 200 --out runs/eval

--data-dir layout (FlashRAG): DIR/<benchmark>/test.jsonl (or dev.jsonl / val.jsonl; otherwise the
first *test*, then *dev*, then *val* .jsonl/.parquet file, preferring names containing 'flashrag',
then the largest). Benchmarks: nq triviaqa popqa hotpotqa 2wikimultihopqa musique bamboogle.

A training run: --from-run OUT_DIR evaluates the run's latest checkpoint (or --model) with the run's
template, turns, token limits, retrieval settings and backend (its saved config.yaml; data.eval_files
when no dataset is given); a flag given on the command line wins:
  rexrag eval --from-run runs/rex --benchmarks nq,hotpotqa --data-dir data --out runs/rex/eval

Device: cuda when available (bf16 weights there when the GPU has bf16), else cpu in fp32; --device
and --dtype override. Data parallel: run it under `accelerate launch --num_processes N -m` (on a
CPU-only machine add --multi_gpu: torchrun workers over gloo); each process takes every N-th
question with its own vLLM engine (or HF loop), and the main process merges the rows in the original
order and writes the report:
  accelerate launch --num_processes 2 -m rexrag.cli eval --model smollm2-135m --benchmarks hotpotqa \
              --data-dir data --index runs/demo/index --out runs/eval_dp
"""

# EvalOptions field <- the run config key `--from-run` takes it from (when its flag is not given)
RUN_KEYS = {
    "topk": ("retrieval", "topk"),
    "max_turns": ("rollout", "max_turns"),
    "max_new_tokens": ("rollout", "max_new_tokens_per_turn"),
    "max_obs_tokens": ("rollout", "max_obs_tokens"),
    "max_total_tokens": ("rollout", "max_total_tokens"),
    "max_query_chars": ("rollout", "max_query_chars"),
    "template": ("rollout", "template"),
    "format": ("rollout", "format"),
    "tool_parser": ("rollout", "tool_parser"),
    "final_answer": ("rollout", "final_answer"),
    "tools": ("rollout", "tools"),
    "backend": ("rollout", "backend"),
    "engine_dtype": ("rollout", "engine_dtype"),
    "kv_cache_gb": ("rollout", "vllm_kv_cache_gb"),
    "limit": ("data", "eval_limit"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model/checkpoint on QA sets (direct | rag | retrieve_once | agent)",
                       description=__doc__, epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir, `rexrag train`/`warmup` checkpoint (full or LoRA), or smollm2-135m "
                   "(default: the --from-run run's latest checkpoint, else smollm2-135m)")
    p.add_argument("--from-run", default="", metavar="OUT_DIR", help="a `rexrag train` run directory: its latest checkpoint "
                   "with its saved settings (template, turns, token limits, retrieval, backend); flags given here win")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=FILE", help="a QA file (FlashRAG jsonl or Search-R1 parquet; a parquet with several data_source values is scored per source); repeatable")
    p.add_argument("--benchmarks", default="", help="comma-separated benchmark names resolved under --data-dir")
    p.add_argument("--data-dir", default="", help="folder with one sub-folder per benchmark")
    p.add_argument("--index", default="", help="index directory built by `rexrag index`")
    p.add_argument("--retriever-url", default="", help="Search-R1-compatible /retrieve endpoint (instead of --index)")
    p.add_argument("--topk", type=int, default=None, help=f"passages per search (default {DEFAULT_TOPK})")
    p.add_argument("--method", default="agent", choices=["agent", "retrieve_once", "rag", "direct"],
                   help="agent: multi-turn search; retrieve_once: the agent's format with one search for the question "
                        "written for it, then one answer turn; rag / direct: one-shot baselines (see rexrag.eval.evaluate)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions per dataset (default 0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="questions decoded together (the vLLM engine's max_num_seqs)")
    p.add_argument("--max-turns", type=int, default=None, help="agent: search turns before the answer-only turn (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per turn (agent) or per answer (default 256)")
    p.add_argument("--max-obs-tokens", type=int, default=None, help="retrieved text inserted per search, in tokens (default 500)")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="prompt + response tokens of one question, the engine's context (default 4096)")
    p.add_argument("--template", default=None, help="agent prompt template: rexrag (default) | search-r1 | file | literal with {question}")
    p.add_argument("--format", default=None, choices=["tags", "tool_calls"],
                   help="agent format: tags (default: Search-R1's raw-text tags) | tool_calls (the chat template's native tool calls)")
    p.add_argument("--tool-parser", default=None, help="tool_calls: how calls are read: hermes (default) | llama3_json")
    p.add_argument("--final-answer", default=None, choices=["auto", "tag", "message"],
                   help="tool_calls: the answer in the final message: auto (default) | tag | message")
    p.add_argument("--tools", default=None, type=lambda s: tuple(t for t in s.split(",") if t),
                   help="tool_calls: comma-separated tools (registered names or dotted paths; default: search)")
    p.add_argument("--label", default="", help="row label in the tables (default: model name + method)")
    p.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--backend", default=None, help="generation backend: auto (default: vllm when installed, else hf) | hf | vllm")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights: auto = bfloat16 on a GPU with bf16, float32 elsewhere")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (metrics.json, metrics.md, predictions.jsonl)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rexrag.config import ModelConfig
    from rexrag.eval.evaluate import EvalOptions, load_datasets, run_eval
    from rexrag.models import load_model, load_tokenizer
    from rexrag.rollout.backends import backend_line

    settings = eval_settings(args)  # a bad --from-run stops here, before anything loads
    device, rank, world = eval_device(args.device)
    line = backend_line(settings.options["backend"], "--backend")  # an unknown or missing backend fails before any model loads
    if rank == 0:
        print(line, flush=True)
        if settings.run_line:
            print(settings.run_line, flush=True)
    dtype = args.dtype if args.dtype != "auto" else auto_dtype(device)
    opts = EvalOptions(method=args.method, batch_size=args.batch_size, seed=args.seed, device=str(device),
                       **settings.options)
    benchmarks = [b for b in args.benchmarks.split(",") if b.strip()]
    datasets = load_datasets(settings.datasets, benchmarks, args.data_dir or None, limit=settings.options["limit"])
    retriever = None
    if args.method != "direct":
        from rexrag.errors import UserError
        from rexrag.retrieval import load_retriever

        if not (settings.retrieval.index or settings.retrieval.url):
            raise UserError(f"--method {args.method} needs --index DIR or --retriever-url URL")
        retriever = load_retriever(settings.retrieval)
    tokenizer = load_tokenizer(settings.model)
    if opts.format == "tool_calls":  # a tokenizer without a chat template: before the model loads
        from rexrag.rollout.tool_calls import require_chat_template

        require_chat_template(tokenizer, "--format tool_calls")
    model = load_model(ModelConfig(name_or_path=settings.model, dtype=dtype), device=device)
    label = args.label or _label(settings.model, args.from_run)
    info = {"model": settings.model, "method": args.method, "retriever": settings.retrieval.url or settings.retrieval.index or "none",
            "top-k": opts.topk if retriever else 0, **({"run": args.from_run} if args.from_run else {})}
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


def _label(model: str, run: str = "") -> str:
    """A train checkpoint (.../step_000123/model) is named by its step (and its run with --from-run)."""
    parts = Path(model).parts
    if len(parts) >= 2 and parts[-1] == "model":
        return f"{Path(run).name}/{parts[-2]}" if run and Path(model).is_relative_to(Path(run).expanduser()) else "/".join(parts[-2:])
    return parts[-1] if parts else model


@dataclass
class EvalSettings:
    """What ``rexrag eval`` runs with once the command line and (``--from-run``) the run's config are merged."""

    model: str
    options: dict  # the EvalOptions fields in RUN_KEYS
    retrieval: RetrievalConfig
    datasets: list[str]  # --dataset specs
    run_line: str = ""  # what was taken from the run, said once at start-up


def eval_settings(args) -> EvalSettings:
    """Command-line flags first, then the ``--from-run`` run's saved config, then ``EvalOptions``' defaults.
    Nothing is loaded: a directory without a run config (or without a checkpoint, when no ``--model``) is
    a one-line ``UserError`` here."""
    from dataclasses import fields, replace

    from rexrag.config import RetrievalConfig
    from rexrag.eval.evaluate import EvalOptions
    from rexrag.models import DEFAULT_MODEL

    cfg, model = _from_run(args) if args.from_run else (None, args.model or DEFAULT_MODEL)
    defaults = {f.name: f.default for f in fields(EvalOptions)}
    options, taken = {}, []
    for name, (section, key) in RUN_KEYS.items():
        given = getattr(args, name, None)
        if given is not None:
            options[name] = given
        elif cfg is not None:
            options[name] = getattr(getattr(cfg, section), key)
            taken.append(f"{section}.{key}={options[name]}")
        else:
            options[name] = defaults.get(name, 0)
    retrieval = cfg.retrieval if cfg is not None else RetrievalConfig()
    where = {"index": args.index, "url": args.retriever_url} if args.index or args.retriever_url else {}
    if cfg is not None and not where:
        taken.append(f"retrieval={retrieval.url or retrieval.index or 'none'}")
    retrieval = replace(retrieval, topk=options["topk"], **where)  # checked again (RetrievalConfig.__post_init__)
    datasets = list(args.dataset)
    if cfg is not None and not datasets and not args.benchmarks:
        datasets = list(cfg.data.eval_files)
        taken.append(f"data.eval_files={datasets}")
    line = f"from run {args.from_run}: model {model}; {', '.join(taken)}" if cfg is not None else ""
    return EvalSettings(model=model, options=options, retrieval=retrieval, datasets=datasets, run_line=line)


def _from_run(args):
    """(the run's saved config, the model to evaluate: --model, else the run's latest exported checkpoint)."""
    from rexrag.errors import ConfigError, UserError
    from rexrag.train.checkpoint import latest_checkpoint
    from rexrag.train.rundir import CONFIG_FILE, load_saved_config

    run = Path(args.from_run).expanduser()
    if not run.is_dir():
        raise UserError(f"--from-run {run}: no such directory (give the trainer.out_dir of a `rexrag train` run)")
    try:
        cfg = load_saved_config(run)
    except ConfigError as exc:
        raise UserError(f"--from-run {run}: its {CONFIG_FILE} is not a valid run config ({str(exc).split('; restore')[0]})") from None
    if cfg is None:
        raise UserError(f"--from-run {run}: no run config ({run / CONFIG_FILE} does not exist); give the trainer.out_dir "
                        "of a `rexrag train` run")
    if args.model:
        return cfg, args.model
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(f"--from-run {run}: the run has no intact checkpoint in {run / 'checkpoints'} (trainer.save_every "
                        "saves them; the last step always does); or give --model")
    return cfg, str(ckpt / "model")


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
