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

  memory  one RL step per condition (REX-RAG on, padded and packed; the critic on, ``gae``), each in its own
          process (the packed update's time against the padded one is reported), logging
          the GPU's free memory (``torch.cuda.mem_get_info`` after ``empty_cache``) at the start of each phase
          and its peak in use, beside what the GPU memory plan (``rexrag.gpu_plan``) predicts for that phase

  python bench/gpu_smoke.py --data-dir ../shared/data/derived --tokenizer DIR --out bench/results/gpu
  python bench/gpu_smoke.py ... --tiny     # a 2-layer model, to check the script on a CPU first

Writes ``gpu_smoke.json`` and ``gpu_smoke.md`` (per-step timings and memory, and the memory table per
condition from ``memory_<condition>.json``) into ``--out``. Off CUDA the memory columns are empty.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
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
# Conditions of the memory probes (each on top of the train phase's settings): REX-RAG on (padded, then packed:
# the packed update's time against the padded one on the same rollouts' shape), and the critic on.
MEMORY_PROBES = {"rex": ["rex.enabled=true", "algo.adv_estimator=grpo", "trainer.pack_sequences=false"],
                 "rex_packed": ["rex.enabled=true", "algo.adv_estimator=grpo", "trainer.pack_sequences=true"],
                 "critic": ["rex.enabled=false", "algo.adv_estimator=gae", "trainer.critic_lr=1e-5"]}
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


def run_phase(name: str, argv: list[str], log_dir: Path, program: list[str] | None = None) -> float:
    """Run one CLI phase (or ``program``), its output to ``log_dir/<name>.log``; seconds taken (exit on failure)."""
    start = time.perf_counter()
    program = program or [sys.executable, "-m", "rexrag.cli"]
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.run([*program, *argv], stdout=log, stderr=subprocess.STDOUT, check=False)
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


class PhaseMemory:
    """Free GPU memory at the start of each phase (after ``empty_cache``) and the most in use during it.

    In use at a phase's peak = (total - free at its start) + (the caching allocator's peak - what it held
    at the start). Phases may nest (the optimizer step inside the update): an inner phase folds its peak
    into the outer ones. Off CUDA nothing is measured."""

    def __init__(self):
        import torch

        self.cuda, self.stack, self.records = torch.cuda.is_available(), [], {}

    def enter(self, name: str) -> None:
        import gc

        import torch

        if not self.cuda:
            return
        torch.cuda.synchronize()
        for outer in self.stack:
            outer["peak"] = max(outer["peak"], torch.cuda.max_memory_reserved())
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        torch.cuda.reset_peak_memory_stats()
        self.stack.append({"name": name, "free": free, "total": total, "held": torch.cuda.memory_reserved(), "peak": 0})

    def exit(self) -> None:
        import torch

        if not self.cuda:
            return
        torch.cuda.synchronize()
        f = self.stack.pop()
        peak = max(f["peak"], torch.cuda.max_memory_reserved())
        for outer in self.stack:
            outer["peak"] = max(outer["peak"], peak)
        used = f["total"] - f["free"] + max(0, peak - f["held"])
        rec = self.records.setdefault(f["name"], {"free_at_start_gib": f["free"] / 2**30, "peak_used_gib": 0.0,
                                                  "total_gib": f["total"] / 2**30})
        rec["free_at_start_gib"] = min(rec["free_at_start_gib"], f["free"] / 2**30)
        rec["peak_used_gib"] = max(rec["peak_used_gib"], used / 2**30)

    def wrap(self, obj, attr: str, name: str) -> None:
        """Measure every call of ``obj.attr`` as phase ``name`` (skipped when ``obj`` has no such attribute)."""
        fn = getattr(obj, attr, None)
        if fn is None:
            return

        def measured(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        setattr(obj, attr, measured)


def train_overrides(work: Path, questions: Path, cuda: bool, tiny: bool, steps: int, out_dir: Path) -> list[str]:
    """The train phase's settings: the random model, BM25, the questions (and the small ones of --tiny)."""
    small = ["rollout.backend=hf", "data.batch_size=2", "rollout.n=2", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
             "rollout.max_new_tokens_per_turn=16"] if tiny else []
    if importlib.util.find_spec("vllm") is None:  # the lent GPU has no vLLM: the recipe's vllm would stop the run
        small.append("rollout.backend=hf")
    return [f"model.name_or_path={work / 'warm'}", f"retrieval.index={work / 'index'}", f"data.train_files=[{questions}]",
            f"trainer.out_dir={out_dir}", f"trainer.steps={steps}", f"model.autocast_bf16={cuda}", *small]


def probe_memory(label: str, overrides: list[str], out: Path) -> dict:
    """One RL step of the recipe with ``overrides`` in this process, each phase measured (:class:`PhaseMemory`)
    beside the GPU memory plan's prediction for it; written to ``out/memory_<label>.json``."""
    import torch

    from rexrag.config import load_config
    from rexrag.gpu_plan import GIB, plan_from_config, total
    from rexrag.train.build import build_trainer

    cfg = load_config(RECIPE, overrides)
    cuda = torch.cuda.is_available()
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    plan, source = plan_from_config(cfg, gpus=1, gpu_memory_gb=gpu_gb, sharding="ddp")
    mem = PhaseMemory()
    mem.enter("load")
    trainer = build_trainer(cfg, progress=False)
    mem.exit()
    mem.wrap(trainer.colocation, "before_rollout", "weight sync")
    mem.wrap(trainer, "rollout_fn", "rollout")
    mem.wrap(trainer, "score_fn", "probe scoring")
    for method in ("_old_logprobs", "_ref_logprobs", "_values"):
        mem.wrap(trainer, method, "log-probs")
    mem.wrap(trainer, "update", "update")
    mem.wrap(trainer.optimizer, "step", "optimizer step")
    last = trainer.train()[-1]
    rows = [{"phase": name, "predicted_gib": total(parts) / GIB, **mem.records.get(name, {})}
            for name, parts in plan.phases.items()]
    result = {"label": label, "overrides": overrides, "plan_share": plan.share, "plan_problem": plan.problem,
              "shape_source": source, "cuda": cuda, "phases": rows,
              "update_s": last.get("timing/update_s"), "padding_ratio": last.get("update/padding_ratio")}
    (out / f"memory_{label}.json").write_text(json.dumps(result, indent=1))
    return result


def memory_markdown(result: dict) -> str:
    """One condition's table: the plan's prediction beside the measured peak and free memory, per phase."""
    def cell(rec, key):
        return f"{rec[key]:.2f}" if key in rec else "n/a"

    lines = [f"memory, {result['label']} ({' '.join(result['overrides'][-3:])}); measured on "
             f"{'this GPU' if result['cuda'] else 'no GPU (CPU run: nothing measured)'}:", "",
             "| phase | predicted in use (GiB) | measured peak in use (GiB) | free at phase start (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['predicted_gib']:.2f} | {cell(r, 'peak_used_gib')} | {cell(r, 'free_at_start_gib')} |"
              for r in result["phases"]]
    if result.get("update_s") is not None:
        lines += ["", f"update {result['update_s']:.3g} s, tokens computed per real token "
                      f"{result.get('padding_ratio') or float('nan'):.3f}"]
    return "\n".join(lines) + "\n"


def packing_markdown(memory: list[dict]) -> str:
    """The packed update against the padded one (one step each, same recipe and shape)."""
    by = {m["label"]: m for m in memory}
    padded, packed = by.get("rex", {}), by.get("rex_packed", {})
    if not (padded.get("update_s") and packed.get("update_s")):
        return ""
    return (f"packed vs padded update (one REX-RAG step each): {padded['update_s']:.3g} s -> {packed['update_s']:.3g} s "
            f"({padded['update_s'] / packed['update_s']:.2f}x); tokens computed per real token "
            f"{padded.get('padding_ratio') or float('nan'):.3f} -> {packed.get('padding_ratio') or float('nan'):.3f}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="folder with multihop_dev_corpus / hotpotqa_dev_ctx .flashrag.jsonl")
    ap.add_argument("--tokenizer", help="a tokenizer directory (SmolLM2's works offline)")
    ap.add_argument("--out", required=True, help="folder for gpu_smoke.json / .md and the phase logs")
    ap.add_argument("--work", default="", help="scratch folder (default: <out>/work)")
    ap.add_argument("--tiny", action="store_true", help="2-layer model, 4 questions per step: a CPU check of the script")
    ap.add_argument("--warmup-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--probe-memory", default="", metavar="LABEL", help=argparse.SUPPRESS)  # one memory probe (internal)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.probe_memory:
        print(memory_markdown(probe_memory(args.probe_memory, args.set, out)))
        return
    if not (args.data_dir and args.tokenizer):
        ap.error("--data-dir and --tokenizer are required")
    data = Path(args.data_dir)
    work = Path(args.work) if args.work else out / "work"
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
    phases = {
        "index": run_phase("index", ["index", "--kind", "bm25", "--corpus", str(corpus), "--out", str(work / "index"),
                                     "--overwrite"], out),
        "warmup": run_phase("warmup", ["warmup", "--model", str(work / "model"), "--train-file", str(questions),
                                       "--index", str(work / "index"), "--n-examples", "512",
                                       "--steps", str(2 if args.tiny else args.warmup_steps), "--batch-size", "16",
                                       "--lr", "5e-4", "--device", device, *(["--bf16"] if env["cuda"] else []),
                                       "--out", str(work / "warm")], out),
        "train": run_phase("train", ["train", "--config", str(RECIPE), "--no-progress",
                                     *train_overrides(work, questions, env["cuda"], args.tiny, args.steps, work / "run")], out),
    }
    memory = []
    for label, extra in MEMORY_PROBES.items():  # each condition in its own process: one step, every phase measured
        shutil.rmtree(work / f"memory_{label}", ignore_errors=True)  # a rerun starts its run afresh
        sets = train_overrides(work, questions, env["cuda"], args.tiny, 1, work / f"memory_{label}") + extra
        phases[f"memory_{label}"] = run_phase(f"memory_{label}", ["--probe-memory", label, "--out", str(out),
                                                                  *[f"--set={kv}" for kv in sets]],
                                              out, program=[sys.executable, str(Path(__file__).resolve())])
        memory.append(json.loads((out / f"memory_{label}.json").read_text()))
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for rec in steps:  # sampled tokens per second of generation time
        rec["gen_tokens_per_s"] = rec.get("rollout/gen_tokens", 0.0) / max(rec.get("timing/gen_s", 0.0), 1e-9)
    summary = {"env": env, "model": model, "phases_s": phases, "recipe": str(RECIPE.relative_to(ROOT)), "memory": memory,
               "steps": [{k: v for k, v in rec.items() if k in ("step", "gen_tokens_per_s") or k.startswith(("timing/", "memory/", "rollout/",
                                                                                     "reward/", "rex/"))}
                         for rec in steps]}
    report = markdown(summary) + "".join("\n" + memory_markdown(m) for m in memory) + "\n" + packing_markdown(memory)
    (out / "gpu_smoke.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_smoke.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
