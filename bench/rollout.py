"""Benchmark: multi-turn search-agent rollouts on SmolLM2-135M, HF backend vs vLLM backend (CPU by default).

The same workload (``SearchAgent`` over BM25 on the shared 23,630-passage corpus, HotpotQA questions,
temperature 1) runs through each backend at several batch sizes: sampled tokens/s, wall split
(generation / retrieval / bookkeeping), prefix-cache hit rate, engine start-up (reported per backend
and to be added to any end-to-end figure), peak RSS (``ru_maxrss``, cumulative over the process), and
tokens/s against a decode roofline from this machine's *measured* matmul rate and 32 GB/s memory
bandwidth. A warmed-up checkpoint (``--model runs/demo/warmup``) makes the agent really search;
``--ignore-eos`` forces full-length turns (multi-turn through notices) with the untrained model.
Optionally a naive reference: ``model.generate`` one sequence at a time (``--naive-rows``).

    python bench/rollout.py --model runs/demo/warmup              # hf vs vllm at batches 8, 32, 128
    python bench/rollout.py --batches 8 --max-new 16 --backends vllm  # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

from rexrag.config import ModelConfig, RolloutConfig
from rexrag.data import load_corpus, load_qa
from rexrag.models import load_model, load_tokenizer
from rexrag.retrieval import BM25Retriever
from rexrag.rollout.agent import SearchAgent
from rexrag.rollout.backends import build_backend
from rexrag.rollout.engine import GenOutput, SamplingParams

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "derived"


class NaiveGenerateBackend:
    """Reference: ``model.generate`` on one sequence at a time (no batching across rows)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, stops, params: SamplingParams):
        outs = []
        for prompt, stop in zip(prompts, stops):
            ids = torch.tensor([prompt])
            kw = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens, top_k=params.top_k or None,
                      top_p=params.top_p, return_dict_in_generate=True, output_scores=True,
                      pad_token_id=self.tokenizer.pad_token_id, stop_strings=stop or None, tokenizer=self.tokenizer)
            if not params.greedy:
                kw["temperature"] = params.temperature
            with torch.inference_mode():
                res = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            new = res.sequences[0, len(prompt):].tolist()
            scores = self.model.compute_transition_scores(res.sequences, res.scores, normalize_logits=True)[0].tolist()
            finish = "eos" if new and new[-1] == self.tokenizer.eos_token_id else "length"
            text = self.tokenizer.decode(new)
            hit = next((s for s in stop if s in text), None)
            outs.append(GenOutput(new, scores[: len(new)], "stop" if hit else finish, hit))
        return outs


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_agent(backend, tok, retriever, cfg, examples) -> dict:
    agent = SearchAgent(backend, tok, retriever, cfg)
    t0 = time.perf_counter()
    trajs = agent.rollout(examples, n=1)
    wall = time.perf_counter() - t0
    m = agent.last_metrics
    gen = m["rollout/gen_tokens"]
    return {
        "rows": len(trajs), "gen_tokens": int(gen), "wall_s": wall, "tok_per_s": gen / wall,
        "gen_share": m["rollout/time_gen_s"] / wall, "retrieval_share": m["rollout/time_retrieval_s"] / wall,
        "bookkeeping_share": m["rollout/time_bookkeeping_s"] / wall, "searches": round(m["rollout/searches_per_traj"] * m["rollout/n"]),
        "turns": int(m["rollout/turns"]), "peak_rss_mb": peak_rss_mb(),
        "prefix_hit": m.get("rollout/prefix_cache_hit_rate", 0.0),
        "backend": dict(getattr(backend, "stats", {})),
    }


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.5) -> float:
    """Measured dense matmul rate of this machine in ``dtype`` (the compute roof for decoding)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def roofline_tok_s(n_params: int, batch: int, bytes_per_param: int, gflops: float, mem_gbs: float = 32.0) -> float:
    """Decode tokens/s if each step were bound only by reading the weights or by the matmul rate."""
    step_s = max(n_params * bytes_per_param / (mem_gbs * 1e9), 2 * n_params * batch / (gflops * 1e9))
    return batch / step_s


def make_backend(name: str, model, tok, cfg):
    """-> (backend from the registry, start-up seconds)."""
    t0 = time.perf_counter()
    backend = build_backend(name, model, tok, cfg, seed=0, max_batch=256)
    return backend, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="hf,vllm", help="generation backends to compare (same workload)")
    ap.add_argument("--batches", default="8,32,128")
    ap.add_argument("--model", default="smollm2-135m", help="a warmed-up checkpoint makes the agent search for real")
    ap.add_argument("--data-dir", default=str(DATA), help="folder with the development corpus and HotpotQA questions")
    ap.add_argument("--max-new", type=int, default=48, help="max_new_tokens_per_turn")
    ap.add_argument("--turns", type=int, default=2, help="max_turns (searches)")
    ap.add_argument("--ignore-eos", action="store_true", help="force full-length turns (multi-turn via notices)")
    ap.add_argument("--naive-rows", type=int, default=0, help="rows the one-at-a-time model.generate reference runs (0 = skip)")
    ap.add_argument("--obs", type=int, default=150, help="max_obs_tokens")
    ap.add_argument("--dtype", default="auto", help="vLLM engine dtype (auto: bf16 only with bf16 matrix units)")
    ap.add_argument("--compiled", action="store_true", help="vLLM with torch.compile (slower start-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the HF backend (0 = torch default)")
    ap.add_argument("--json", default="", help="also write results here")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    if not (data / "multihop_dev_corpus.flashrag.jsonl").is_file():
        ap.error(f"--data-dir {data}: no multihop_dev_corpus.flashrag.jsonl there (the development data set: "
                 "23,630 Wikipedia passages and HotpotQA dev questions)")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]

    t0 = time.perf_counter()
    tok = load_tokenizer(args.model)
    model = load_model(ModelConfig(name_or_path=args.model))
    corpus = load_corpus(data / "multihop_dev_corpus.flashrag.jsonl")
    retriever = BM25Retriever.from_passages(corpus)
    qa = list(load_qa(data / "hotpotqa_dev_ctx.flashrag.jsonl", limit=max(batches + [args.naive_rows])))
    print(f"setup {time.perf_counter() - t0:.1f}s: model + BM25 over {len(corpus)} passages; rss {peak_rss_mb():.0f} MB", flush=True)
    cfg = RolloutConfig(max_turns=args.turns, max_new_tokens_per_turn=args.max_new, max_total_tokens=2048,
                        max_obs_tokens=args.obs, temperature=1.0)
    from rexrag.hardware import default_compute_dtype

    dtype = default_compute_dtype(torch.device("cpu")) if args.dtype == "auto" else args.dtype
    n_params = sum(p.numel() for p in model.parameters())
    peaks = {d: matmul_peak_gflops(getattr(torch, d)) for d in ("float32", "bfloat16")}
    results = {"config": {"max_new_tokens_per_turn": args.max_new, "max_turns": args.turns, "max_obs_tokens": args.obs,
                          "threads": torch.get_num_threads(), "model": args.model, "ignore_eos": args.ignore_eos,
                          "vllm_dtype": dtype, "vllm_eager": not args.compiled, "matmul_gflops": peaks}}
    print("measured matmul GFLOP/s:", json.dumps(peaks), flush=True)
    if args.naive_rows:
        torch.manual_seed(0)
        results["naive"] = run_agent(NaiveGenerateBackend(model, tok), tok, retriever, cfg, qa[: args.naive_rows])
    for name in args.backends.split(","):
        engine_cfg = dataclasses.replace(cfg, engine_dtype=dtype, vllm_enforce_eager=not args.compiled, vllm_kv_cache_gb=2.0)
        backend, startup = make_backend(name, model, tok, engine_cfg)
        if args.ignore_eos:
            backend.eos_ids = set() if name == "hf" else []
        run_dtype = "float32" if name == "hf" else dtype
        for b in batches:
            r = run_agent(backend, tok, retriever, cfg, qa[:b])
            r.update(backend=name, startup_s=startup, dtype=run_dtype,
                     roofline_tok_s=roofline_tok_s(n_params, b, 4 if run_dtype == "float32" else 2, peaks[run_dtype]))
            r["roofline_frac"] = r["tok_per_s"] / r["roofline_tok_s"]
            results[f"{name}_batch{b}"] = r
            print(f"{name} batch {b}:", json.dumps(r), flush=True)
        if hasattr(backend, "close"):
            backend.close()
        del backend

    print("\n| run | rows | sampled tokens | turns | searches | wall s | tok/s | x hf | % roofline | gen % | retrieval % | bookkeeping % | prefix hit | start-up s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key == "config":
            continue
        hf = results.get(f"hf_batch{r['rows']}", r)
        print(f"| {key} | {r['rows']} | {r['gen_tokens']} | {r['turns']} | {r['searches']} | {r['wall_s']:.1f} | {r['tok_per_s']:.1f} | "
              f"{r['tok_per_s'] / hf['tok_per_s']:.2f} | {100 * r.get('roofline_frac', 0):.0f} | {100 * r['gen_share']:.1f} | "
              f"{100 * r['retrieval_share']:.2f} | {100 * r['bookkeeping_share']:.2f} | {r.get('prefix_hit', 0):.2f} | "
              f"{r.get('startup_s', 0):.1f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
