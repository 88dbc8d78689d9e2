"""Format warm-up: a short supervised fine-tune on automatically built search trajectories.

Why: small instruct models rarely follow the tag protocol (SmolLM2-135M emits a search tag about
once in 24 samples), so RL from an exact-match reward starts at zero reward and learns nothing.
The paper does not need this (Qwen2.5-3B follows the protocol); Search-R1 users commonly add a
format reward instead. Here we teach the protocol directly, and only the protocol: the targets are
the agent's own actions, never the retrieved text.

Each warm-up trajectory is token-exact, in the same layout the agent produces at rollout time::

    PROMPT   build_prompt_ids(question)
    POLICY   <think> ... </think>\\n<search> QUERY </search>
    INFO     \\n\\n<information>Doc 1(Title: ...) ...</information>\\n\\n     (real retrieved passages)
    POLICY   <think> ... </think>\\n<search> TITLE </search>                 (optional second hop)
    INFO     ...
    POLICY   <think> ... </think>\\n<answer> GOLD </answer>

Queries: the first is the question itself; the optional second hop searches the title of a gold
(supporting) passage that the first search missed when the example's metadata lists
``supporting_titles`` (HotpotQA / 2Wiki), otherwise the title of the best retrieved passage that the
question does not already name. Loss = mean negative log-likelihood over POLICY tokens only
(``loss_mask_for``), so INFO and PROMPT tokens get no gradient.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rexrag.config import OPTIMIZER_STATE_DTYPES
from rexrag.data import QAExample
from rexrag.errors import UserError
from rexrag.fsutil import atomic_dir
from rexrag.memory import trim_heap
from rexrag.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    DEFAULT_TOPK,
    INFO_CLOSE,
    INFO_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    format_information,
)
from rexrag.rollout.trajectory import Seg, Trajectory, to_batch
from rexrag.train.optim import make_optimizer


@dataclass
class WarmupConfig:
    n_examples: int = 32  # training questions turned into trajectories (0 = all given)
    steps: int = 16  # optimizer steps
    batch_size: int = 4  # trajectories per step
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    topk: int = DEFAULT_TOPK
    max_obs_tokens: int = 500  # retrieved text per search is cut to this many tokens, as in the agent
    second_hop: str = "auto"  # auto (when a useful second query exists) | never
    template: str = "rexrag"
    format: str = "tags"  # tags | tool_calls: the agent format taught (rollout.format; tool_calls needs a chat template)
    tool_parser: str = "hermes"  # tool_calls: the call syntax taught (rollout.tool_parser)
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False  # recompute decoder activations in backward: far less memory, ~1/3 more compute
    optimizer_state_dtype: str = "float32"  # AdamW moments: float32 | bfloat16 (half the memory; rexrag.train.optim)
    seed: int = 0

    def __post_init__(self):
        if self.second_hop not in ("auto", "never"):
            raise UserError(f"warmup second_hop={self.second_hop!r}; choose 'auto' or 'never'")
        if min(self.steps, self.batch_size, self.topk, self.max_obs_tokens) < 1 or self.n_examples < 0:
            raise UserError("warmup steps, batch_size, topk and max_obs_tokens must be >= 1 (n_examples >= 0)")
        if self.format not in ("tags", "tool_calls"):
            raise UserError(f"warmup format={self.format!r}; choose 'tags' or 'tool_calls'")
        if self.optimizer_state_dtype not in OPTIMIZER_STATE_DTYPES:
            raise UserError(f"warmup optimizer_state_dtype={self.optimizer_state_dtype!r}; choose one of {OPTIMIZER_STATE_DTYPES}")


# --------------------------------------------------------------------------- building trajectories


def info_ids(passages, tokenizer, max_obs_tokens: int) -> list[int]:
    """The inserted observation, tokenised exactly as ``SearchAgent`` inserts it at rollout time:
    ``INFO_OPEN`` + the formatted passages cut to ``max_obs_tokens`` tokens + ``INFO_CLOSE``, each
    tokenised on its own."""
    body = _ids(tokenizer, format_information(passages))[:max_obs_tokens]
    return _ids(tokenizer, INFO_OPEN) + body + _ids(tokenizer, INFO_CLOSE)


def search_query(question: str) -> str:
    """First query: the question, without the trailing question mark and extra spaces."""
    return " ".join(question.strip().rstrip("?").split())


def search_turn_text(query: str, turn: int = 0) -> str:
    """The policy's search turn as the warm-up teaches it (a thought, then the query in search tags)."""
    thought = "I need to search for this." if turn == 0 else f"I should also look up {query}."
    return f"{THINK_OPEN} {thought} {THINK_CLOSE}\n{SEARCH_OPEN} {query} {SEARCH_CLOSE}"


def second_query(example: QAExample, first_hits) -> str | None:
    """A follow-up query for a multi-hop question, or None when none would add anything."""
    seen = {p.title.lower() for p in first_hits}
    for title in (example.metadata or {}).get("supporting_titles") or []:
        if title.lower() not in seen:
            return str(title)
    if (example.metadata or {}).get("supporting_titles"):
        return None  # every gold passage was already found
    question = example.question.lower()
    for p in first_hits:
        if p.title and p.title.lower() not in question:
            return p.title
    return None


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_warmup_trajectory(tokenizer, example: QAExample, hops: list[tuple[str, list]], cfg: WarmupConfig) -> Trajectory:
    """One token-exact trajectory: prompt, ``(query, passages)`` search turns, then the gold answer."""
    from rexrag.prompts import build_prompt_ids

    if not example.golden_answers:
        raise UserError(f"warm-up example {example.id!r} has no golden answer")
    if cfg.format == "tool_calls":
        return _tool_call_trajectory(tokenizer, example, hops, cfg)
    traj = Trajectory(group_id=example.group_id, example=example)
    traj.extend(build_prompt_ids(tokenizer, example.question, cfg.template), Seg.PROMPT, 0)
    for turn, (query, passages) in enumerate(hops):
        action = _ids(tokenizer, search_turn_text(query, turn))
        traj.extend(action, Seg.POLICY, turn, [0.0] * len(action))
        traj.extend(info_ids(passages, tokenizer, cfg.max_obs_tokens), Seg.INFO, turn)
    gold = example.golden_answers[0].strip()
    final = _ids(tokenizer, f"{THINK_OPEN} The passages give the answer. {THINK_CLOSE}\n{ANSWER_OPEN} {gold} {ANSWER_CLOSE}")
    traj.extend(final, Seg.POLICY, len(hops), [0.0] * len(final))
    traj.n_searches, traj.stop_reason, traj.answer = len(hops), "answer", gold
    traj.check()
    return traj


def _tool_call_trajectory(tokenizer, example: QAExample, hops: list[tuple[str, list]], cfg: WarmupConfig) -> Trajectory:
    """The same teaching in ``rollout.format=tool_calls``, laid out as the agent records it: the chat prompt with
    the search tool declared, each search a native call ended by EOS (POLICY), the tool message's rendered delta
    (INFO: the passages cut to ``max_obs_tokens`` tokens), then the answer message and EOS."""
    from rexrag.prompts import render_prompt, tool_template
    from rexrag.rollout.tool_calls import ChatFormat, cap_text, resolve_tools, write_call

    chat = ChatFormat(tokenizer, resolve_tools(["search"]), cfg.tool_parser)
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.decode([eos], skip_special_tokens=False)
    prompt, _ = chat.prompt(render_prompt(example.question, tool_template(cfg.template)))
    traj = Trajectory(group_id=example.group_id, example=example, meta={"format": "tool_calls"})
    traj.extend(prompt, Seg.PROMPT, 0)
    for turn, (query, passages) in enumerate(hops):
        action = _ids(tokenizer, write_call(cfg.tool_parser, "search", {"query": query})) + [eos]
        traj.extend(action, Seg.POLICY, turn, [0.0] * len(action))
        content = cap_text(tokenizer, format_information(passages), cfg.max_obs_tokens)
        traj.extend(chat.delta_ids([{"role": "tool", "name": "search", "content": content}], eos_text), Seg.INFO, turn)
    gold = example.golden_answers[0].strip()
    start = len(traj)
    final = _ids(tokenizer, f"{ANSWER_OPEN} {gold} {ANSWER_CLOSE}") + [eos]
    traj.extend(final, Seg.POLICY, len(hops), [0.0] * len(final))
    traj.n_searches, traj.stop_reason, traj.answer, traj.answer_span = len(hops), "answer", gold, (start, len(traj))
    traj.check()
    return traj


def build_warmup_trajectories(tokenizer, retriever, examples: list[QAExample], cfg: WarmupConfig) -> list[Trajectory]:
    """Search the retriever (batched, one call per hop) and build one trajectory per example."""
    examples = list(examples)
    if cfg.n_examples:
        examples = random.Random(cfg.seed).sample(examples, min(cfg.n_examples, len(examples)))
    if not examples:
        raise UserError("warm-up needs at least one training question")
    first = retriever.search([search_query(e.question) for e in examples], cfg.topk)
    follow = [second_query(e, hits) if cfg.second_hop == "auto" else None for e, hits in zip(examples, first)]
    todo = [i for i, q in enumerate(follow) if q]
    second = dict(zip(todo, retriever.search([follow[i] for i in todo], cfg.topk))) if todo else {}
    trajs = []
    for i, ex in enumerate(examples):
        hops = [(search_query(ex.question), first[i])]
        if i in second:
            hops.append((follow[i], second[i]))
        trajs.append(build_warmup_trajectory(tokenizer, ex, hops, cfg))
    return trajs


# --------------------------------------------------------------------------- training


def nll_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the loss-masked tokens (POLICY only; INFO/PROMPT excluded).

    batch: ``to_batch`` output; input_ids, attention_mask, loss_mask all [B, T].
    """
    from rexrag.models import sequence_logprobs

    lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"])  # [B, T]
    mask = batch["loss_mask"].to(lp.dtype)
    return -(lp * mask).sum() / mask.sum().clamp(min=1.0)


def finetune(model, tokenizer, trajs: list[Trajectory], cfg: WarmupConfig, device: str = "cpu", quiet: bool = False) -> list[float]:
    """AdamW on the warm-up trajectories for ``cfg.steps`` steps; returns the loss of every step.

    Batches cycle through a seeded shuffle of ``trajs``; the model is left in eval mode (with
    ``cfg.gradient_checkpointing`` it keeps checkpointing enabled; that only acts in train mode).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rng = random.Random(cfg.seed)
    order: list[int] = []
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("warm-up: the model has no trainable parameters")
    if cfg.gradient_checkpointing:
        from rexrag.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    opt = make_optimizer(params, cfg.lr, cfg.weight_decay, cfg.optimizer_state_dtype, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_bf16 = cfg.autocast_bf16 and torch.device(device).type in ("cpu", "cuda")
    losses: list[float] = []
    model.train()
    with Progress(TextColumn("[bold]warm-up"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), disable=quiet) as progress:
        task = progress.add_task("warm-up", total=cfg.steps, loss="-")
        for _ in range(cfg.steps):
            while len(order) < cfg.batch_size:
                block = list(range(len(trajs)))
                rng.shuffle(block)
                order += block
            picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = {k: v.to(device) for k, v in to_batch([trajs[i] for i in picked], pad, train_probe_tokens=False).items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = nll_loss(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)  # no gradients held through the next forward
            trim_heap()
            losses.append(float(loss.detach()))
            progress.update(task, advance=1, loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def save_checkpoint(model, tokenizer, out: str | Path, extra: dict | None = None) -> Path:
    """``save_pretrained`` model + tokenizer into ``out`` atomically (temp dir, then rename)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "warmup.json").write_text(json.dumps(extra, indent=2) + "\n")
    return Path(out)


def run_warmup(model, tokenizer, retriever, examples: list[QAExample], cfg: WarmupConfig, out: str | Path | None,
               device: str = "cpu", quiet: bool = False) -> dict:
    """Build trajectories, fine-tune, save (when ``out``). Returns a summary dict (also warmup.json)."""
    start = time.perf_counter()
    trajs = build_warmup_trajectories(tokenizer, retriever, examples, cfg)
    built = time.perf_counter()
    losses = finetune(model, tokenizer, trajs, cfg, device=device, quiet=quiet)
    summary = {
        "config": asdict(cfg),
        "trajectories": len(trajs),
        "two_hop": sum(1 for t in trajs if t.n_searches > 1),
        "mean_tokens": sum(len(t) for t in trajs) / len(trajs),
        "mean_target_tokens": sum(t.count(Seg.POLICY) for t in trajs) / len(trajs),
        "losses": [round(x, 5) for x in losses],
        "seconds_build": round(built - start, 2),
        "seconds_train": round(time.perf_counter() - built, 2),
    }
    if out is not None:
        save_checkpoint(model, tokenizer, out, summary)
        summary["checkpoint"] = str(out)
    return summary
