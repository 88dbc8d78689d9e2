"""Benchmark rexrag.models: the one-off SmolLM2 GGUF import, the cached load, and log-prob memory.

    python bench/models.py [--batch 4] [--seq 512]

1. ``resolve_model_path("smollm2-135m")`` into a fresh temporary cache (GGUF -> fp32 HF dir), then
   again (cached), then ``load_model`` + ``load_tokenizer`` from the cache.
2. ``sequence_logprobs`` (decoder + chunked LM head, logit - logsumexp) against the reference
   ``log_softmax(model(x).logits).gather`` on SmolLM2 at [batch, seq]: wall time (forward and
   forward+backward) and peak RSS growth, each measured in a fresh subprocess, plus the max abs
   difference of the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def logprob_variant(variant: str, batch: int, seq: int) -> dict:
    """Run one log-prob variant on SmolLM2 in this process; returns timings and peak RSS growth."""
    import torch

    from rexrag.config import ModelConfig
    from rexrag.models import load_model, sequence_logprobs

    torch.manual_seed(0)
    model = load_model(ModelConfig())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # some right padding

    def reference():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(lp[:, :1]), lp * mask[:, 1:]], 1)

    fn = reference if variant == "reference" else (lambda: sequence_logprobs(model, ids, mask))
    base = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    fwd = time.perf_counter() - t0
    fwd_rss = _rss_mb() - base
    t0 = time.perf_counter()
    model.train()
    fn().sum().backward()
    bwd = time.perf_counter() - t0
    return {"variant": variant, "forward_s": fwd, "forward_peak_rss_mb": fwd_rss,
            "fwd_bwd_s": bwd, "fwd_bwd_peak_rss_mb": _rss_mb() - base, "checksum": out[1].tolist()[:8]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(logprob_variant(args.variant, args.batch, args.seq)))
        return

    from rexrag.models import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        env_before = os.environ.get("REXRAG_CACHE")
        os.environ["REXRAG_CACHE"] = tmp
        t0 = time.perf_counter()
        resolve_model_path("smollm2-135m")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        resolve_model_path("smollm2-135m")
        second = time.perf_counter() - t0
        code = ("import time; t=time.perf_counter(); from rexrag.models import load_model, load_tokenizer; "
                "from rexrag.config import ModelConfig; load_tokenizer('smollm2-135m'); load_model(ModelConfig()); "
                "print(time.perf_counter()-t)")
        cached_load = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                           env=dict(os.environ)).stdout.strip().splitlines()[-1])
        if env_before is None:
            os.environ.pop("REXRAG_CACHE")
        else:
            os.environ["REXRAG_CACHE"] = env_before
    print(f"GGUF import (first resolve): {first:.1f} s; second resolve: {second * 1000:.1f} ms; "
          f"cold-process import + tokenizer + model load from cache: {cached_load:.1f} s")

    results = {}
    for variant in ("reference", "rexrag"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                               "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    diff = max(abs(a - b) for a, b in zip(results["reference"]["checksum"], results["rexrag"]["checksum"]))
    print(f"log-probs on SmolLM2, batch {args.batch} x seq {args.seq} (vocab 49152), max |diff| {diff:.2e}:")
    print("| variant | forward s | forward peak RSS +MB | fwd+bwd s | fwd+bwd peak RSS +MB |")
    print("| --- | --- | --- | --- | --- |")
    for r in results.values():
        print(f"| {r['variant']} | {r['forward_s']:.2f} | {r['forward_peak_rss_mb']:.0f} | {r['fwd_bwd_s']:.2f} | "
              f"{r['fwd_bwd_peak_rss_mb']:.0f} |")
    ref, ours = results["reference"], results["rexrag"]
    print(f"ratios rexrag/reference: forward time {ours['forward_s'] / ref['forward_s']:.2f}, "
          f"forward peak RSS {ours['forward_peak_rss_mb'] / max(ref['forward_peak_rss_mb'], 1):.2f}, "
          f"fwd+bwd time {ours['fwd_bwd_s'] / ref['fwd_bwd_s']:.2f}, "
          f"fwd+bwd peak RSS {ours['fwd_bwd_peak_rss_mb'] / max(ref['fwd_bwd_peak_rss_mb'], 1):.2f}")


if __name__ == "__main__":
    main()
