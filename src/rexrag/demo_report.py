"""The ``rexrag demo`` report: ``report.md`` (the held-out table with intervals and paired differences,
the learning signal per step, example trajectories in Markdown), ``summary.json`` and the plots.
Kept apart from :mod:`rexrag.demo`, which runs the pipeline, so that each reads on its own; this
module only formats results that the run hands it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rexrag.memory import peak_rss_mb
from rexrag.protocol import ANSWER_OPEN

# Row labels of the report's headline table (the same held-out questions in every row).
LABELS = {
    "untrained": "SmolLM2-135M untrained (agent)",
    "rag": "SmolLM2-135M untrained, naive RAG (reference)",
    "warmup": "warm-up only (agent)",
    "trained": "warm-up + REX-RAG (agent)",
}


# What the demo's RL step uses beyond the outcome reward, and why (the measurement it follows).
CREDIT_CHOICE = ("Outcome reward only: turn-level credit (`trainer.process_reward`) and the pass-rate curriculum "
                 "(`data.curriculum`) are off. On the CPU protocol of the benchmark record (`bench/results/turn_credit`, "
                 "2026-12-07, four seeds: GRPO and REX-RAG with and without `evidence*0.2`, same warm-up, 10,000 "
                 "sampled tokens a run) process credit gave more groups a gradient but no held-out EM gain (+0.0 EM "
                 "with GRPO, +0.9 with REX-RAG, both within seed noise); the curriculum, simulated, draws like uniform "
                 "sampling until it has seen most questions once, which a demo-sized run never does. Each is one "
                 "setting away.")


# --------------------------------------------------------------------------- trajectories in Markdown


def render_pieces_md(pieces: list[tuple[str, str]], max_info_chars: int = 400) -> str:
    """Markdown for ``(segment kind, text)`` runs: POLICY as code, INFO quoted, PROBE/NOTICE flagged."""
    out = []
    for kind, text in pieces:
        if kind == "INFO":
            body = text.strip()
            if len(body) > max_info_chars:
                body = body[:max_info_chars] + " …"
            out.append("**INFO** (retrieved, masked out of the loss):\n\n" + "\n".join("> " + line for line in body.splitlines()))
        elif kind == "PROBE":
            out.append(f"**PROBE** (inserted exploratory prompt):\n\n```text\n{text.strip()}\n```")
        elif kind == "NOTICE":
            out.append(f"**NOTICE** (system, masked):\n\n```text\n{text.strip()}\n```")
        elif kind == "PROMPT":
            out.append(f"**PROMPT**:\n\n```text\n{text.strip()}\n```")
        else:
            out.append(f"**{kind}** (model):\n\n```text\n{text.strip()}\n```")
    return "\n\n".join(out) + "\n"


def trajectory_md(tokenizer, traj, title: str) -> str:
    from rexrag.eval.evaluate import trajectory_pieces

    ex = traj.example
    head = [f"### {title}", ""]
    if ex is not None:
        head += [f"- question: {ex.question}", f"- gold: {', '.join(ex.golden_answers)}"]
    head += [f"- answer: {traj.answer!r}", f"- searches: {traj.n_searches}, stop: {traj.stop_reason}",
             f"- reward: {traj.meta.get('reward', '–')}", "", ""]
    return "\n".join(head) + render_pieces_md(trajectory_pieces(tokenizer, traj)) + "\n"


def pick_examples(eval_rows: list[dict], probes: list) -> tuple:
    """(an evaluated agent trajectory that searched, preferring a correct one; a probe with PROBE tokens)."""
    searched = [r for r in eval_rows if r.get("trajectory") is not None and r["n_searches"] > 0]
    searched.sort(key=lambda r: (-r["em"], -r["f1"], -int(r["format_ok"])))
    rows = searched or [r for r in eval_rows if r.get("trajectory") is not None]
    probe = max(probes, key=lambda t: (t.meta.get("reward", 0.0), t.n_searches), default=None)
    return (rows[0]["trajectory"] if rows else None), probe


# --------------------------------------------------------------------------- the report

STEP_COLUMNS = ("reward/mean", "reward/max", "rollout/em_rate", "rollout/groups_with_signal",
                "rollout/groups_with_signal_after_probes", "rollout/valid_format_rate", "rollout/searches_per_traj",
                "rex/dead_end_frac", "rex/probes_kept", "rex/probe_acc", "rex/alpha", "rex/rho", "timing/step_s")


def _steps_table(records: list[dict]) -> str:
    cols = [c for c in STEP_COLUMNS if any(c in r for r in records)]
    if not records or not cols:
        return "(no training steps were logged)\n"
    lines = ["| step | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for r in records:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, (int, float)) else str(v if v is not None else "–"))
        lines.append(f"| {r.get('step', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def signal_summary(records: list[dict]) -> dict[str, float]:
    """Learning signal over the RL steps: mean share of groups with reward spread (before and after
    probes), steps with any exactly-correct rollout, and the mean rollout EM rate."""
    def vals(key: str) -> list[float]:
        return [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]

    sig, sig_p, em = vals("rollout/groups_with_signal"), vals("rollout/groups_with_signal_after_probes"), vals("rollout/em_rate")
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    return {"steps": len(records), "groups_with_signal_mean": mean(sig), "groups_with_signal_after_probes_mean": mean(sig_p),
            "steps_with_signal": sum(1 for v in sig_p if v > 0), "steps_with_a_correct_rollout": sum(1 for v in em if v > 0),
            "rollout_em_rate_mean": mean(em)}


def headline_md(evals: dict[str, dict], n_boot: int = 10_000) -> tuple[str, dict]:
    """(Markdown block, numbers): the held-out table with 95 % intervals and plain sentences on what the
    warm-up and RL added, all on the same questions. ``evals`` maps LABELS keys to ``run_eval`` results."""
    from rexrag.eval import report as R

    rows = {LABELS[k]: v["rows"] for k, v in evals.items() if k in LABELS}
    ds = R.ordered_datasets(str(r["dataset"]) for v in rows.values() for r in v)
    n_by_ds = {d: sum(1 for r in next(iter(rows.values())) if str(r["dataset"]) == d) for d in ds}
    numbers: dict[str, dict] = {}
    lines = [R.interval_table_md(rows), "",
             "Scores x100 with 95 % Wilson score intervals (per dataset; Avg, the unweighted mean over datasets, is "
             "the pooled rate when the datasets have equal n, else a stratified bootstrap); differences between rows "
             f"by a paired bootstrap over the same questions ({n_boot:,} resamples, seed 0). n per dataset: "
             + ", ".join(f"{R.column_title(d)} {n_by_ds[d]}" for d in ds) + ". The same held-out questions in every "
             f"row; none of them is used by the warm-up or by RL. EM of the agent rows needs an `{ANSWER_OPEN}` tag; the "
             "naive-RAG row scores its whole response when it writes none (FlashRAG's rule), so compare it on cover-EM.", ""]
    pairs = [("trained", "warmup", "em", "RL (REX-RAG)", "the warm-up checkpoint", "EM"),
             ("trained", "warmup", "cover_em", "RL (REX-RAG)", "the warm-up checkpoint", "cover-EM"),
             ("warmup", "untrained", "em", "the format warm-up", "the untrained model", "EM"),
             ("trained", "rag", "cover_em", "the trained agent", "naive RAG on the same base model", "cover-EM")]
    for b, a, metric, what, base, title in pairs:
        if a in evals and b in evals:
            d = R.paired_difference(evals[a]["rows"], evals[b]["rows"], metric, n_boot=n_boot)
            numbers[f"{b}_vs_{a}_{metric}"] = d
            lines.append(f"- {R.difference_sentence(d, what, base, title)}")
    return "\n".join(lines) + "\n", numbers


def headline_text(out: str | Path) -> str:
    """The headline block of a written demo report (``summary.json``), for printing."""
    import json

    return json.loads((Path(out) / "summary.json").read_text())["headline"]


def write_report(out: Path, tokenizer, p, evals: dict[str, dict], warm: dict, history: list[dict],
                 probes: list, times: dict, profile: str, checkpoint: str, rl_info: dict | None = None,
                 memory: dict | None = None, plan_text: str = "") -> Path:
    """report.md + summary.json + plots/*.png in ``out``; returns the report path.

    ``p``: the run's :class:`rexrag.demo.DemoProfile` (not imported here: the run imports this module).

    ``evals``: ``run_eval`` results keyed like ``LABELS`` (untrained, rag, warmup, trained), all on the
    same held-out questions; the headline compares them with intervals and paired differences.
    """
    from rexrag.eval import report as R

    metrics_path = out / "train" / "metrics.jsonl"
    records = R.read_metrics_jsonl(metrics_path) if metrics_path.is_file() else [dict(h, step=i + 1) for i, h in enumerate(history)]
    plots = R.plot_training(records, out / "plots")
    summaries = {k: v["summary"] for k, v in evals.items()}
    first = next(iter(summaries.values()))
    n_eval = int(first.get(R.AVERAGE, {}).get("n", 0))
    headline, numbers = headline_md(evals)
    signal = signal_summary(records)
    rl_info = rl_info or {}
    example, probe = pick_examples(evals.get("trained", {}).get("rows", []), probes)
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in times.items() if k != "total" and not k.startswith("cpu"))
    cpu = ", ".join(f"{k[4:]} {v:.0f}s" for k, v in times.items() if k.startswith("cpu_") and k != "cpu_total")
    lines = [
        "# rexrag demo report", "",
        (f"Profile `{profile}`; total wall time {times['total'] / 60:.1f} min on this machine ({phases}); "
        f"CPU time {times.get('cpu_total', 0.0) / 60:.1f} min ({cpu})."
        + (" Peak RSS per phase, then what it left (MiB): "
           + ", ".join(f"{k} {v['peak_mb']:.0f} / {v['after_mb']:.0f}" for k, v in memory.items()) + "." if memory else "")
        + (f" The {plan_text} (`--max-memory-gb`; rexrag.memory_plan)." if plan_text else "")),
        "",
        "- model: SmolLM2-135M-Instruct (offline default `smollm2-135m`)",
        "- corpus: bundled demo subset, 1,796 Wikipedia paragraphs (HotpotQA + 2WikiMultihopQA dev contexts; see NOTICE)",
        f"- retriever: BM25 (bm25s), top-{p.topk}, agent observations cut to {p.max_obs_tokens} tokens",
        (f"- evaluation: {n_eval} held-out questions, greedy; agent: {p.eval_max_turns} search turns, "
        f"{p.eval_max_new_tokens} new tokens per turn; naive RAG: one retrieval with the question, whole passages, "
        f"{p.rag_max_new_tokens} new tokens"),
        f"- trained checkpoint: `{checkpoint}`", "",
        ("These are demo-sized runs on a 135M model: they show the pipeline working and measure what each stage "
        "adds on a few dozen questions, not the paper's accuracy."), "",
        "## Held-out results", "",
        headline,
        "## Warm-up vs warm-up + RL, all metrics", "",
        R.comparison_table_md(summaries.get("warmup", first), summaries.get("trained", first),
                              labels=("warm-up", "warm-up + REX-RAG")), "",
        "## Format warm-up", "",
        (f"{warm['trajectories']} automatically built search trajectories ({warm['two_hop']} with a second search), "
        f"{len(warm['losses'])} AdamW steps (lr {p.warmup_lr:g}); loss on the model's own action tokens "
        f"{warm['losses'][0]:.3f} -> {warm['losses'][-1]:.3f} (retrieved text is masked out of the loss)."), "",
        "## REX-RAG training", "",
        (f"{p.rl_steps} GRPO steps, {p.rl_prompts} prompts x {p.rl_rollouts} rollouts at temperature {p.rl_temperature:g}, "
        f"lr {p.rl_lr:g}, reward `em_format`, REX-RAG probes on (p={p.probe_prob}, keep ratio {p.keep_ratio}, at least "
        "one kept probe per step when any exist), policy correction `rex_token`. " + CREDIT_CHOICE), "",
    ]
    if rl_info:
        text = (f"Training questions: {rl_info.get('questions')} bundled training questions that the warm-up did not use "
                f"(`{Path(str(rl_info.get('file', ''))).name}`; never a held-out question), `{p.rl_questions}`, "
                f"chosen by {rl_info.get('ranked_by')}")
        if "candidates" in rl_info:
            text += (f": of {rl_info['candidates']} candidates it answered {rl_info['candidates_em']} exactly and "
                     f"{rl_info['solved']} with the gold in its answer; the {rl_info.get('questions')} chosen include "
                     f"{rl_info['chosen_em']} answered exactly and {rl_info['chosen_cover_em']} containing the gold. "
                     f"The {p.rl_steps} x {p.rl_prompts} prompt slots cycle through them")
        lines += [text + ".", ""]
    if signal["steps"]:
        lines += [(f"Learning signal: on average {100 * signal['groups_with_signal_mean']:.0f} % of groups had reward "
                  f"spread (a non-zero GRPO advantage) per step, {100 * signal['groups_with_signal_after_probes_mean']:.0f} % "
                  f"once kept probes joined their groups; {signal['steps_with_a_correct_rollout']} of {signal['steps']} "
                  f"steps had at least one exactly-correct rollout (mean rollout EM rate "
                  f"{100 * signal['rollout_em_rate_mean']:.1f} %)."), ""]
    lines += [_steps_table(records)]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()] + [""]
    lines += ["## Example trajectories", ""]
    lines.append(trajectory_md(tokenizer, example, "A held-out question after training") if example is not None
                 else "(no evaluated trajectory to show)\n")
    lines.append(trajectory_md(tokenizer, probe, "A REX-RAG probe from training (PROBE = inserted prompt)") if probe is not None
                 else "(no probe was kept during training: every sampled answer was right, or none could be probed)\n")
    lines += ["## Files", "",
              ("- `eval_before/`, `eval_rag/`, `eval_warmup/`, `eval_after/`: metrics.json, metrics.md, predictions.jsonl "
              "(untrained agent, untrained naive RAG, warm-up checkpoint, trained checkpoint)"),
              ("- `warmup/`: the warm-up checkpoint; `rl_questions.jsonl`: the RL training questions; `train/`: "
              "metrics.jsonl and checkpoints"), "- `plots/`: PNG curves", ""]
    report_path = R.atomic_write_text(out / "report.md", "\n".join(lines))
    summary = {"profile": profile, "settings": asdict(p), "times_s": {k: round(v, 1) for k, v in times.items()},
               "evals": summaries, "before": summaries.get("untrained"), "after": summaries.get("trained"),
               "paired": numbers, "signal": signal, "rl_questions": rl_info, "headline": headline,
               "warmup_losses": warm["losses"], "plots": {k: str(v) for k, v in plots.items()},
               "probes_seen": len(probes), "checkpoint": checkpoint, "memory_mb": memory or {}, "memory_plan": plan_text,
               "peak_rss_mb": round(peak_rss_mb())}
    R.write_metrics_json(out / "summary.json", summary)
    return report_path
