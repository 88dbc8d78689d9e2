"""How far the rollout engine's sampling log-probs are from the trainer's, on the demo model (issue 22, part 1).

For each engine (vLLM fp32 and bf16, the HF loop in fp32 and under bf16 autocast), the trainer built from the
demo recipe (``configs/demo_cpu.yaml``: REX-RAG on, two search turns, BM25 over the bundled corpus; the policy in
fp32, ``model.autocast_bf16=false``) samples ``--rounds`` batches of ``--prompts`` questions x G rollouts plus
their kept probes (``Trainer.sample``, no update), then re-scores the exact tokens with its own fp32 forward
(the old-policy pass of a step). On every POLICY token (the only tokens an engine samples), per kind
(``policy``: originals, ``probe_policy``: probes' continuations): mean, 99th percentile and max of
|log p_engine - log p_trainer|, the k3 estimate of KL(engine || trainer), and the share of tokens a
``token_tis`` cap of 2 would truncate and a [0.5, 2] ``token_mask`` would reject.

Usage: python bench/mismatch.py [--engines vllm:float32,vllm:bfloat16,hf:float32,hf:bfloat16] [--rounds 2] [--prompts 4]
Writes bench/results/mismatch.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def measure(engine: str, rounds: int, prompts: int, out: Path) -> dict:
    from rexrag.config import load_config
    from rexrag.rollout.trajectory import Seg
    from rexrag.train.batch import Batch
    from rexrag.train.build import build_trainer

    backend, dtype = engine.split(":")
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", [
        f"rollout.backend={backend}", f"rollout.engine_dtype={dtype}", f"data.batch_size={prompts}",
        "model.autocast_bf16=false", f"trainer.out_dir={out / 'runs'}", "trainer.log_tensorboard=false"])
    tr = build_trainer(cfg, progress=False)
    diffs: dict[str, list[torch.Tensor]] = {"policy": [], "probe_policy": []}
    for _ in range(rounds):
        trajs, _, probes, _ = tr.sample([tr.examples[i] for i in tr.sampler.next_batch()])
        batch = Batch.collate(trajs + probes, tr.pad_id, True, tr.acc.device)
        old = tr._old_logprobs(batch)  # the trainer's fp32 re-scoring of the exact tokens, as in a step
        d = (old - batch.rollout_logprobs)
        sampled = batch.segments == Seg.POLICY
        diffs["policy"].append(d[sampled & ~batch.is_probe[:, None]])
        diffs["probe_policy"].append(d[sampled & batch.is_probe[:, None]])
        tr.step_idx += 1  # a new sampling seed per round
    getattr(tr.agent.backend, "close", lambda: None)()
    return {kind: _stats(torch.cat(ds)) for kind, ds in diffs.items() if sum(len(x) for x in ds)}


def _stats(d: torch.Tensor) -> dict:
    a = d.abs()
    return {"tokens": int(d.numel()), "abs_mean": float(a.mean()), "abs_p99": float(a.quantile(0.99)),
            "abs_max": float(a.max()), "kl_k3": float((torch.expm1(d) - d).mean()),
            "tis2_truncated": float((d.exp() > 2).float().mean()),
            "mask_rejected": float(((d.exp() < 0.5) | (d.exp() > 2)).float().mean())}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['cpu']}; load average {report['load_before']} before, {report['load_after']} after; "
             f"{report['date']}. Command: `{report['command']}`.", "",
             "| engine | kind | tokens | mean abs(Δ log p) | p99 | max | KL k3 (engine ‖ trainer) | > cap 2 | outside [0.5, 2] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for engine, kinds in report["engines"].items():
        for kind, s in kinds.items():
            lines.append(f"| {engine} | {kind} | {s['tokens']} | {s['abs_mean']:.2e} | {s['abs_p99']:.2e} | "
                         f"{s['abs_max']:.2e} | {s['kl_k3']:.2e} | {100 * s['tis2_truncated']:.2f} % | "
                         f"{100 * s['mask_rejected']:.2f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    from rexrag.hardware import finish_record, run_record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="vllm:float32,vllm:bfloat16,hf:float32,hf:bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    report = {**run_record("python bench/mismatch.py " + " ".join(sys.argv[1:])), "engines": {}}
    for engine in args.engines.split(","):
        print(f"{engine} ...", flush=True)
        report["engines"][engine] = measure(engine, args.rounds, args.prompts, args.out / "mismatch_runs" / engine.replace(":", "_"))
        print(json.dumps(report["engines"][engine]), flush=True)
    finish_record(report)
    (args.out / "mismatch.json").write_text(json.dumps(report, indent=1))
    (args.out / "mismatch.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
