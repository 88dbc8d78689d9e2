"""When does ``data.curriculum=pass_rate`` change what RL trains on? A simulation of the shipped sampler against
pass rates fitted to measured ones.

The curriculum (``rexrag.curriculum.PassRateSampler``) learns each question's pass rate from its own training
rollouts, so it can favour a question only after it has drawn it once. This script measures how many steps
that takes at a given pool size and batch, by running the shipped sampler (and the uniform epoch-wise
shuffle, ``rexrag.data.PromptSampler``) against simulated questions:

* Each question has a fixed pass rate p (the policy does not change: a model, said so in the report). The
  pass rates are a mixture fitted to a measured RL step of the warmed-up SmolLM2-135M (BENCHMARKS "Learning
  signal per RL configuration", recipe row: 32 questions x G=4, rollout EM 13.3 %, dead-end groups 0.75,
  groups with a right and a wrong answer 0.22): a share z of questions that are never right, the rest
  Beta(a, b), with (z, a, b) chosen so the three rates come out as measured.
* Each step draws ``--batch`` questions, samples ``--group`` rollouts of each (Binomial(G, p) right), and
  tells the sampler the results as the trainer does (``observe``). A group has *signal* when it holds a
  right and a wrong rollout.

Reported per step budget: the share of groups with signal so far under each sampler, their ratio, and the
share of draws that were questions already seen; budgets also read as passes over the pool.

Usage: python bench/curriculum_reach.py [--questions 1103] [--batch 2] [--group 4] [--steps 15,100,500,2000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from rexrag.curriculum import PassRateSampler
from rexrag.data import PromptSampler
from rexrag.hardware import cpu_description

REPO = Path(__file__).resolve().parents[1]
# BENCHMARKS "Learning signal per RL configuration", recipe row (bench/results/rl_signal.json, 2026-11-26)
MEASURED = {"em_rate": 0.1328, "dead_end_frac": 0.75, "spread_frac": 0.2188, "group": 4}


def _beta_moment(a: float, b: float, i: int, j: int) -> float:
    """E[p^i (1-p)^j] for p ~ Beta(a, b)."""
    return math.exp(math.lgamma(a + i) + math.lgamma(b + j) - math.lgamma(a + b + i + j)
                    + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))


def group_rates(z: float, a: float, b: float, g: int) -> tuple[float, float, float]:
    """(mean pass rate, P(all G wrong), P(right and wrong in the group)) when a share z of questions has p = 0
    and the rest p ~ Beta(a, b)."""
    q = 1.0 - z
    dead = z + q * _beta_moment(a, b, 0, g)
    solved = q * _beta_moment(a, b, g, 0)
    return q * a / (a + b), dead, 1.0 - dead - solved


def fit_mixture(em_rate: float, dead_end_frac: float, spread_frac: float, g: int) -> tuple[float, float, float]:
    """(z, a, b) whose ``group_rates`` are closest to the measured three (grid search, squared error)."""
    best, arg = float("inf"), (0.0, 1.0, 1.0)
    for zi in range(0, 96):
        z = zi / 100
        for a in (0.1 * k for k in range(1, 51)):
            for b in (0.1 * k for k in range(1, 51)):
                m, d, s = group_rates(z, a, b, g)
                err = (m - em_rate) ** 2 + (d - dead_end_frac) ** 2 + (s - spread_frac) ** 2
                if err < best:
                    best, arg = err, (z, a, b)
    return arg


def draw_pass_rates(n: int, z: float, a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    """[n] pass rates: 0 with probability z, else Beta(a, b)."""
    return np.where(rng.random(n) < z, 0.0, rng.beta(a, b, n))


def simulate(sampler, p: np.ndarray, steps: int, group: int, rng: np.random.Generator, learns: bool) -> dict[str, list[int]]:
    """Per step: groups with signal and draws of questions seen before, for ``steps`` steps of ``sampler``."""
    seen: set[int] = set()
    out = {"signal": [], "revisits": []}
    for _ in range(steps):
        idx = sampler.next_batch()
        right = [int(r) for r in rng.binomial(group, p[idx])]
        out["signal"].append(sum(0 < r < group for r in right))
        out["revisits"].append(sum(i in seen for i in idx))
        seen.update(idx)
        if learns:
            sampler.observe([(i, r, group) for i, r in zip(idx, right)])
    return out


def run(questions: int, batch: int, group: int, budgets: list[int], sims: int, decay: float) -> dict:
    z, a, b = fit_mixture(MEASURED["em_rate"], MEASURED["dead_end_frac"], MEASURED["spread_frac"], MEASURED["group"])
    rows = {s: {"uniform": [], "pass_rate": [], "rev_uniform": [], "rev_pass_rate": []} for s in budgets}
    for sim in range(sims):
        p = draw_pass_rates(questions, z, a, b, np.random.default_rng(1000 + sim))
        for name, sampler in (("uniform", PromptSampler(questions, batch, seed=sim, shuffle=True)),
                              ("pass_rate", PassRateSampler(questions, batch, seed=sim, decay=decay))):
            res = simulate(sampler, p, max(budgets), group, np.random.default_rng(2000 + sim), name == "pass_rate")
            for s in budgets:
                rows[s][name].append(sum(res["signal"][:s]) / (s * batch))
                rows[s]["rev_" + name].append(sum(res["revisits"][:s]) / (s * batch))
    table = []
    for s in budgets:
        r = rows[s]
        mean = {k: sum(v) / len(v) for k, v in r.items()}
        se = {k: (sum((x - mean[k]) ** 2 for x in v) / max(len(v) - 1, 1) / len(v)) ** 0.5 for k, v in r.items()}
        table.append({"steps": s, "epochs": s * batch / questions, **{k: mean[k] for k in r},
                      "se_uniform": se["uniform"], "se_pass_rate": se["pass_rate"],
                      "ratio": mean["pass_rate"] / mean["uniform"] if mean["uniform"] else float("nan")})
    fitted = group_rates(z, a, b, group)
    return {"mixture": {"never_right": z, "beta_a": a, "beta_b": b},
            "fitted_rates": {"em_rate": fitted[0], "dead_end_frac": fitted[1], "spread_frac": fitted[2]},
            "table": table}


def markdown(result: dict, args: argparse.Namespace) -> str:
    mix, fit = result["mixture"], result["fitted_rates"]
    lines = [f"Pool {args.questions} questions, B={args.batch} x G={args.group}, decay {args.decay}, {args.sims} simulated "
             f"pools. Pass rates: {mix['never_right']:.2f} never right, the rest Beta({mix['beta_a']:.1f}, "
             f"{mix['beta_b']:.1f}); fitted rates EM {fit['em_rate']:.3f}, dead ends {fit['dead_end_frac']:.3f}, "
             f"spread {fit['spread_frac']:.3f} (measured {MEASURED['em_rate']}, {MEASURED['dead_end_frac']}, "
             f"{MEASURED['spread_frac']}).", "",
             "| steps | passes over the pool | groups with signal, uniform | with pass_rate | ratio | draws of seen questions, uniform | with pass_rate |",
             "|---|---|---|---|---|---|---|"]
    for r in result["table"]:
        lines.append(f"| {r['steps']} | {r['epochs']:.2f} | {r['uniform']:.3f} ± {r['se_uniform']:.3f} | "
                     f"{r['pass_rate']:.3f} ± {r['se_pass_rate']:.3f} | {r['ratio']:.2f}x | {r['rev_uniform']:.2f} | "
                     f"{r['rev_pass_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=1103, help="pool size (bench/rex_vs_grpo.py's RL split: 1103)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--steps", default="15,100,500,2000", help="comma-separated step budgets")
    p.add_argument("--sims", type=int, default=10)
    p.add_argument("--decay", type=float, default=0.8, help="data.curriculum_decay")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "curriculum_reach.json"))
    args = p.parse_args(argv)
    try:
        budgets = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps: comma-separated whole numbers, got {args.steps!r}")
    if not budgets or budgets[0] <= 0:
        p.error(f"--steps: positive step counts, got {args.steps!r}")
    if args.batch < 1 or args.group < 1 or args.sims < 1 or args.questions < args.batch:
        p.error("--batch, --group and --sims must be at least 1, and --questions at least --batch")
    if not 0.0 < args.decay <= 1.0:
        p.error(f"--decay: in (0, 1], got {args.decay}")
    load_before, start = os.getloadavg()[0], time.perf_counter()
    result = run(args.questions, args.batch, args.group, budgets, args.sims, args.decay)
    result.update({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": cpu_description(),
                   "load_before": load_before, "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - start,
                   "args": vars(args)})
    md = markdown(result, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
