"""Benchmark: multi-turn search-agent rollouts on SmolLM2-135M (CPU by default).

Measures sampled tokens/s of ``SearchAgent`` over ``HFBackend`` (batched, KV cache, finished rows
pruned) at several batch sizes, against a naive reference in the same process: the same agent
loop over a backend that calls ``model.generate`` one sequence at a time with the same sampling
settings and stop strings (transformers' ``stop_strings``), log-probs from ``output_scores``.
Also reports the time split (generation / retrieval / bookkeeping), peak resident memory
(``ru_maxrss``), and a greedy batch run three ways (same tokens): finished rows pruned (default),
kept masked in the batch (``prune=False``), and without cross-turn KV reuse (``reuse_cache=False``).

    python bench/rollout.py                      # batches 1,8,32; ~5-10 min on 2 CPU cores
    python bench/rollout.py --batches 1,8 --max-new 16 --naive-rows 4   # quicker
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
from rexrag.rollout.engine import GenOutput, HFBackend, SamplingParams

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
        "bookkeeping_share": m["rollout/time_bookkeeping_s"] / wall, "searches": int(m["rollout/searches"]),
        "turns": int(m["rollout/turns"]), "peak_rss_mb": peak_rss_mb(),
        "backend": dict(getattr(backend, "stats", {})),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-new", type=int, default=24, help="max_new_tokens_per_turn")
    ap.add_argument("--turns", type=int, default=2, help="max_turns (searches)")
    ap.add_argument("--naive-rows", type=int, default=4, help="rows the one-at-a-time reference runs")
    ap.add_argument("--obs", type=int, default=150, help="max_obs_tokens")
    ap.add_argument("--compare-batch", type=int, default=8,
                    help="greedy batch run pruned / masked (prune=False) / without KV reuse (0 = skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default; 1 avoids OpenMP stalls on a shared machine)")
    ap.add_argument("--json", default="", help="also write results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]

    t0 = time.perf_counter()
    tok = load_tokenizer("smollm2-135m")
    model = load_model(ModelConfig())
    corpus = load_corpus(DATA / "multihop_dev_corpus.flashrag.jsonl")
    retriever = BM25Retriever.from_passages(corpus)
    qa = list(load_qa(DATA / "hotpotqa_dev_ctx.flashrag.jsonl", limit=max(batches + [args.naive_rows, args.compare_batch])))
    print(f"setup {time.perf_counter() - t0:.1f}s: model + BM25 over {len(corpus)} passages; rss {peak_rss_mb():.0f} MB", flush=True)
    cfg = RolloutConfig(max_turns=args.turns, max_new_tokens_per_turn=args.max_new, max_total_tokens=2048,
                        max_obs_tokens=args.obs, temperature=1.0)
    HFBackend(model, tok, seed=0).generate([tok.encode("warm up")], [[]], SamplingParams(max_new_tokens=4))

    results = {"config": {"max_new_tokens_per_turn": args.max_new, "max_turns": args.turns, "max_obs_tokens": args.obs, "threads": torch.get_num_threads()}}
    torch.manual_seed(0)
    results["naive"] = run_agent(NaiveGenerateBackend(model, tok), tok, retriever, cfg, qa[: args.naive_rows])
    print("naive generate, one row at a time:", json.dumps(results["naive"]), flush=True)
    for b in batches:
        r = run_agent(HFBackend(model, tok, seed=0), tok, retriever, cfg, qa[:b])
        r["speedup_vs_naive"] = r["tok_per_s"] / results["naive"]["tok_per_s"]
        results[f"batch{b}"] = r
        print(f"batch {b}:", json.dumps(r), flush=True)
    if args.compare_batch:  # greedy, so all three variants sample the very same tokens
        greedy = dataclasses.replace(cfg, temperature=0.0)
        rows = qa[: args.compare_batch]
        for name, kw in (("pruned", {}), ("masked", {"prune": False}), ("no_reuse", {"reuse_cache": False})):
            r = run_agent(HFBackend(model, tok, seed=0, **kw), tok, retriever, greedy, rows)
            results[f"greedy{args.compare_batch}_{name}"] = r
            print(f"greedy batch {args.compare_batch} {name}:", json.dumps(r), flush=True)

    print("\n| run | rows | sampled tokens | wall s | tok/s | x naive | gen % | retrieval % | bookkeeping % | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    naive = results["naive"]["tok_per_s"]
    for name, r in results.items():
        if name == "config":
            continue
        print(f"| {name} | {r['rows']} | {r['gen_tokens']} | {r['wall_s']:.1f} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / naive:.2f} | "
              f"{100 * r['gen_share']:.1f} | {100 * r['retrieval_share']:.2f} | {100 * r['bookkeeping_share']:.2f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
