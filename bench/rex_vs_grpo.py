"""GRPO vs REX-RAG on a CPU: equal sampled-token budgets, several seeds, held-out EM with intervals. Resumable.

Protocol (every number is an option; the defaults are the recorded CPU run):
* Questions: HotpotQA and 2WikiMultihopQA dev questions from ``../shared/data/derived`` (their gold
  paragraphs are in the 23,630-passage closed corpus). A fixed shuffle (seed 1234) holds out
  ``--heldout-per-dataset`` questions of each; the rest are training questions: a seeded sample for the
  format warm-up, the others for RL (never evaluated).
* Policy: SmolLM2-135M-Instruct after the format warm-up (``rexrag.warmup``, the demo's settings), run
  once and shared by every run. The sha256 of its weights names its baseline (``<out>/baselines/<sha>.json``:
  the warm-up's held-out rows, agent and retrieve-once). A warm-up rebuilt on another CPU differs in the last
  bits (other kernels, other rounding), so its runs form their own group, paired only with each other.
* Retrieval: BM25 (bm25s) over the closed corpus, top-2, observations cut to ``--max-obs-tokens``.
* RL: the demo's recipe (``rexrag.demo``: B prompts x G rollouts, 2 search turns, T=0.7, em_format,
  no KL). GRPO is the same trainer with REX-RAG's explorer set to never probe (bitwise plain GRPO, see
  tests/test_rex_integration.py), so both log the same dead-end statistics. REX-RAG: probes with
  ``rex_token`` correction. Both start from the same policy, prompt order and sampling seed.
* Four methods (``--methods``): ``grpo``; ``grpo_ds``, GRPO with DAPO's dynamic sampling (groups without
  reward spread dropped, more prompts sampled, at most ``data.dynamic_sampling_max_rounds`` rounds);
  ``rex``; ``rex_rc``, REX-RAG with the engine-vs-trainer rollout correction (``RC_SETTINGS``: token-level
  truncated IS, C = 2, as slime's ``--use-tis`` and verl's token ``rollout_is``). Each method is the recipe
  plus its ``METHOD_SETTINGS``; pairs in ``PAIRS`` are compared per seed on the same questions.
* Turn-level credit arms (not run by default; name them in ``--methods``): ``grpo_process`` / ``rex_process``
  add ``trainer.process_reward=evidence*0.2`` (``PROCESS``: a search turn earns the share of the question's
  supporting passages it retrieves first; the turn term joins GRPO's advantage), ``grpo_cur`` / ``rex_cur``
  draw prompts by ``data.curriculum=pass_rate`` (``CURRICULUM``), and ``grpo_process_cur`` / ``rex_process_cur``
  both. Every run logs search recall of the supporting passages, searches per rollout and the reward-hacking
  sentinels (queries copying the question, rollouts at the turn limit); the table shows them.
  ``--rl-questions solvable`` stays a separate, offline choice: the curriculum learns pass rates from the
  training rollouts themselves, one visit per question at a time, while ``solvable`` spends a greedy pass
  up front; at this budget (tens of steps of B=2) the curriculum sees most questions at most once, so it
  draws like the uniform sampler (``bench/curriculum_reach.py`` simulates when it starts to differ).
* Equal compute: each run trains until the tokens it *sampled* (original rollouts plus probe
  continuations, counted at the generation backend) reach ``--token-budget``; REX-RAG spends part of
  its budget on probes, so it takes fewer steps.
* Retrieval alone: the warm-up policy is also scored ``retrieve_once`` (``rexrag.eval``: the question as the
  one query, the observation the agent would read first, one answer turn, the agent's strict rule), so the
  table shows what multi-turn search adds over the passages of the first search.
* Held-out evaluation: greedy agent, the full held-out set before RL (once) and after each run; the
  learning curve evaluates a fixed subset (``--curve-per-dataset`` of each) at ``--curve-points``
  equally spaced token counts.

Per run, ``<out>/records/<method>_s<seed>_<warm-up sha>.json`` holds the per-step metrics (reward, rollout EM, dead-end
group fraction, groups with a non-zero advantage before/after probes, probes made/kept, probe accuracy,
rho, alpha, tokens, wall time), the curve and the per-question held-out scores. A run whose file exists
is skipped, so ``--seeds 0,1,2`` can be completed over several invocations. ``--report`` (or the end of
every invocation) writes ``<out>/results.md`` and ``<out>/curves.png`` from whatever runs exist, and
``--append-md`` puts that section into BENCHMARKS.md (replacing an earlier one).

    python bench/rex_vs_grpo.py --seeds 0,1,2 --append-md     # the CPU experiment (~40 min per run here)
    python bench/rex_vs_grpo.py --report --append-md          # re-plot and re-tabulate recorded runs
    python bench/rex_vs_grpo.py --smoke --out /tmp/rvg        # pipeline check in minutes (meaningless numbers)
    python bench/rex_vs_grpo.py --methods grpo,grpo_process,rex,rex_process --seeds 0,1,2,3 --append-md   # credit

Records are reused across code changes only when the protocol still holds: keys added to the config since a
run was recorded must sit at their defaults (the code path a run without them took), and ``--replay-steps K``
re-runs the first K steps of each reused method's first seed and refuses when a step's sampled tokens or
rewards differ from its record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HEADING = "## REX-RAG vs GRPO (bench/rex_vs_grpo.py)"
DATASETS = {"hotpotqa": "hotpotqa_dev_ctx.flashrag.jsonl", "2wikimultihopqa": "2wikimultihopqa_dev_ctx.flashrag.jsonl"}
RC_SETTINGS = ("algo.rollout_correction=token_tis", "algo.rollout_correction_cap=2.0")
PROCESS = ("trainer.process_reward=evidence*0.2",)  # turn-level credit (rexrag.process_rewards, algos.turn_credit)
CURRICULUM = ("data.curriculum=pass_rate",)  # rexrag.curriculum
METHOD_SETTINGS = {"grpo": ("rex.probe_prob=0",), "grpo_ds": ("rex.probe_prob=0", "data.dynamic_sampling=true"),
                   "rex": (), "rex_rc": RC_SETTINGS,
                   "grpo_process": ("rex.probe_prob=0", *PROCESS), "rex_process": PROCESS,
                   "grpo_cur": ("rex.probe_prob=0", *CURRICULUM), "rex_cur": CURRICULUM,
                   "grpo_process_cur": ("rex.probe_prob=0", *PROCESS, *CURRICULUM), "rex_process_cur": (*PROCESS, *CURRICULUM)}
METHODS = tuple(METHOD_SETTINGS)
DEFAULT_METHODS = ("grpo", "grpo_ds", "rex", "rex_rc")  # the recorded CPU run; the others: --methods
LABELS = {"grpo": "GRPO", "grpo_ds": "GRPO + dynamic sampling", "rex": "REX-RAG", "rex_rc": "REX-RAG + rollout correction",
          "grpo_process": "GRPO + process reward", "rex_process": "REX-RAG + process reward",
          "grpo_cur": "GRPO + curriculum", "rex_cur": "REX-RAG + curriculum",
          "grpo_process_cur": "GRPO + process reward + curriculum", "rex_process_cur": "REX-RAG + process reward + curriculum"}
PAIRS = (("grpo", "rex"), ("grpo", "grpo_ds"), ("rex", "rex_rc"), ("grpo_ds", "rex"),  # (reference, method)
         ("grpo", "grpo_process"), ("rex", "rex_process"), ("grpo_process", "rex_process"), ("grpo", "grpo_cur"),
         ("rex", "rex_cur"), ("grpo_process", "grpo_process_cur"), ("rex_process", "rex_process_cur"))
# the bench's own settings a recorded run depends on (with the recipe's): other values need another --out
PROTOCOL = ("heldout_per_dataset", "curve_per_dataset", "curve_points", "token_budget", "warmup_examples", "warmup_steps",
            "smoke")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--work", default=str(REPO / "runs" / "rex_vs_grpo"), help="index, warm-up and training dirs")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rex_vs_grpo"), help="recorded results")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--replay-steps", type=int, default=0,
                   help="before new runs, re-run this many first steps of each recorded method's first seed and "
                        "refuse to reuse records that no longer reproduce")
    p.add_argument("--token-budget", type=int, default=10_000, help="sampled tokens per run (originals + probes)")
    p.add_argument("--max-steps", type=int, default=200, help="safety stop")
    p.add_argument("--heldout-per-dataset", type=int, default=150)
    p.add_argument("--curve-per-dataset", type=int, default=30)
    p.add_argument("--curve-points", type=int, default=2, help="curve evaluations during a run (the final one is extra)")
    p.add_argument("--config", default=str(REPO / "configs" / "cpu_experiment.yaml"), help="RL recipe (documented there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value (repeatable)")
    p.add_argument("--rl-questions", choices=("all", "solvable"), default="all",
                   help="solvable: RL trains only on the --candidates first RL questions that the warm-up policy "
                        "answers right greedily (one shared greedy pass; the demo's selection)")
    p.add_argument("--candidates", type=int, default=256, help="RL questions the greedy pass tries (--rl-questions solvable)")
    p.add_argument("--warmup-examples", type=int, default=48)
    p.add_argument("--warmup-steps", type=int, default=12)
    p.add_argument("--report", action="store_true", help="only tabulate and plot the recorded runs")
    p.add_argument("--append-md", action="store_true", help="put the results section into BENCHMARKS.md")
    p.add_argument("--note", default="", help="free text for the results section")
    p.add_argument("--smoke", action="store_true", help="tiny random model and sizes: checks the pipeline only")
    args = p.parse_args(argv)
    if args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")
    unknown = [m for m in args.methods.split(",") if m and m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.smoke:
        args.heldout_per_dataset, args.curve_per_dataset, args.curve_points, args.token_budget = 3, 2, 1, 60
        args.warmup_examples, args.warmup_steps, args.max_steps = 4, 1, 3
        args.set = args.set + ["data.batch_size=2", "rollout.n=2", "rollout.max_turns=1", "rollout.max_new_tokens_per_turn=12",
                               "rollout.max_obs_tokens=32", "rex.probe_prob=1.0", "rex.keep_ratio=0.5"]
    return args


def recipe(args, extra: list[str] = ()):
    """The RL config: ``--config`` with ``--set`` overrides, then ``extra`` (run-specific paths and seed)."""
    from rexrag.config import load_config

    return load_config(args.config, [*args.set, *extra])


def protocol(args) -> dict:
    """Everything a recorded result depends on: the bench's settings and the recipe's RL sections."""
    from rexrag.config import config_to_dict

    cfg = config_to_dict(recipe(args))
    # the bench builds its one engine itself (make_engine): the recipe's vLLM settings never reach a run
    cfg["rollout"] = {k: v for k, v in cfg["rollout"].items() if not k.startswith("vllm_")}
    # the selection keys only when used: runs recorded before the option existed trained on all questions
    chosen = {"rl_questions": args.rl_questions, "candidates": args.candidates} if args.rl_questions != "all" else {}
    return {k: getattr(args, k) for k in PROTOCOL} | chosen | {k: cfg[k] for k in ("retrieval", "rollout", "algo", "rex", "trainer")
                                                        if k in cfg} | {"data.batch_size": cfg["data"]["batch_size"]}


def protocol_differences(recorded: dict, now: dict) -> dict:
    """{key: (recorded, now)} of the settings that differ. A key the record lacks (added to the config since
    it was recorded) differs only when it is off its default, which is the path the recorded run took."""
    from rexrag.config import Config, config_to_dict

    defaults = config_to_dict(Config())
    diff = {}
    for key, value in now.items():
        old = recorded.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            for sub, v in value.items():
                if sub in old:
                    if old[sub] != v:
                        diff[f"{key}.{sub}"] = (old[sub], v)
                elif v != defaults.get(key, {}).get(sub, v):
                    diff[f"{key}.{sub}"] = ("(added since, at its default)", v)
        elif old != value and not (key not in recorded and isinstance(value, dict)):
            diff[key] = (old, value)
    return diff


# --------------------------------------------------------------------------- data, index, warm-up


def load_splits(args) -> tuple[dict[str, list], list, list]:
    """({dataset: held-out examples}, warm-up examples, RL examples): a fixed split, independent of seeds."""
    from rexrag.data import assign_group_ids, load_qa

    heldout, pool = {}, []
    for name, file in DATASETS.items():
        rows = list(load_qa(Path(args.data_dir) / "derived" / file))
        random.Random(1234).shuffle(rows)
        for ex in rows:
            ex.data_source = name
        heldout[name] = rows[: args.heldout_per_dataset]
        pool += rows[args.heldout_per_dataset :]
    random.Random(1234).shuffle(pool)
    warm, rl = pool[: args.warmup_examples], pool[args.warmup_examples :]
    assign_group_ids([e for exs in heldout.values() for e in exs], start=1_000_000)
    assign_group_ids(rl)
    return heldout, warm, rl


def weights_sha256(model_dir: Path) -> str:
    """The weight file's sha256 (several shards: the sha256 of their digests in name order)."""
    from rexrag.retrieval.index import file_sha256

    digests = [file_sha256(f) for f in sorted(model_dir.glob("*.safetensors"))]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


def tiny_model(tokenizer):
    from rexrag.models import tiny_llama

    # head_dim 64: a size the vLLM CPU attention kernels support
    return tiny_llama(len(tokenizer), hidden=128, layers=2, heads=2, seed=0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)


def warm_up(args, work: Path, retriever, warm_examples) -> Path:
    """The format-warmed-up policy under ``work/warmup`` (built once)."""
    from rexrag.config import ModelConfig
    from rexrag.models import DEFAULT_MODEL, load_model, load_tokenizer
    from rexrag.warmup import WarmupConfig, run_warmup

    target = work / "warmup"
    if (target / "config.json").is_file():
        return target
    tok = load_tokenizer(DEFAULT_MODEL)
    model = tiny_model(tok) if args.smoke else load_model(ModelConfig(name_or_path=DEFAULT_MODEL))
    rc = recipe(args)
    cfg = WarmupConfig(n_examples=0, steps=args.warmup_steps, batch_size=4, lr=1e-4, topk=rc.retrieval.topk,
                       max_obs_tokens=rc.rollout.max_obs_tokens, seed=0)
    run_warmup(model, tok, retriever, warm_examples, cfg, target)
    return target


# --------------------------------------------------------------------------- generation engine and evaluation


class CountingBackend:
    """Wraps a generation backend and counts the tokens it samples (the runs' compute budget)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def generate(self, prompts, stops, params):
        outs = self.inner.generate(prompts, stops, params)
        self.tokens += sum(len(o.token_ids) for o in outs)
        return outs

    def __getattr__(self, name):  # sync_weights, close, stats, ... belong to the real backend
        return getattr(self.inner, name)


def make_engine(model, tokenizer, args):
    """One generation backend for every evaluation and run (vLLM when installed: start-up paid once)."""
    from rexrag.config import RolloutConfig
    from rexrag.rollout.backends import build_backend, resolve_backend_name

    name = resolve_backend_name("auto")
    # KV cache for 64 evaluation rows of up to 1,024 tokens (SmolLM2-135M fp32: 46 KB per token)
    cfg = RolloutConfig(max_total_tokens=1024, vllm_kv_cache_gb=3.0)
    return build_backend(name, model, tokenizer, cfg, device="cpu", seed=0, max_batch=64)


def evaluate(engine, model, tokenizer, retriever, datasets: dict[str, list], args, method: str = "agent") -> list[dict]:
    """Greedy evaluation (the agent, or ``retrieve_once``); per-question rows {dataset, id, em, f1, cover_em, n_searches}."""
    from rexrag.eval.evaluate import EvalOptions, run_eval

    sync = getattr(engine, "sync_weights", None)
    if sync is not None:
        sync(model)
    rc = recipe(args)  # greedy, with the recipe's search budget
    opts = EvalOptions(method=method, topk=rc.retrieval.topk, batch_size=64, max_turns=rc.rollout.max_turns,
                       max_new_tokens=rc.rollout.max_new_tokens_per_turn, max_obs_tokens=rc.rollout.max_obs_tokens,
                       template=rc.rollout.template)
    data = {name: (Path(args.data_dir) / "derived" / DATASETS[name], exs) for name, exs in datasets.items()}
    res = run_eval(data, model, tokenizer, retriever, opts, None, "held-out", quiet=True, backend=engine)
    return [{k: r[k] for k in ("dataset", "id", "em", "f1", "cover_em", "n_searches")} for r in res["rows"]]


def curve_subset(heldout: dict[str, list], args) -> dict[str, list]:
    return {name: exs[: args.curve_per_dataset] for name, exs in heldout.items()}


def select_rl_questions(args, out: Path, sha: str, engine, model, tokenizer, retriever, rl: list) -> list:
    """``--rl-questions solvable``: of the first ``--candidates`` RL questions, those the warm-up policy answers
    right greedily (``rexrag.demo.pick_rl_questions``: GRPO learns only from groups whose rewards differ, and
    a question the policy solves greedily is one its samples get right sometimes). The greedy pass runs once;
    its choice and sampled tokens are recorded in ``<out>/rl_questions_<warm-up sha>.json`` and shared by every
    run from that warm-up."""
    from rexrag.demo import pick_rl_questions

    path, candidates = out / f"rl_questions_{sha[:12]}.json", rl[: args.candidates]
    if not path.is_file():
        by_dataset: dict[str, list] = {}
        for e in candidates:
            by_dataset.setdefault(e.data_source, []).append(e)
        counter = CountingBackend(engine)
        rows = {(r["dataset"], r["id"]): r for r in evaluate(counter, model, tokenizer, retriever, by_dataset, args)}
        chosen, info = pick_rl_questions(candidates, [rows[(e.data_source, e.id)] for e in candidates], len(candidates),
                                         at_least=2 * recipe(args).data.batch_size)
        atomic_json(path, info | {"greedy_tokens": counter.tokens, "ids": [e.id for e in chosen]})
    ids = set(json.loads(path.read_text())["ids"])
    return [e for e in candidates if e.id in ids]


def mean_em(rows: list[dict], ids: set | None = None) -> float:
    """Unweighted mean over datasets of per-dataset EM (on ``ids`` only when given)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if ids is None or (r["dataset"], r["id"]) in ids:
            by.setdefault(r["dataset"], []).append(r["em"])
    return statistics.mean(statistics.mean(v) for v in by.values())


def retrieval_ceiling(args, retriever, tokenizer, heldout: dict[str, list]) -> dict:
    """How often the gold answer is even visible to the agent: per dataset, the share of held-out questions
    whose answer string (cover-EM) is in BM25's results for the question itself (the first search the
    warm-up teaches): in the observation the agent gets (top-k, cut to max_obs_tokens), in the top-k
    passages whole, and in the top-5 whole."""
    from rexrag.protocol import format_information
    from rexrag.rewards import cover_em

    rc = recipe(args)
    k, cut = rc.retrieval.topk, rc.rollout.max_obs_tokens
    out = {}
    for name, exs in heldout.items():
        hits = retriever.search([e.question for e in exs], max(5, k))
        seen = {"observation": 0, f"top{k}_whole": 0, "top5_whole": 0}
        for e, passages in zip(exs, hits):
            ids = tokenizer(format_information(passages[:k]), add_special_tokens=False)["input_ids"][:cut]
            seen["observation"] += cover_em(tokenizer.decode(ids), e.golden_answers)
            seen[f"top{k}_whole"] += cover_em(format_information(passages[:k]), e.golden_answers)
            seen["top5_whole"] += cover_em(format_information(passages[:5]), e.golden_answers)
        out[name] = {key: v / len(exs) for key, v in seen.items()} | {"n": len(exs)}
    return out


# --------------------------------------------------------------------------- one run


def run_config(args, method: str, seed: int, model_dir: Path, out_dir: Path):
    """The recipe for one run; GRPO is the same trainer with an explorer that never probes."""
    return recipe(args, [f"model.name_or_path={model_dir}", f"trainer.out_dir={out_dir}", f"trainer.seed={seed}",
                         f"trainer.steps={args.max_steps}", "trainer.save_every=0", "trainer.log_tensorboard=false",
                         "rex.enabled=true", *METHOD_SETTINGS[method]])


STEP_KEYS = ("reward/mean", "rollout/em_rate", "rollout/groups_with_signal", "rollout/groups_with_signal_after_probes",
             "rex/dead_end_frac", "rex/probes_made", "rex/probes_kept", "rex/probe_acc", "rex/dead_groups_rescued",
             "rex/rho", "rex/alpha", "rex/ratio_mean", "rex/ratio_clipfrac", "actor/pg_loss", "rollout/trajectories",
             "timing/step_s", "actor/approx_kl", "actor/ratio_mean", "actor/clip_frac", "mismatch/policy/abs_mean",
             "mismatch/policy/abs_max", "mismatch/policy/kl_k3", "rollout_corr/policy/ratio_max",
             "rollout_corr/policy/truncated_frac", "rollout/dynamic_rounds", "rollout/dynamic_groups_dropped",
             "rollout/dynamic_groups_filled", "rollout/searches_per_traj", "search/recall", "search/query_copy_rate",
             "search/turn_limit_rate", "process/reward_per_turn", "process/no_signal_before", "process/no_signal_after",
             "curriculum/seen_frac", "curriculum/prior_pass_rate")


def run_one(args, method, seed, model_dir, engine, retriever, heldout, rl_examples, work: Path, replay: int = 0) -> dict:
    """One run to the token budget with its curve and held-out rows; ``replay`` > 0: only that many steps,
    no evaluation (``check_replay``)."""
    from rexrag.train.build import build_trainer
    from rexrag.train.rundir import clear_run

    out_dir = work / f"{method}_s{seed}"
    clear_run(out_dir)
    counter = CountingBackend(engine)
    trainer = build_trainer(run_config(args, method, seed, model_dir, out_dir), progress=False, backend=counter,
                            retriever=retriever, examples=list(rl_examples))
    policy = trainer.acc.unwrap_model(trainer.model)
    tokenizer = trainer.tokenizer
    subset = curve_subset(heldout, args)
    marks = [args.token_budget * (i + 1) / (args.curve_points + 1) for i in range(args.curve_points)]
    steps, curve, t0 = [], [], time.perf_counter()
    while counter.tokens < args.token_budget and len(steps) < (replay or args.max_steps):
        m = trainer.step()
        steps.append({k: m[k] for k in STEP_KEYS if k in m} | {"tokens": counter.tokens,
                                                                "wall_s": time.perf_counter() - t0})
        print(f"  {method} s{seed} step {len(steps)}: tokens {counter.tokens}, reward {m.get('reward/mean', 0):.3f}, "
              f"dead-end {m.get('rex/dead_end_frac', float('nan')):.2f}, kept {m.get('rex/probes_kept', 0):.0f}", flush=True)
        while marks and counter.tokens >= marks[0] and counter.tokens < args.token_budget and not replay:
            marks.pop(0)
            t = time.perf_counter()
            rows = evaluate(engine, policy, tokenizer, retriever, subset, args)
            curve.append({"step": len(steps), "tokens": counter.tokens, "em": mean_em(rows)})
            t0 += time.perf_counter() - t  # evaluation time is not training time
    train_s = time.perf_counter() - t0
    if replay:
        return {"steps": steps}
    final = evaluate(engine, policy, tokenizer, retriever, heldout, args)
    ids = {(name, e.id) for name, exs in subset.items() for e in exs}
    curve.append({"step": len(steps), "tokens": counter.tokens, "em": mean_em(final, ids)})
    return {"method": method, "seed": seed, "steps": steps, "curve": curve, "heldout": final,
            "tokens": counter.tokens, "train_s": train_s}


# --------------------------------------------------------------------------- recorded state


def atomic_json(path: Path, obj) -> None:
    from rexrag.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def recorded_baselines(out: Path) -> dict[str, dict]:
    """{warm-up sha256: its baseline}: one per warm-up the runs in ``out`` started from. A warm-up rebuilt on
    another CPU is not bitwise the same (its kernels round differently), so runs are grouped by the warm-up
    they started from: differences to the warm-up and between methods are paired within a group only."""
    return {b["warmup_sha256"]: b for b in (json.loads(p.read_text()) for p in sorted((out / "baselines").glob("*.json")))}


def baseline_path(out: Path, sha: str) -> Path:
    return out / "baselines" / f"{sha[:12]}.json"


def check_baseline(out: Path, args, sha: str) -> dict | None:
    """The baseline (warm-up's held-out rows) recorded for this warm-up, None when there is none yet; an error
    when any recorded baseline in ``out`` was made under another protocol."""
    bases = recorded_baselines(out)
    for base in bases.values():
        diff = protocol_differences(base["protocol"], protocol(args))
        if diff:
            raise SystemExit(f"{baseline_path(out, base['warmup_sha256'])} was recorded with other settings {diff} "
                             "(recorded, now): use another --out")
    return bases.get(sha)


REPLAYED = ("tokens", "reward/mean", "rollout/em_rate", "rex/probes_kept")


def check_replay(args, out: Path, sha: str, run) -> None:
    """Re-run the first ``--replay-steps`` steps of each recorded method's first seed (``run(method, seed, k)``
    gives their step records) and refuse when sampled tokens, rewards, rollout EM or kept probes differ:
    the records were made by code that no longer behaves the same, and mixing them would compare apples
    with pears. Writes ``<out>/replay.json``."""
    if args.replay_steps < 1:
        return
    checked = {}
    for method in METHODS:
        mine = sorted((r for r in recorded_runs(out) if r["method"] == method and r["warmup_sha256"] == sha),
                      key=lambda r: r["seed"])
        if not mine:
            continue
        rec, k = mine[0], min(args.replay_steps, len(mine[0]["steps"]))
        steps = run(method, rec["seed"], k)
        for i, (old, new) in enumerate(zip(rec["steps"][:k], steps)):
            bad = {key: (old.get(key), new.get(key)) for key in REPLAYED
                   if not math.isclose(old.get(key, 0.0), new.get(key, 0.0), rel_tol=1e-6, abs_tol=1e-9)}
            if bad:
                raise SystemExit(f"{method} seed {rec['seed']} step {i + 1} no longer reproduces its record {bad} "
                                 "(recorded, now): record these runs again under another --out")
        checked[f"{method}_s{rec['seed']}"] = k
        print(f"replay: {method} s{rec['seed']} reproduces its first {k} recorded steps", flush=True)
    atomic_json(out / "replay.json", {"steps_reproduced": checked, "keys": list(REPLAYED),
                                      "date": time.strftime("%Y-%m-%d %H:%M")})


def recorded_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def main(argv=None) -> int:
    args = parse_args(argv)
    from rexrag.cli import quiet_libraries

    quiet_libraries()  # before transformers is imported: no library progress bars in this script's log
    out, work = Path(args.out), Path(args.work)
    recipe(args)  # a wrong --config or --set fails here, before any index or warm-up is built
    if args.report:
        if (work / "index_bm25" / "manifest.json").is_file() and (work / "warmup").is_dir():
            ensure_ceiling(args, out, work)  # cheap; older records may lack it
        return report(out, args)
    from rexrag.config import ModelConfig
    from rexrag.memory import release
    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import build_index, load_index

    heldout, warm, rl = load_splits(args)
    index = work / "index_bm25"
    if not (index / "manifest.json").is_file():
        build_index(Path(args.data_dir) / "derived" / "multihop_dev_corpus.flashrag.jsonl", "bm25", index)
    retriever = load_index(index, expect_kind="bm25")
    model_dir = warm_up(args, work, retriever, warm)
    sha = weights_sha256(model_dir)
    base = check_baseline(out, args, sha)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    engine = make_engine(model, tokenizer, args)
    try:
        if base is None:
            print(f"held-out evaluation of the warm-up policy ({sum(map(len, heldout.values()))} questions)", flush=True)
            base = {"protocol": protocol(args), "warmup_sha256": sha, "heldout": evaluate(engine, model, tokenizer, retriever, heldout, args),
                    "splits": {"heldout": {k: len(v) for k, v in heldout.items()}, "warmup": len(warm), "rl": len(rl)},
                    "machine": machine(), "cpu": cpu(), "date": time.strftime("%Y-%m-%d %H:%M")}
            atomic_json(baseline_path(out, sha), base)
        ensure_ceiling(args, out, work, retriever, tokenizer, heldout)
        if args.rl_questions == "solvable":
            rl = select_rl_questions(args, out, sha, engine, model, tokenizer, retriever, rl)
            print(f"RL questions: {len(rl)} of the first {args.candidates} (solved greedily by the warm-up policy)", flush=True)
        ensure_retrieve_once(args, out, base, engine, model, tokenizer, retriever, heldout)
        del model
        release()
        check_replay(args, out, sha, lambda method, seed, k: run_one(args, method, seed, model_dir, engine, retriever, heldout,
                                                                rl, work, replay=k)["steps"])
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            for method in [m for m in args.methods.split(",") if m]:
                path = out / "records" / f"{method}_s{seed}_{sha[:12]}.json"
                if path.is_file():
                    print(f"{path.name}: recorded, skipped", flush=True)
                    continue
                print(f"{method} seed {seed}: training to {args.token_budget} sampled tokens", flush=True)
                run = run_one(args, method, seed, model_dir, engine, retriever, heldout, rl, work)
                run |= {"protocol": protocol(args), "warmup_sha256": sha, "machine": machine(),
                        "date": time.strftime("%Y-%m-%d %H:%M"), "load_after": os.getloadavg()}
                atomic_json(path, run)
                release()
    finally:
        getattr(engine, "close", lambda: None)()
    return report(out, args)


def ensure_retrieve_once(args, out: Path, base: dict, engine, model, tokenizer, retriever, heldout: dict[str, list]) -> None:
    """The warm-up policy's held-out rows with retrieval alone (``retrieve_once``), once, in its baseline."""
    if "retrieve_once" in base:
        return
    print("held-out evaluation of the warm-up policy, retrieve once", flush=True)
    base["retrieve_once"] = evaluate(engine, model, tokenizer, retriever, heldout, args, method="retrieve_once")
    atomic_json(baseline_path(out, base["warmup_sha256"]), base)


def ensure_ceiling(args, out: Path, work: Path, retriever=None, tokenizer=None, heldout=None) -> None:
    """``<out>/ceiling.json`` (``retrieval_ceiling`` of the held-out set), computed once."""
    if (out / "ceiling.json").is_file():
        return
    from rexrag.models import load_tokenizer
    from rexrag.retrieval import load_index

    retriever = retriever or load_index(work / "index_bm25", expect_kind="bm25")
    tokenizer = tokenizer or load_tokenizer(str(work / "warmup"))
    heldout = heldout or load_splits(args)[0]
    atomic_json(out / "ceiling.json", retrieval_ceiling(args, retriever, tokenizer, heldout))


def cpu() -> str:
    from rexrag.hardware import cpu_description

    return cpu_description()


def machine() -> str:
    import torch

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- report


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)  # Student-t 97.5 % quantiles, 1-9 df


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): 95 % Student-t interval over seeds (lo = hi = mean with one seed)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, m, m
    half = T975[min(len(xs) - 2, len(T975) - 1)] * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, m - half, m + half


def seed_difference_sentence(diffs: list[float]) -> str:
    """The mean of per-seed paired EM differences (each on the same held-out questions, same seed) with a 95 %
    Student-t interval over seeds, and how many seeds it would take for a difference of this size and spread
    to exclude 0 (the budget question: more seeds, or a budget at which methods differ more)."""
    m, lo, hi = t_interval(diffs)
    sd = statistics.stdev(diffs)
    verdict = "beyond seed noise" if lo > 0 or hi < 0 else "within seed noise"
    need = next((n for n in range(2, 1000) if abs(m) > (T975[min(n - 2, len(T975) - 1)] if n < 11 else 1.96)
                 * sd / math.sqrt(n)), None) if abs(m) > 1e-12 else None
    more = f"; a difference of this size and spread would need {need} seeds" if need and verdict != "beyond seed noise" else ""
    return (f"{100 * m:+.1f} EM [{100 * lo:+.1f}, {100 * hi:+.1f}], {verdict} (seed-to-seed SD of the difference "
            f"{100 * sd:.1f}){more}")


def _avg(steps: list[dict], key: str) -> float:
    xs = [s[key] for s in steps if key in s and not math.isnan(s[key])]
    return statistics.mean(xs) if xs else float("nan")


def _max(steps: list[dict], key: str) -> float:
    xs = [s[key] for s in steps if key in s and not math.isnan(s[key])]
    return max(xs) if xs else float("nan")


EXCURSIONS = ("actor/ratio_mean", "actor/approx_kl", "mismatch/policy/abs_max", "rollout_corr/policy/ratio_max")


def sampled_signal(steps: list[dict], batch_size: int) -> float:
    """Share of the groups a run *sampled* whose rewards differ (after probes). With dynamic sampling a step
    samples ``rounds x B`` groups and the dropped ones (and those it had to fill up with) had none."""
    total = signal = 0.0
    for st in steps:
        if "rollout/dynamic_rounds" in st:
            n = st["rollout/dynamic_rounds"] * batch_size
            total, signal = total + n, signal + n - st["rollout/dynamic_groups_dropped"] - st["rollout/dynamic_groups_filled"]
        elif "rollout/groups_with_signal_after_probes" in st:
            total, signal = total + batch_size, signal + batch_size * st["rollout/groups_with_signal_after_probes"]
    return signal / total if total else float("nan")


def summarize(base: dict, runs: list[dict]) -> dict:
    from rexrag.eval.report import paired_difference
    from rexrag.eval.report import summarize as eval_summary

    out, batch = {}, base["protocol"]["data.batch_size"]
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        per_seed = []
        for r in mine:
            s = eval_summary(r["heldout"])
            d = paired_difference(base["heldout"], r["heldout"])
            per_seed.append({"seed": r["seed"], "em": s["average"]["em"], "f1": s["average"]["f1"],
                             "cover_em": s["average"]["cover_em"], "sampled_signal": sampled_signal(r["steps"], batch),
                             **{f"max:{k}": _max(r["steps"], k) for k in EXCURSIONS},
                             "by_dataset": {k: v["em"] for k, v in s.items() if k != "average"}, "vs_warmup": d,
                             "steps": len(r["steps"]), "tokens": r["tokens"], "train_s": r["train_s"],
                             **{k: _avg(r["steps"], k) for k in STEP_KEYS}})
        out[method] = {"seeds": per_seed, "em": t_interval([p["em"] for p in per_seed]),
                       "f1": t_interval([p["f1"] for p in per_seed])}
    return out


REX_ONLY = ("rex/probe_acc", "rex/rho", "rex/alpha")
COLORS = {"grpo": "tab:blue", "grpo_ds": "tab:green", "rex": "tab:orange", "rex_rc": "tab:red", "grpo_process": "tab:cyan",
          "rex_process": "tab:brown", "grpo_cur": "tab:purple", "rex_cur": "tab:pink", "grpo_process_cur": "tab:gray",
          "rex_process_cur": "tab:olive"}


def is_rex(method: str) -> bool:
    return method.startswith("rex")
SMOOTH = 5  # steps: with B=2 a step's group fractions are 0, 0.5 or 1


def running_mean(ys: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` non-NaN values at each position (NaN until one exists)."""
    out = []
    for i in range(len(ys)):
        xs = [y for y in ys[max(0, i - window + 1) : i + 1] if not math.isnan(y)]
        out.append(statistics.mean(xs) if xs else float("nan"))
    return out


def plot(runs: list[dict], base_em: dict[str, float], path: Path) -> None:
    """Curves of every run; a run's held-out curve starts at its own warm-up's EM (``base_em[sha]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", "held-out EM (curve subset) vs sampled tokens"), ("rex/dead_end_frac", "dead-end group fraction"),
              ("rollout/groups_with_signal_after_probes", "groups with non-zero advantage"),
              ("rex/probe_acc", "probe accuracy (REX-RAG)"), ("rex/rho", "rho (REX-RAG)"), ("rex/alpha", "alpha (REX-RAG)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for r in runs:
            style = {"color": COLORS[r["method"]], "alpha": 0.8, "linestyle": "-" if is_rex(r["method"]) else "--",
                     "label": f"{r['method']} s{r['seed']} ({r['warmup_sha256'][:6]})"}
            if key == "curve":
                ax.plot([0] + [c["tokens"] for c in r["curve"]], [100 * base_em[r["warmup_sha256"]]] + [100 * c["em"] for c in r["curve"]],
                        marker="o", **style)
                ax.set_xlabel("sampled tokens")
            elif is_rex(r["method"]) or key not in REX_ONLY:  # GRPO's explorer never probes: nothing to show
                ys = running_mean([s.get(key, float("nan")) for s in r["steps"]], SMOOTH)
                if not all(math.isnan(y) for y in ys):
                    ax.plot([s["tokens"] for s in r["steps"]], ys, marker=".", **style)
                ax.set_xlabel("sampled tokens")
        ax.set_title(title if key == "curve" else f"{title}, mean of last {SMOOTH} steps", fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def _ci(t) -> str:
    m, lo, hi = (100 * x for x in t)
    return f"{m:.1f}" if lo == hi else f"{m:.1f} [{lo:.1f}, {hi:.1f}]"


def markdown(bases: dict[str, dict], runs: list[dict], args, out: Path) -> str:
    """The results section: the shared protocol, then one block per warm-up (its runs, table and comparisons)."""
    base = next(iter(bases.values()))
    p = base["protocol"]
    ret, ro, al, rx, tr = (p[k] for k in ("retrieval", "rollout", "algo", "rex", "trainer"))
    n = {k: len(v) for k, v in _by_dataset(base["heldout"]).items()}
    where = repo_relative(out)
    lines = [section_heading(out), "",
             (f"Command: `{command(args, out, runs)}` (resumable: recorded runs are skipped; `--report --append-md` "
              f"rebuilds this section). Results: `{where}/` (baselines/*.json, records/*.json, curves.png)."), "",
             f"Protocol: SmolLM2-135M-Instruct after the format warm-up ({p['warmup_examples']} questions, "
             f"{p['warmup_steps']} steps), BM25 top-{ret['topk']} over the "
             f"23,630-passage closed corpus, {ro['max_turns']} search turns of {ro['max_new_tokens_per_turn']} tokens, "
             f"observations {ro['max_obs_tokens']} tokens; RL on {base['splits']['rl']} training questions (never "
             f"evaluated), recipe `configs/cpu_experiment.yaml`{' with ' + ' '.join(args.set) if args.set else ''}: "
             f"B={p['data.batch_size']} x G={ro['n']}, T={ro['temperature']}, lr {tr['lr']}, reward {tr['reward']}, "
             f"KL {al['kl_coef']}; REX-RAG p={rx['probe_prob']}, rho0={rx['keep_ratio']}, keep_min={rx['keep_min']}, "
             f"{rx['correction']}; " + "; ".join(f"{LABELS[m]}: {' '.join(METHOD_SETTINGS[m]) or 'as is'}" for m in METHODS
                                     if m in ({r["method"] for r in runs} or set(DEFAULT_METHODS)))
             + f"; each run stops at {p['token_budget']:,} sampled tokens (originals + probe "
             "continuations). Held-out: "
             + ", ".join(f"{k} n={v}" for k, v in n.items()) + " (greedy agent); intervals over seeds are 95 % "
             "Student-t, per-run differences to the warm-up a 95 % paired bootstrap over questions. Runs are grouped "
             "by the warm-up they started from (a warm-up rebuilt on another CPU is not bitwise the same); comparisons "
             "are paired within a group.", ""]
    if args.note:
        lines += [args.note, ""]
    for sha, b in bases.items():
        mine = [r for r in runs if r["warmup_sha256"] == sha]
        lines += block(out, b, mine, n)
    ceiling = json.loads((out / "ceiling.json").read_text()) if (out / "ceiling.json").is_file() else None
    if ceiling:
        k = ret["topk"]
        lines += ["", f"Retrieval ceiling (the question itself as the query, BM25): the gold answer string appears in the "
                  f"observation the agent reads (top-{k} cut to {ro['max_obs_tokens']} tokens) for "
                  + ", ".join(f"{100 * c['observation']:.0f} % of {d}" for d, c in ceiling.items())
                  + f"; in the top-{k} passages whole for "
                  + ", ".join(f"{100 * c[f'top{k}_whole']:.0f} %" for c in ceiling.values())
                  + "; in the top-5 whole for " + ", ".join(f"{100 * c['top5_whole']:.0f} %" for c in ceiling.values()) + "."]
    lines += ["", f"![curves]({where}/curves.png)", ""]
    return "\n".join(lines)


def _by_dataset(rows: list[dict]) -> dict[str, list]:
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["dataset"], []).append(r)
    return by


def block(out: Path, base: dict, runs: list[dict], n: dict) -> list[str]:
    """One warm-up's part of the section: where it ran, its table, and its paired comparisons."""
    from rexrag.eval.report import difference_sentence, paired_difference
    from rexrag.eval.report import summarize as eval_summary

    sha = base["warmup_sha256"]
    recorded = ", ".join(f"{r['method']} s{r['seed']} ({r['date']})"
                         for r in sorted(runs, key=lambda r: (r["seed"], METHODS.index(r["method"])))) or "none"
    where = base.get("cpu") or (runs[0]["machine"] if runs else "not recorded")
    lines = [f"### Warm-up {sha[:12]}", "", f"Machine: {where}. Recorded runs: {recorded}.", ""]
    sel = out / f"rl_questions_{sha[:12]}.json"
    if sel.is_file():
        info = json.loads(sel.read_text())
        lines += [f"RL questions (`--rl-questions solvable`): the {len(info['ids'])} of the first {info['candidates']} RL "
                  f"questions that the warm-up policy answers right greedily ({info['candidates_em']} exact, the rest "
                  f"containing the gold answer); the one-off greedy pass sampled {info['greedy_tokens']:,} tokens, shared "
                  "by every run and not counted in their budgets.", ""]
    once = base.get("retrieve_once")
    lines += table(eval_summary(base["heldout"]), once and eval_summary(once), summarize(base, runs), n)
    for r in sorted(runs, key=lambda r: (r["seed"], METHODS.index(r["method"]))):
        d = paired_difference(base["heldout"], r["heldout"])
        lines.append(f"- {r['method']} seed {r['seed']}: " + difference_sentence(d, "RL", "the warm-up policy"))
    for ref, method in PAIRS:
        diffs = []
        for seed in sorted({r["seed"] for r in runs}):
            pair = {r["method"]: r for r in runs if r["seed"] == seed}
            if ref in pair and method in pair:
                d = paired_difference(pair[ref]["heldout"], pair[method]["heldout"])
                diffs.append(d["diff"])
                lines.append(f"- seed {seed}, {LABELS[method]} against {LABELS[ref]}: "
                             + difference_sentence(d, LABELS[method], LABELS[ref]))
        if len(diffs) > 1:
            lines.append(f"- **over {len(diffs)} seeds, {LABELS[method]} against {LABELS[ref]}**: "
                         + seed_difference_sentence(diffs))
    if once:
        d = paired_difference(once, base["heldout"])
        lines.append("- warm-up policy, its own multi-turn search against retrieve-once: "
                     + difference_sentence(d, "searching", "retrieval alone"))
    return lines + [""]


def table(b: dict, once: dict | None, summ: dict, n: dict) -> list[str]:
    """The results table: the warm-up policy (agent, and retrieve-once), then each method over its seeds.
    Stability columns are the largest per-step value over a run, averaged over seeds."""
    cols = ["held-out EM", "F1", "cover-EM", *(f"{k} EM" for k in n), "steps", "sampled tokens", "train min",
            "dead-end groups (trained)", "groups with signal, sampled", "rounds/step", "probes kept/step", "probe acc",
            "max ratio", "max approx KL", "max engine abs dlogp", "max IS weight", "searches/rollout", "search recall",
            "groups without signal, with process credit", "queries copying the question", "rollouts at the turn limit"]
    lines = ["| policy | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    blank = " | ".join([""] * (len(cols) - 3 - len(n)))
    for label, s in (("warm-up (start), agent", b), ("warm-up, retrieve once", once)):
        if s:
            lines.append(f"| {label} | – | {100 * s['average']['em']:.1f} | {100 * s['average']['f1']:.1f} | "
                         f"{100 * s['average']['cover_em']:.1f} | " + " | ".join(f"{100 * s[k]['em']:.1f}" for k in n)
                         + f" | {blank} |")
    for method, s in summ.items():
        seeds = s["seeds"]

        def avg(key, scale=1.0, fmt=".2f", seeds=seeds):
            xs = [x[key] for x in seeds if not math.isnan(x[key])]
            return format(scale * statistics.mean(xs), fmt) if xs else "–"

        rex = is_rex(method)
        lines.append(
            f"| {LABELS[method]} | {len(seeds)} | {_ci(s['em'])} | {_ci(s['f1'])} | {avg('cover_em', 100, '.1f')} | "
            + " | ".join(f"{100 * statistics.mean(x['by_dataset'][k] for x in seeds):.1f}" for k in n)
            + f" | {avg('steps', fmt='.0f')} | {avg('tokens', fmt=',.0f')} | {avg('train_s', 1 / 60, '.1f')} | "
            f"{avg('rex/dead_end_frac')} | {avg('sampled_signal')} | {avg('rollout/dynamic_rounds', fmt='.1f')} | "
            + (f"{avg('rex/probes_kept')} | {avg('rex/probe_acc')} | " if rex else "– | – | ")
            + f"{avg('max:actor/ratio_mean', fmt='.3f')} | {avg('max:actor/approx_kl', fmt='.1e')} | "
            f"{avg('max:mismatch/policy/abs_max', fmt='.2f')} | {avg('max:rollout_corr/policy/ratio_max', fmt='.2f')} | "
            f"{avg('rollout/searches_per_traj')} | {avg('search/recall')} | {avg('process/no_signal_after')} | "
            f"{avg('search/query_copy_rate')} | {avg('search/turn_limit_rate')} |")
    return lines + [""]


def report(out: Path, args) -> int:
    bases = recorded_baselines(out)
    if not bases:
        raise SystemExit(f"{out / 'baselines'} holds no baseline: run the experiment first")
    runs = recorded_runs(out)
    from rexrag.eval.report import summarize as eval_summary

    plot(runs, {sha: eval_summary(b["heldout"])["average"]["em"] for sha, b in bases.items()}, out / "curves.png")
    text = markdown(bases, runs, args, out)
    from rexrag.fsutil import atomic_write_text

    atomic_write_text(out / "results.md", text)
    print(text)
    if args.append_md:
        replace_section(REPO / "BENCHMARKS.md", text, section_heading(out))
    return 0


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (recorded results carry no machine paths)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def section_heading(out: Path) -> str:
    """BENCHMARKS.md heading of the results in ``out`` (the default --out has the plain one)."""
    return HEADING if out.name == "rex_vs_grpo" else f"{HEADING}: `{repo_relative(out)}`"


def command(args, out: Path, runs: list[dict]) -> str:
    """The invocation that records (or resumes) the runs in ``out``."""
    parts = ["python bench/rex_vs_grpo.py"]
    if out.name != "rex_vs_grpo":
        parts.append(f"--out {repo_relative(out)}")
    if args.rl_questions != "all":
        parts.append(f"--rl-questions {args.rl_questions} --candidates {args.candidates}")
    parts += [f"--set {kv}" for kv in args.set]
    defaults = parse_args([])
    parts += [f"--{key.replace('_', '-')} {getattr(args, key)}" for key in PROTOCOL
              if key != "smoke" and getattr(args, key) != getattr(defaults, key)]
    methods = [m for m in METHODS if any(r.get("method") == m for r in runs)]
    if methods and set(methods) != set(DEFAULT_METHODS):
        parts.append(f"--methods {','.join(methods)}")
    seeds = sorted({r["seed"] for r in runs}) or [0]
    return " ".join(parts + [f"--seeds {','.join(map(str, seeds))}", "--append-md"])


def replace_section(path: Path, text: str, heading: str = HEADING) -> None:
    """Put ``text`` (starting with ``heading``) into ``path`` in place of an earlier section, else at the end."""
    from rexrag.fsutil import atomic_write_text

    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = old.find(heading + "\n")  # the whole heading line: another section's heading may extend this one
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    atomic_write_text(path, new)


def cli() -> int:
    """``main`` with a one-line error for bad input (a wrong --set key, a missing data file or recipe)."""
    from rexrag.errors import UserError

    try:
        return main()
    except UserError as exc:
        print(f"rex_vs_grpo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
