"""One-GPU REX-RAG smoke run: step time, phase split, tokens/s and peak GPU memory.

GPU machines here reach no model hub, so the policy is a *random-initialised* model of Qwen2.5-0.5B's
shape (24 layers, hidden 896, 14 query / 2 KV heads, MLP 4864, tied embeddings) built from a config.
The only tokenizer on hand offline is SmolLM2's, so the vocabulary is its 49,152 tokens instead of
Qwen's 151,936 (the LM head is ~44M parameters instead of ~136M). A random model writes no search
tags, so the run first teaches it the protocol with a short supervised warm-up (``rexrag warmup``,
from scratch, high learning rate); the RL steps then roll out multi-turn searches against BM25 over the
development corpus. Phases run as the CLI runs them (subprocesses), each timed:

  index   rexrag index --kind bm25 over the corpus
  warmup  rexrag warmup (bf16 autocast)
  train   rexrag train --config configs/gpu_smoke_qwen05b.yaml (3 REX-RAG GRPO steps)

  python bench/gpu_smoke.py --data-dir ../shared/data/derived --tokenizer DIR --out bench/results/gpu
  python bench/gpu_smoke.py ... --tiny     # a 2-layer model, to check the script on a CPU first

Writes ``gpu_smoke.json`` and ``gpu_smoke.md`` (per-step timings and memory) into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "gpu_smoke_qwen05b.yaml"
QWEN05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_SHAPE = dict(QWEN05B_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
STEP_KEYS = ("timing/step_s", "timing/gen_s", "timing/weight_sync_s", "timing/logprob_s", "timing/update_s",
             "timing/explore_s", "timing/tokens_per_s", "gen_tokens_per_s", "memory/cuda_max_allocated_gib",
             "memory/peak_rss_mb", "rollout/trajectories", "rollout/gen_tokens", "rollout/searches_mean",
             "rollout/time_retrieval_s", "rex/probes_kept", "reward/mean", "rollout/valid_format_rate")


def build_model(tokenizer_dir: Path, target: Path, tiny: bool) -> dict:
    """Random-initialised Qwen2 model of the chosen shape, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = TINY_SHAPE if tiny else QWEN05B_SHAPE
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, **shape, "vocab_size": len(tok)}


def run_phase(name: str, argv: list[str], log_dir: Path) -> float:
    """Run one CLI phase, its output to ``log_dir/<name>.log``; seconds taken (exit on failure)."""
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "rexrag.cli", *argv], stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f}s (exit {proc.returncode})", flush=True)
    if proc.returncode:
        print((log_dir / f"{name}.log").read_text()[-6000:])
        sys.exit(proc.returncode)
    return seconds


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def markdown(summary: dict) -> str:
    lines = [f"device: {summary['env'].get('device', 'cpu')}; torch {summary['env']['torch']}; "
             f"model {summary['model']['params_m']:.0f}M params; phases (s): "
             + ", ".join(f"{k} {v:.1f}" for k, v in summary["phases_s"].items()), "",
             "| step | " + " | ".join(k.split("/")[-1] for k in STEP_KEYS) + " |",
             "|" + "---|" * (len(STEP_KEYS) + 1)]
    for rec in summary["steps"]:
        lines.append(f"| {rec['step']} | " + " | ".join(f"{rec.get(k, float('nan')):.3g}" for k in STEP_KEYS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="folder with multihop_dev_corpus / hotpotqa_dev_ctx .flashrag.jsonl")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer directory (SmolLM2's works offline)")
    ap.add_argument("--out", required=True, help="folder for gpu_smoke.json / .md and the phase logs")
    ap.add_argument("--work", default="", help="scratch folder (default: <out>/work)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model, 4 questions per step: a CPU check of the script")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    data, out = Path(args.data_dir), Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    corpus = data / "multihop_dev_corpus.flashrag.jsonl"
    questions = data / "hotpotqa_dev_ctx.flashrag.jsonl"
    for f in (corpus, questions):
        if not f.is_file():
            ap.error(f"--data-dir {data}: {f.name} is missing")

    env = device_info()
    print(json.dumps(env), flush=True)
    model = build_model(Path(args.tokenizer), work / "model", args.tiny)
    print(f"model: {model['params_m']:.1f}M parameters (random init)", flush=True)
    device = "cuda" if env["cuda"] else "cpu"
    small = ["rollout.backend=hf", "data.batch_size=2", "rollout.n=2", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
             "rollout.max_new_tokens_per_turn=16"] if args.tiny else []
    if importlib.util.find_spec("vllm") is None:  # the lent GPU has no vLLM: the recipe's vllm would stop the run
        small.append("rollout.backend=hf")
    phases = {
        "index": run_phase("index", ["index", "--kind", "bm25", "--corpus", str(corpus), "--out", str(work / "index"),
                                     "--overwrite"], out),
        "warmup": run_phase("warmup", ["warmup", "--model", str(work / "model"), "--train-file", str(questions),
                                       "--index", str(work / "index"), "--n-examples", "512",
                                       "--steps", str(2 if args.tiny else args.warmup_steps), "--batch-size", "16",
                                       "--lr", "5e-4", "--device", device, *(["--bf16"] if env["cuda"] else []),
                                       "--out", str(work / "warm")], out),
        "train": run_phase("train", ["train", "--config", str(RECIPE), "--no-progress",
                                     f"model.name_or_path={work / 'warm'}", f"retrieval.index={work / 'index'}",
                                     f"data.train_files=[{questions}]", f"trainer.out_dir={work / 'run'}",
                                     f"trainer.steps={args.steps}", f"model.autocast_bf16={env['cuda']}", *small], out),
    }
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for rec in steps:  # sampled tokens per second of generation time
        rec["gen_tokens_per_s"] = rec.get("rollout/gen_tokens", 0.0) / max(rec.get("timing/gen_s", 0.0), 1e-9)
    summary = {"env": env, "model": model, "phases_s": phases, "recipe": str(RECIPE.relative_to(ROOT)),
               "steps": [{k: v for k, v in rec.items() if k in ("step", "gen_tokens_per_s") or k.startswith(("timing/", "memory/", "rollout/",
                                                                                     "reward/", "rex/"))}
                         for rec in steps]}
    (out / "gpu_smoke.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_smoke.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
