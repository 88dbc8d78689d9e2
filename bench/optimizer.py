"""AdamW step time and state memory: torch's AdamW (fp32 moments) against rexrag's bf16-moment AdamW.

On the demo model's parameters (SmolLM2-135M, fp32) with random gradients: one untimed step (the
state is created), then ``--steps`` timed steps each; median seconds per step and the state's bytes.
Both in the same process, alternating, so a busy machine slows both alike.

Usage: python bench/optimizer.py [--steps 5] [--threads 0] [--out bench/results/optimizer.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rexrag.config import ModelConfig
from rexrag.hardware import finish_record, run_record
from rexrag.models import DEFAULT_MODEL, load_model
from rexrag.train.optim import make_optimizer


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/optimizer.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run_record("python bench/optimizer.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))
    model = load_model(ModelConfig(name_or_path=DEFAULT_MODEL))
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {d: make_optimizer(params, 1e-6, 0.0, d) for d in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {d: [] for d in opts}
    for d, opt in opts.items():
        opt.step()  # creates the state
    for _ in range(args.steps):
        for d, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[d].append(time.perf_counter() - t)
    result = {d: {"step_s": statistics.median(v), "state_mb": state_bytes(opts[d]) / 2**20} for d, v in times.items()}
    result["bf16_vs_fp32_time"] = result["bfloat16"]["step_s"] / result["float32"]["step_s"]
    record.update(threads=torch.get_num_threads(), params=sum(p.numel() for p in params), result=result)
    finish_record(record)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
