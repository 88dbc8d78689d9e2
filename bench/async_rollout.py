"""Synchronous against asynchronous rollouts on the demo's multi-turn recipe: trajectories per hour, idle time,
staleness and held-out EM after equal numbers of trained trajectories. One script; run it on a quiet machine.

    python bench/async_rollout.py [--modes sync,one_step_off,async] [--trajectories 160] [--model smollm2-135m]
                                  [--heldout 40] [--seed 0] [--out runs/bench_async] [--append-md]
    python bench/async_rollout.py --smoke --out /tmp/bench_async     # pipeline check in minutes (meaningless numbers)

Protocol (every number is an option; run on a quiet machine):

* Recipe: ``configs/demo_cpu.yaml`` as it ships (SmolLM2-135M, BM25 over the bundled corpus, B=2 prompts x G=4
  rollouts, two search turns, T=0.7, em_format, REX-RAG on: in the async modes the worker makes the probes) with
  ``algo.rollout_correction=token_tis`` in every mode (the off-policy rule that covers staleness; in ``sync`` it
  corrects the engine's bf16 sampling only). Trained trajectories include the kept probes.
  ``--model`` is the starting policy (a format warm-up from ``rexrag warmup`` learns faster than the raw model).
* Modes: ``sync`` is the best synchronous configuration here: one process, the colocated engine and the update taking
  both cores in turn (torch's default threads). ``one_step_off`` and ``async`` (``rollout.max_staleness=2``) run one
  trainer process and one rollout worker (``rollout.workers=1``), each with one thread (``OMP_NUM_THREADS=1``): the
  worker generates batch t+1 (t+2) while the trainer updates on batch t.
* Equal work: every mode trains about ``--trajectories`` trajectories (steps = trajectories / (B x G); kept probes
  add a few, counted) from the same seed and prompt order. Trajectories per hour count trained trajectories over the sum of step times (``all``) and over
  steps 2.. (``steady``: the first async step has nothing to overlap with); the wall clock with start-up is recorded too.
* Idle: in ``sync`` the share of a step spent generating (weight sync, rollouts, rewards, REX-RAG's probes: the
  update waits) and updating (the engine sleeps); in the async modes ``timing/trainer_idle_s`` over the step time,
  and the worker's ``async/worker_idle_s`` over its idle plus generation time. Staleness: steps at each value.
* Held-out EM: ``rexrag eval --from-run`` (greedy agent, the run's settings) on the first ``--heldout`` bundled
  held-out questions; each async mode against ``sync`` as a paired bootstrap over the same questions
  (``rexrag.eval.report.paired_difference``). The target: >= 1.3x trajectories per hour at EM within noise.

Results: ``<out>/results.json`` and ``<out>/results.md``; ``--append-md`` puts the section into BENCHMARKS.md.
From the measured phase times the section also states the speed-up model: with generation a share g of a
synchronous step and the update 1 - g, perfect overlap gives 1 / max(g, 1 - g) when both sides keep the same
hardware; ``--gpu-gen-share`` (0.85 by default: BENCHMARKS' GPU smoke puts generation at 80-90 % of a 3B step on
8 GPUs) gives the figure for a split of the GPUs in proportion to the phases (R of 8 generating).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
HEADING = "## Asynchronous rollouts against the synchronous loop (CPU, demo recipe)"
MODES = {
    "sync": [],
    "one_step_off": ["rollout.mode=one_step_off"],
    "async": ["rollout.mode=async", "rollout.max_staleness=2"],
}
COMMON = ["algo.rollout_correction=token_tis"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="sync,one_step_off,async")
    p.add_argument("--trajectories", type=int, default=160, help="trained trajectories per mode")
    p.add_argument("--model", default="smollm2-135m", help="starting policy (e.g. a `rexrag warmup` output)")
    p.add_argument("--heldout", type=int, default=40, help="held-out questions evaluated (0 = no evaluation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-gen-share", type=float, default=0.85, help="generation's share of a synchronous GPU step")
    p.add_argument("--out", default="runs/bench_async")
    p.add_argument("--smoke", action="store_true", help="2 steps a mode, tiny rollouts, 4 held-out questions")
    p.add_argument("--append-md", action="store_true", help="put the section into BENCHMARKS.md")
    p.add_argument("--reuse", action="store_true",
                   help="keep a mode whose run in --out finished every step (and its evaluation, if any): "
                        "an interrupted comparison goes on where it stopped; its wall clock is then unknown")
    return p.parse_args(argv)


def rexrag(args: list[str], env: dict | None = None) -> float:
    """Run ``rexrag <args>`` in a subprocess; returns its wall-clock seconds (raises on failure)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rexrag.cli", *args], check=True, cwd=REPO, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def steps_for(args) -> int:
    return 2 if args.smoke else max(1, math.ceil(args.trajectories / (2 * 4)))


def finished(run: Path, steps: int) -> bool:
    """A run of this mode in ``run`` logged all ``steps`` steps (``--reuse``)."""
    from rexrag.train.logging import read_metrics

    path = run / "metrics.jsonl"
    return path.is_file() and len([m for m in read_metrics(path) if "timing/step_s" in m]) >= steps


def train(mode: str, args, out: Path) -> float:
    steps = steps_for(args)
    small = ["rollout.max_turns=1", "rollout.max_new_tokens_per_turn=16"] if args.smoke else []
    env = {"OMP_NUM_THREADS": "1"} if mode != "sync" else {}  # one core each: trainer and worker
    return rexrag(["train", "--config", "configs/demo_cpu.yaml", "--no-progress", "--overwrite",
                   f"trainer.out_dir={out}", f"trainer.steps={steps}",
                   f"model.name_or_path={args.model}", f"trainer.seed={args.seed}", "trainer.save_every=0",
                   *COMMON, *MODES[mode], *small], env)


def evaluate(args, run: Path) -> list[dict]:
    from rexrag.data import demo_file
    from rexrag.eval.report import read_jsonl

    n = 4 if args.smoke else args.heldout
    rexrag(["eval", "--from-run", str(run), "--dataset", f"demo={demo_file('eval.jsonl')}", "--limit", str(n),
            "--out", str(run / "eval"), "--seed", str(args.seed)])
    return read_jsonl(run / "eval" / "predictions.jsonl")


def summarize(mode: str, steps: list[dict], wall_s: float) -> dict:
    total = sum(m["timing/step_s"] for m in steps)
    steady = sum(m["timing/step_s"] for m in steps[1:])
    trajs = sum(m["rollout/trajectories"] for m in steps)
    out = {"mode": mode, "steps": len(steps), "trajectories": trajs, "step_s_sum": total, "wall_s": wall_s,
           "traj_per_hour": 3600 * trajs / max(total, 1e-9),
           "traj_per_hour_steady": 3600 * sum(m["rollout/trajectories"] for m in steps[1:]) / steady if steady else None,
           "reward_mean": sum(m["reward/mean"] for m in steps) / len(steps)}
    if mode == "sync":
        gen = sum(sum(m.get(f"timing/{k}_s", 0) for k in ("weight_sync", "gen", "reward", "explore")) for m in steps)
        out["gen_share"] = gen / total  # the update waits
        out["update_share"] = sum(m.get("timing/update_s", 0) for m in steps) / total  # the engine sleeps
    else:
        out["trainer_idle_share"] = sum(m["timing/trainer_idle_s"] for m in steps) / total
        idle = sum(m["async/worker_idle_s"] for m in steps)
        out["worker_idle_share"] = idle / max(idle + sum(m["timing/worker_gen_s"] for m in steps), 1e-9)
        hist: dict[str, int] = {}
        for m in steps:
            hist[str(int(m["async/staleness_max"]))] = hist.get(str(int(m["async/staleness_max"])), 0) + 1
        out["staleness_steps"] = hist
    return out


def speedup_model(sync: dict, gpu_share: float) -> dict:
    """Two bounds from the phase shares. Same hardware for both phases, each as fast as in the synchronous step
    (what overlap alone gives): 1 / max(g, 1 - g). 8 GPUs split, R generating and 8 - R training, each phase's
    time scaling linearly with its GPUs: 1 / max(g 8 / R, (1 - g) 8 / (8 - R)) at the best R, which is never above
    1 (a split cannot beat time-sharing all 8 when both phases scale linearly): the gain there has to come from
    what does not scale, the long tail of multi-turn rollouts that a synchronous step waits for."""
    g = sync["gen_share"]
    best = max(range(1, 8), key=lambda r: 1 / max(gpu_share * 8 / r, (1 - gpu_share) * 8 / (8 - r)))
    gpu = 1 / max(gpu_share * 8 / best, (1 - gpu_share) * 8 / (8 - best))
    return {"cpu_gen_share": g, "cpu_overlap_bound": 1 / max(g, 1 - g), "gpu_gen_share": gpu_share,
            "gpu_rollout_gpus": best, "gpu_overlap_bound": gpu}


def markdown(res: dict) -> str:
    rows = {r["mode"]: r for r in res["runs"]}
    base = rows.get("sync")
    lines = [HEADING, "", f"Recorded {res['date']} on {res['cpu']} ({res['machine']}); load average before/after "
             f"{res['load_before']} / {res['load_after']}. `python bench/async_rollout.py {res['argv']}`. "
             "Recipe, modes and measures: the script's docstring.", "",
             "| mode | steps | trajectories | traj/h (all) | traj/h (steady) | vs sync | trainer idle | worker idle | "
             "staleness (steps) | held-out EM | vs sync (95 % paired CI) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        ratio = f"{r['traj_per_hour'] / base['traj_per_hour']:.2f}x" if base and mode != "sync" else ""
        idle_t = f"{r['trainer_idle_share']:.0%}" if "trainer_idle_share" in r else f"gen {r['gen_share']:.0%}"
        idle_w = f"{r['worker_idle_share']:.0%}" if "worker_idle_share" in r else f"update {r['update_share']:.0%}"
        diff = r.get("em_vs_sync")
        cmp = f"{100 * diff['diff']:+.1f} ({100 * diff['lo']:+.1f}..{100 * diff['hi']:+.1f})" if diff else ""
        em = f"{100 * r['em']:.1f}" if "em" in r else ""
        steady = f"{r['traj_per_hour_steady']:.0f}" if r["traj_per_hour_steady"] else ""
        lines.append(f"| {mode} | {r['steps']} | {int(r['trajectories'])} | {r['traj_per_hour']:.0f} | {steady} | {ratio} | "
                     f"{idle_t} | {idle_w} | {', '.join(f'{k}: {v}' for k, v in r.get('staleness_steps', {'0': r['steps']}).items())} | {em} | {cmp} |")
    if base:
        m = res["model"]
        lines += ["", f"Speed-up model: generation was {m['cpu_gen_share']:.0%} of a synchronous step here; overlap alone, "
                  f"each phase as fast as in the synchronous step, would bound the speed-up at {m['cpu_overlap_bound']:.2f}x "
                  "(here each process has one core of two, so the measured ratio also says how far each phase slows "
                  f"on half the cores). On 8 GPUs with generation {m['gpu_gen_share']:.0%} of a synchronous step and both "
                  f"phases scaling linearly with their GPUs, the best split ({m['gpu_rollout_gpus']} generating, "
                  f"{8 - m['gpu_rollout_gpus']} training) gives {m['gpu_overlap_bound']:.2f}x: a split alone cannot beat "
                  "time-sharing all 8, so a GPU speed-up has to come from what does not scale, the long tail of "
                  "multi-turn rollouts (and retrieval waits) that a synchronous step idles through."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import datetime

    import rex_vs_grpo as rvg  # machine description and the BENCHMARKS.md section writer

    from rexrag.eval.report import paired_difference, read_jsonl
    from rexrag.train.logging import read_metrics

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": datetime.date.today().isoformat(), "cpu": rvg.cpu(), "machine": rvg.machine(),
           "argv": " ".join(sys.argv[1:] if argv is None else argv), "load_before": round(os.getloadavg()[0], 2), "runs": []}
    preds = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        run = out / mode
        reused = args.reuse and finished(run, steps_for(args))
        wall = None if reused else train(mode, args, run)
        row = summarize(mode, read_metrics(run / "metrics.jsonl"), wall) | {"reused": reused}
        if args.heldout:
            kept = reused and (run / "eval" / "predictions.jsonl").is_file()
            preds[mode] = read_jsonl(run / "eval" / "predictions.jsonl")[: args.heldout] if kept else evaluate(args, run)
            row["em"] = sum(float(p["em"]) for p in preds[mode]) / max(len(preds[mode]), 1)
            if mode != "sync" and "sync" in preds:
                row["em_vs_sync"] = paired_difference(preds["sync"], preds[mode])
        res["runs"].append(row)
    res["load_after"] = round(os.getloadavg()[0], 2)
    sync = next((r for r in res["runs"] if r["mode"] == "sync"), None)
    if sync:
        res["model"] = speedup_model(sync, args.gpu_gen_share)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    (out / "results.md").write_text(text)
    print(text)
    if args.append_md:
        rvg.replace_section(REPO / "BENCHMARKS.md", text, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
