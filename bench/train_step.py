"""One single-turn GRPO step, run by rexrag's Trainer and by TRL's GRPOTrainer, in one script (CPU).

Same model weights, prompts (chat-templated questions from the bundled demo set), group size G,
completion length (min_new_tokens = max_new_tokens, so no EOS stop), optimizer (AdamW, same lr,
no weight decay, grad clip 1.0), KL coefficient (k3, 0.001, frozen reference) and micro-batch size.
Generation in both is ``model.generate`` (TRL's transformers path), so the comparison isolates the
trainer around it. Reports per-step time, its split into generation and update, the ratio
rexrag / TRL, and the update phase's model-FLOPs utilisation against 150 GFLOP/s fp32
(DESIGN.md section 4): FLOPs = 6 N D for the training forward+backward plus 2 N D per extra
no-grad forward (rexrag: old-policy + reference; TRL with one iteration: reference only), with
N the (tied-once) parameter count and D the tokens in the batch (prompt + completion).

Usage: python bench/train_step.py [--model smollm2-135m] [--prompts 4] [--group 4] [--new-tokens 32]
                                  [--steps 2] [--micro 8] [--threads 0]
                                  [--order rexrag,trl] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PEAK_FLOPS = 150e9  # fp32 matmul rate measured on this 2-core machine (DESIGN.md section 4)


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


def load_questions(n: int) -> list[str]:
    from rexrag.data import demo_file, load_qa_files

    return [ex.question for ex in list(load_qa_files([demo_file("train.jsonl")]))[:n]]


# --------------------------------------------------------------------------- rexrag


class GenerateRollout:
    """Single-turn rollout with ``model.generate`` at a forced length; token-exact Trajectories."""

    def __init__(self, model, tokenizer, new_tokens: int):
        self.model, self.tok, self.L = model, tokenizer, new_tokens
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, examples, n):
        from rexrag.rollout.trajectory import Seg, Trajectory

        start = time.perf_counter()
        prompts = [self.tok.apply_chat_template([{"role": "user", "content": ex.question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False) for ex in examples]
        rows = [p for p in prompts for _ in range(n)]
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
        self.seconds += time.perf_counter() - start
        return trajs


def run_rexrag(args, model, tokenizer, examples, out_dir: Path) -> dict:
    from rexrag.config import load_config
    from rexrag.train.trainer import Trainer

    B = args.prompts * args.group
    cfg = load_config(None, [
        f"trainer.out_dir={out_dir}", f"trainer.lr={args.lr}", f"trainer.steps={args.steps + 1}",
        f"trainer.mini_batch_size={B}", f"trainer.micro_batch_size={args.micro}", "trainer.log_tensorboard=false",
        f"data.batch_size={args.prompts}", f"rollout.n={args.group}", "algo.kl_coef=0.001", "algo.kl_type=k3",
        "algo.clip_low=0.2", "algo.clip_high=0.2", "algo.loss_agg=token-mean", "data.shuffle=false",
    ])
    roll = GenerateRollout(model, tokenizer, args.new_tokens)
    tr = Trainer(cfg, model, tokenizer, examples, rollout_fn=roll, reward_fn=reward_fn, progress=False)
    steps = []
    for i in range(args.steps + 1):
        m = tr.step()
        if i == 0:
            continue  # warm-up step (allocator, first-call overheads)
        gen = m["timing/gen_s"]
        steps.append({"step_s": m["timing/step_s"], "gen_s": gen, "update_s": m["timing/step_s"] - gen - m["timing/reward_s"]})
    return {"steps": steps, "extra_forwards": 2}


# --------------------------------------------------------------------------- TRL


def run_trl(args, model, tokenizer, questions: list[str], out_dir: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    B = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, max_steps=args.steps + 1, learning_rate=args.lr, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", seed=0,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=B // args.micro,
        num_generations=args.group, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.001, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        gradient_checkpointing=False,  # TRL's default is True; rexrag's is False: compare like with like
        disable_dropout=True, dataloader_num_workers=0, shuffle_dataset=False, log_completions=False,
    )
    dataset = [{"prompt": [{"role": "user", "content": q}]} for q in questions]
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=config, train_dataset=Dataset.from_list(dataset),
                          processing_class=tokenizer)
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
    return {"steps": steps[1:], "extra_forwards": 1}


# --------------------------------------------------------------------------- main


def summarise(name: str, res: dict, n: int, tokens: int) -> dict:
    med = {k: statistics.median(s[k] for s in res["steps"]) for k in ("step_s", "gen_s", "update_s")}
    flops = (6 + 2 * res["extra_forwards"]) * n * tokens
    med["update_gflops"] = flops / 1e9
    med["update_mfu"] = flops / med["update_s"] / PEAK_FLOPS
    print(f"{name:7s} step {med['step_s']:7.2f}s  generation {med['gen_s']:7.2f}s  update {med['update_s']:7.2f}s  "
          f"update MFU {100 * med['update_mfu']:5.1f}% ({med['update_gflops']:.0f} GFLOP)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--order", default="rexrag,trl", choices=["rexrag,trl", "trl,rexrag"], help="which runs first")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.prompts * args.group) % args.micro:
        raise SystemExit("--micro must divide prompts * group")

    from transformers import AutoModelForCausalLM

    from rexrag.data import QAExample
    from rexrag.models import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.model)
    questions = load_questions(args.prompts * (args.steps + 1))
    examples = [QAExample(id=str(i), question=q, golden_answers=[""], group_id=i) for i, q in enumerate(questions)]
    prompt_tokens = [len(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                        tokenize=True, return_dict=False)) for q in questions]

    results = {}
    # D: prompt + completion tokens of one step's batch (mean prompt length over the prompts used)
    tokens = int(args.group * (sum(prompt_tokens) / (args.steps + 1) + args.prompts * args.new_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.order.split(","):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            n = n_params(model)
            if name == "rexrag":
                res = run_rexrag(args, model, tokenizer, examples, Path(tmp) / "rexrag")
            else:
                res = run_trl(args, model, tokenizer, questions, Path(tmp) / "trl")
            results[name] = summarise(name, res, n, tokens)
            del model
    ratio = {k: results["rexrag"][k] / results["trl"][k] for k in ("step_s", "gen_s", "update_s")}
    print(f"rexrag / TRL time: step {ratio['step_s']:.2f}x  generation {ratio['gen_s']:.2f}x  update {ratio['update_s']:.2f}x")
    report = {"args": vars(args), "params": n, "tokens_per_step": tokens, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "results": results, "ratio": ratio}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
