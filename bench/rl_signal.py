"""How much learning signal each RL configuration gives the warmed-up policy, before any update.

GRPO learns only from groups whose rewards differ; issue 15's runs found 71-74 % of groups dead (every
rollout wrong) at the CPU recipe. This script measures, for each variant of the recipe, what one RL step
would see on a fixed sample of RL training questions: it calls the trainer's own sampling half
(``Trainer.sample``: rollouts, rewards, REX-RAG probes) from the shared warm-up of ``bench/rex_vs_grpo.py``
(same split, index, warm-up weights and engine), with no update. Per variant:

* rollout EM, the share of groups with any reward spread under ``em_format`` (what the recipe trains on),
  with an EM spread (right and wrong answers in one group: the signal toward correctness) and with an F1
  spread (what an F1 reward would see, from the same rollouts);
* the dead-end group fraction, REX-RAG's kept probes, their accuracy and the dead groups they rescue;
* the cost: tokens sampled per group (the experiment's budget unit), trajectory length (update cost)
  and wall time, and groups with an EM spread per 10k sampled tokens (signal at equal budget);
* what the searches did: recall of the questions' supporting passages; and for the ``process`` variant
  (``trainer.process_reward=evidence*0.2``) the share of groups with any signal once the turn-level
  process term joins the outcome advantage (``rexrag.algos.turn_credit``).

    python bench/rl_signal.py --append-md                     # all variants (~1-2 min each on 2 cores)
    python bench/rl_signal.py --variants recipe,G8 --questions 32
    python bench/rl_signal.py --report --append-md            # re-tabulate bench/results/rl_signal.json
    python bench/rl_signal.py --smoke --work /tmp/rvg_w --out /tmp/rs   # pipeline check (random tiny model)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rex_vs_grpo as rvg  # (the experiment's split, warm-up, engine and recipe)

HEADING = "## Learning signal per RL configuration (bench/rl_signal.py)"
# name -> recipe overrides (configs/cpu_experiment.yaml is "recipe")
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "T1.0": ["rollout.temperature=1.0"],
    "G8": ["rollout.n=8"],
    "1turn": ["rollout.max_turns=1"],
    "obs192": ["rollout.max_obs_tokens=192"],
    "top3_obs256": ["retrieval.topk=3", "rollout.max_obs_tokens=256"],
    "obs192_G8": ["rollout.max_obs_tokens=192", "rollout.n=8"],
    "process": ["trainer.process_reward=evidence*0.2"],  # turn-level credit: signal of dead-end groups' searches
    "process_answer": ["trainer.process_reward=answer_seen*0.2"],  # the same from gold answer strings (no doc ids)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--questions", type=int, default=64, help="RL training questions per variant (same ones each)")
    p.add_argument("--out", default=str(rvg.REPO / "bench" / "results" / "rl_signal.json"))
    p.add_argument("--append-md", action="store_true", help="put the table into BENCHMARKS.md")
    p.add_argument("--report", action="store_true", help="only re-tabulate the recorded --out file")
    p.add_argument("--note", default="", help="text after the table (the reading of the results)")
    args, rest = p.parse_known_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if args.questions < 1:
        p.error(f"--questions must be at least 1, got {args.questions}")
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    # the experiment's own options (--work, --data-dir, --config, --set, --smoke, split sizes)
    return args, rvg.parse_args(rest)


def spread_share(groups: dict[int, list[float]]) -> float:
    """Share of groups whose values are not all equal."""
    return sum(max(v) - min(v) > 1e-9 for v in groups.values()) / max(len(groups), 1)


def by_group(trajs, values) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for t, v in zip(trajs, values, strict=True):
        out.setdefault(t.group_id, []).append(float(v))
    return out


def signal_metrics(tokenizer, trajs, rewards, probes, rex: dict, tokens: int, wall_s: float) -> dict:
    """The variant's row: rollout EM, groups with a reward / EM / F1 spread, REX-RAG's probe statistics, cost."""
    from rexrag.rewards import exact_match, f1_score
    from rexrag.rollout.views import policy_answer

    golds = [list(t.example.golden_answers) for t in trajs]
    answers = [policy_answer(tokenizer, t) for t in trajs]
    em = [exact_match(a, g) for a, g in zip(answers, golds)]
    f1 = [f1_score(a, g) for a, g in zip(answers, golds)]
    groups = len(by_group(trajs, rewards))
    em_spread = spread_share(by_group(trajs, em))
    return {
        "groups": groups, "rollouts": len(trajs), "em_rate": statistics.mean(em),
        "answered_rate": sum(a is not None for a in answers) / len(trajs),
        "reward_spread": spread_share(by_group(trajs, rewards)), "em_spread": em_spread,
        "f1_spread": spread_share(by_group(trajs, f1)),
        "reward_spread_after_probes": spread_share(by_group(trajs + probes, list(rewards) + [p.meta["reward"] for p in probes])),
        "dead_end_frac": rex.get("rex/dead_end_frac", float("nan")), "probes_kept": rex.get("rex/probes_kept", 0.0),
        "probe_acc": rex.get("rex/probe_acc", float("nan")), "dead_groups_rescued": rex.get("rex/dead_groups_rescued", 0.0),
        "tokens_per_group": tokens / groups, "traj_len": statistics.mean(len(t) for t in trajs),
        "em_spread_groups_per_10k_tokens": 1e4 * em_spread * groups / max(tokens, 1), "wall_s": wall_s,
    }


def measure(args, overrides: list[str], model_dir: Path, engine, retriever, examples, work: Path) -> dict:
    """One variant: the trainer's sampling half on ``examples`` (G rollouts each, probes), no update."""
    from rexrag.train.build import build_trainer
    from rexrag.train.rundir import clear_run

    out_dir = work / "signal"
    clear_run(out_dir)
    counter = rvg.CountingBackend(engine)
    cfg = rvg.recipe(args, [*overrides, f"model.name_or_path={model_dir}", f"trainer.out_dir={out_dir}",
                            "trainer.seed=0", "trainer.save_every=0", "trainer.log_tensorboard=false"])
    trainer = build_trainer(cfg, progress=False, backend=counter, retriever=retriever, examples=list(examples))
    t0 = time.perf_counter()
    trajs, rewards, probes, _ = trainer.sample(list(examples))
    row = signal_metrics(trainer.tokenizer, trajs, rewards, probes, trainer.explorer.end_step(),
                         counter.tokens, time.perf_counter() - t0)
    return row | credit_metrics(trainer, trajs, probes) | {"overrides": overrides, "sampled_tokens": counter.tokens}


def credit_metrics(trainer, trajs, probes) -> dict:
    """What the searches did (``search/``: recall of the supporting passages, queries copying the question, rollouts
    at the turn limit) and, with ``trainer.process_reward``, the share of groups left without any signal once the
    turn-level term joins (``process/no_signal_after``; ``..._before``: outcome rewards only, probes included)."""
    import torch

    from rexrag.train.batch import Batch
    from rexrag.train.credit import search_metrics

    out = search_metrics(trajs, trainer.cfg.rollout.max_turns)
    if trainer.process is not None:
        batch = Batch.collate(trajs + probes, trainer.pad_id, True, torch.device("cpu"))
        trainer.process.add(batch, torch.zeros_like(batch.loss_mask))
        out |= trainer.process.metrics(trajs)
    return out


def markdown(result: dict) -> str:
    rows = result["variants"]
    lines = [HEADING, "", f"Measured {result['date']} on {result['machine']} (load {result['load_before']} before, "
             f"{result['load_after']} after). Command: `{result['command']}`. Results: `{result['out']}`.", "",
             f"The warmed-up SmolLM2-135M of `bench/rex_vs_grpo.py` (weights sha256 {result['warmup_sha256'][:12]}) samples "
             f"one RL step's rollouts and REX-RAG probes for the same {result['questions']} RL training questions under each "
             "variant of `configs/cpu_experiment.yaml` (`Trainer.sample`, no update). A group has *signal* when its rewards "
             "differ; *EM spread* means it holds both a right and a wrong answer.", "",
             "| variant | overrides | rollout EM | groups with reward spread | EM spread | F1 spread | dead-end groups | "
             "after probes | probes kept | probe acc | rescued | sampled tokens/group | traj. tokens | EM-spread groups per 10k tokens | wall s | "
             "search recall | signal with process credit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {' '.join(r['overrides']) or '(as is)'} | {100 * r['em_rate']:.1f} % | {r['reward_spread']:.2f} | "
                     f"{r['em_spread']:.2f} | {r['f1_spread']:.2f} | {r['dead_end_frac']:.2f} | {r['reward_spread_after_probes']:.2f} | "
                     f"{r['probes_kept']:.0f} | {r['probe_acc']:.2f} | {r['dead_groups_rescued']:.0f} | {r['tokens_per_group']:.0f} | "
                     f"{r['traj_len']:.0f} | {r['em_spread_groups_per_10k_tokens']:.2f} | {r['wall_s']:.0f} | "
                     f"{_fmt(r.get('search/recall'))} | {_fmt(1 - r['process/no_signal_after'] if 'process/no_signal_after' in r else None)} |")
    return "\n".join(lines) + "\n"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def main(argv=None) -> int:
    args, exp = parse_args(argv)
    if args.report:
        return publish(json.loads(Path(args.out).read_text()), args.append_md, args.note)
    from rexrag.cli import quiet_libraries

    quiet_libraries()
    from rexrag.config import ModelConfig
    from rexrag.memory import release
    from rexrag.models import load_model, load_tokenizer
    from rexrag.retrieval import build_index, load_index

    for name in args.variants.split(","):
        rvg.recipe(exp, VARIANTS[name])  # a bad override fails before any work
    load_before = round(os.getloadavg()[0], 2)
    work = Path(exp.work)
    _, warm, rl = rvg.load_splits(exp)
    index = work / "index_bm25"
    if not (index / "manifest.json").is_file():
        build_index(Path(exp.data_dir) / "derived" / "multihop_dev_corpus.flashrag.jsonl", "bm25", index)
    retriever = load_index(index, expect_kind="bm25")
    model_dir = rvg.warm_up(exp, work, retriever, warm)
    model = load_model(ModelConfig(name_or_path=str(model_dir)))
    engine = rvg.make_engine(model, load_tokenizer(str(model_dir)), exp)
    del model
    rows = {}
    try:
        for name in args.variants.split(","):
            print(f"{name}: sampling {args.questions} groups", flush=True)
            rows[name] = measure(exp, VARIANTS[name], model_dir, engine, retriever, rl[: args.questions], work)
            print(f"  {json.dumps({k: round(v, 3) for k, v in rows[name].items() if isinstance(v, float)})}", flush=True)
            release()
    finally:
        getattr(engine, "close", lambda: None)()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": rvg.machine(), "load_before": load_before,
              "load_after": round(os.getloadavg()[0], 2), "warmup_sha256": rvg.weights_sha256(model_dir),
              "questions": args.questions, "command": "python bench/rl_signal.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "out": rvg.repo_relative(Path(args.out)), "variants": rows}
    rvg.atomic_json(Path(args.out), result)
    return publish(result, args.append_md, args.note)


def publish(result: dict, append_md: bool, note: str = "") -> int:
    text = markdown(result) + (f"\n{note}\n" if note else "")
    print(text)
    if append_md:
        rvg.replace_section(rvg.REPO / "BENCHMARKS.md", text, HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
