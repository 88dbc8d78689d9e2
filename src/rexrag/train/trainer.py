"""The RL training loop. One step reads top to bottom (see :meth:`Trainer.step`):

sample prompts -> rollouts (n per prompt) -> rewards -> [REX: explore] -> old-policy / reference
log-probs recomputed on the exact tokens -> [REX: correct] -> advantages -> ``ppo_epochs`` passes of
mini-batch updates (gradient accumulation over micro-batches, clipping) -> log -> [REX: end_step].

Multi-process data parallel goes through ``accelerate`` (DDP; FSDP/DeepSpeed configs in
``configs/accelerate``). Every process draws the same global prompt batch and takes prompts
``rank, rank + W, ...``, so whole groups live on one process and group advantages need no
communication. Mini-batch ``i`` is chunk ``i`` of every process's rows; losses are normalised by
the mini-batch's *global* token/sequence counts, so W processes give the gradient of one process
with the same global batch. Exceptions to exactness: ``reinforce_pp`` whitens per process, and
sampling differs unless the rollout function seeds by prompt. Launch several CPU processes with
``accelerate launch --multi_gpu --num_processes N`` (torchrun workers; gloo on a CUDA-less machine):
accelerate's ``--cpu`` launch path starts a single process. ``seq-mean-token-sum-norm`` divides by the
constant ``rollout.max_total_tokens``.

Differences from verl / Search-R1: no mini-batch shuffling (it would tie results to the process
count); the value model (``gae``) is a separate copy of the policy's decoder with a linear head; a
non-finite loss or gradient skips the optimizer update (counted in ``actor/nan_skips``) instead of
writing NaN into the weights.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from rexrag.algos.advantages import get_adv_estimator, token_rewards
from rexrag.algos.losses import entropy_from_logits, entropy_loss, kl_loss, kl_penalty, masked_mean, policy_loss, value_loss
from rexrag.config import Config, config_to_dict
from rexrag.errors import UserError
from rexrag.rewards import format_ok
from rexrag.rollout.agent import format_view, policy_answer, response_text
from rexrag.rollout.trajectory import Seg, Trajectory, to_batch
from rexrag.train import checkpoint as ckpt
from rexrag.train.logging import MetricsLogger, memory_metrics

RolloutFn = Callable[[list, int], list[Trajectory]]
# Micro-batch losses are normalised by mini-batch totals, so they add up to the mini-batch loss.
_SUMMED = frozenset({"actor/pg_loss", "actor/kl_loss", "critic/vf_loss", "actor/loss"})


class Explorer(Protocol):
    """The REX-RAG hook (implemented by ``rexrag.rex.explorer.RexExplorer``). Per step the trainer calls
    ``explore`` after rewards (kept probes join the batch after the originals), ``correct`` after the
    old/reference log-probs (its behaviour log-probs replace the old ones in the PPO ratio; optional
    [B] sequence weights scale each row's loss) and ``end_step`` after the update. ``state_dict`` /
    ``load_state_dict``, when present, are saved in and restored from checkpoints."""

    def explore(self, originals, rewards, agent, score_fn, reward_fn) -> list[Trajectory]: ...
    def correct(self, batch, old_logprobs, is_probe, probe_start) -> tuple[Tensor, Optional[Tensor], dict]: ...
    def end_step(self) -> dict: ...


# --------------------------------------------------------------------------- small pieces


class PromptSampler:
    """Deterministic epoch-wise shuffled prompt order; state = number of prompts consumed."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n == 0:
            raise UserError("no training examples (data.train_files is empty or every row was skipped)")
        self.n, self.batch_size, self.seed, self.shuffle, self.consumed = n, batch_size, seed, shuffle, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(self.consumed, self.n)
            out.append(self._order(epoch)[pos])
            self.consumed += 1
        return out

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


class ValueModel(nn.Module):
    """Critic for ``gae``: a copy of the policy's decoder plus a zero-initialised linear head.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> values [B, T]`` with ``values[:, t]`` the
    value of the state before token t (aligned with per-token log-probs; ``values[:, 0] = 0``).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.backbone = copy.deepcopy(base.get_decoder())
        self.backbone.requires_grad_(True)
        self.head = nn.Linear(base.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).last_hidden_state
        v = self.head(h).squeeze(-1).float()
        return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, with_entropy: bool = False):
    """[B, T] log p(token t | < t) (position 0 = 0) and, if asked, the [B, T] entropy of each step."""
    if not with_entropy:
        from rexrag.models import sequence_logprobs

        return sequence_logprobs(model, input_ids, attention_mask), None
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits[:, :-1].float()
    lp = logits.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    zero = torch.zeros_like(lp[:, :1])
    return torch.cat([zero, lp], 1), torch.cat([zero, entropy_from_logits(logits)], 1)


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/(w+1) to 1 over ``warmup_steps`` steps, then constant."""
    return lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _finite(x: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Runs ``cfg.trainer.steps`` RL steps of ``model`` on ``examples``.

    Args:
        cfg: full :class:`rexrag.config.Config` (algo, rollout.n, data.batch_size, trainer.*, rex.*).
        model: the policy (HF causal LM, optionally peft-wrapped); trained in place.
        tokenizer: for decoding responses for the reward and for saving with checkpoints.
        examples: QA examples (``rexrag.data.QAExample``) with unique ``group_id``.
        rollout_fn: ``fn(examples, n) -> list[Trajectory]`` (n per example, same group id);
            defaults to ``agent.rollout``.
        agent: the ``SearchAgent`` (needed by the explorer to continue probes).
        explorer: REX-RAG hook object (explore / correct / end_step), or None.
        reward_fn: callable ``fn(completions, answers, **kw) -> list[float]`` (``kw`` holds
            ``predictions`` and ``formatted``, see ``compute_rewards``); default
            ``rexrag.rewards.get_reward(cfg.trainer.reward)``.
        accelerator: an ``accelerate.Accelerator``; one is created when None.
        reference: frozen reference model; default ``rexrag.models.make_reference`` (None with LoRA:
            adapters are disabled instead). Not built when ``algo.kl_coef == 0``.
    """

    def __init__(self, cfg: Config, model, tokenizer, examples: list, *, rollout_fn: RolloutFn | None = None,
                 agent=None, explorer: Explorer | None = None, reward_fn: Callable | None = None,
                 accelerator=None, reference: Any = "auto", progress: bool = True):
        from accelerate import Accelerator

        self.cfg, self.tc, self.algo = cfg, cfg.trainer, cfg.algo
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.data.batch_size % self.world:
            raise UserError(f"data.batch_size={cfg.data.batch_size} must be divisible by the number of processes ({self.world})")
        if rollout_fn is None and agent is None:
            raise UserError("Trainer needs a rollout_fn or a SearchAgent")
        self.rollout_fn = rollout_fn or agent.rollout
        self.agent, self.explorer, self.tokenizer, self.examples = agent, explorer, tokenizer, examples
        self.reward_fn = reward_fn or self._named_reward(self.tc.reward)
        self.estimator = get_adv_estimator(self.algo.adv_estimator)
        seed_everything(self.tc.seed)
        self.sampler = PromptSampler(len(examples), cfg.data.batch_size, self.tc.seed, cfg.data.shuffle)
        self.critic = ValueModel(model) if self.algo.adv_estimator == "gae" else None
        self.reference = None
        if self.algo.kl_coef > 0 or self.algo.kl_in_reward:
            from rexrag.models import make_reference

            self.reference = make_reference(model, cfg.model) if reference == "auto" else reference
        self.model, self.optimizer, self.scheduler = self._prepare(model)
        self.step_idx, self.nan_skips = 0, 0
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        self.progress = progress
        # Per-rank sampling seed so processes draw different samples for their prompts.
        seed_everything(self.tc.seed + 1_000_003 * self.rank)

    @staticmethod
    def _named_reward(name: str):
        from rexrag.rewards import get_reward

        return get_reward(name)

    def _prepare(self, model):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.tc.lr}]
        if not groups[0]["params"]:
            raise UserError("the model has no trainable parameters")
        modules = [model]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": self.tc.critic_lr or self.tc.lr})
            modules.append(self.critic)
        opt = torch.optim.AdamW(groups, lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(self.tc.warmup_steps))
        prepared = self.acc.prepare(*modules, opt)
        if self.critic is not None:
            model, self.critic, opt = prepared
        else:
            model, opt = prepared
        if self.reference is not None:
            self.reference.to(self.acc.device)
        model.train()
        return model, opt, sched

    # ------------------------------------------------------------------ the step

    def step(self) -> dict[str, float]:
        """One RL step; returns the (process-averaged) metrics."""
        t = {"start": time.perf_counter()}
        prompts = self.sampler.next_batch()[self.rank :: self.world]  # whole groups per process
        examples = [self.examples[i] for i in prompts]
        self._reseed_rollout()
        with self._timed(t, "weight_sync"):
            self._sync_rollout_weights()
        with self._timed(t, "gen"):
            self.model.eval()
            trajs = self.rollout_fn(examples, self.cfg.rollout.n)
            self.model.train()
        # copy now: probe continuations below run the same agent and overwrite its last_metrics
        agent_metrics = dict(getattr(self.agent, "last_metrics", None) or {})
        with self._timed(t, "reward"):
            rewards = self.compute_rewards(trajs)
        n_orig, rex_metrics = len(trajs), {}
        if self.explorer is not None:
            with self._timed(t, "explore"):
                probes = self.explorer.explore(trajs, rewards, self.agent, self.score_fn, self.compute_rewards)
            trajs = trajs + list(probes)
        self._engine_call("sleep")  # a colocated engine's memory is free for the update (vllm_sleep on GPU)
        batch = to_batch(trajs, self.pad_id, self.cfg.rex.train_probe_tokens)
        batch = {k: v.to(self.acc.device) for k, v in batch.items()}
        batch["rewards"] = torch.tensor([tr.meta["reward"] for tr in trajs], dtype=torch.float32, device=self.acc.device)
        with self._timed(t, "logprob"):
            self._score(batch)
        if self.explorer is not None:
            is_probe = torch.tensor([tr.is_probe for tr in trajs], device=self.acc.device)
            probe_start = torch.tensor([tr.probe_start for tr in trajs], dtype=torch.long, device=self.acc.device)
            beh, seq_w, rex_metrics = self.explorer.correct(batch, batch["old_logp"], is_probe, probe_start)
            batch["behaviour_logp"], batch["seq_weights"] = beh, seq_w
        with self._timed(t, "adv"):
            self._advantages(batch)
        with self._timed(t, "update"):
            upd = self.update(batch)
        self.scheduler.step()
        self.step_idx += 1
        if self.explorer is not None:
            rex_metrics = {**rex_metrics, **self.explorer.end_step()}
        metrics = {**self._rollout_metrics(trajs[:n_orig], batch, rewards, agent_metrics), **upd,
                   **{k if k.startswith("rex/") else f"rex/{k}": v for k, v in rex_metrics.items()}}
        metrics = self._reduce(metrics)
        t_total = time.perf_counter() - t["start"]
        n_tok = float(batch["attention_mask"].sum()) * self.world
        metrics.update({f"timing/{k}_s": v for k, v in t.items() if k != "start"})
        metrics.update({"timing/step_s": t_total, "timing/tokens_per_s": n_tok / max(t_total, 1e-9), **memory_metrics()})
        return metrics

    def _reseed_rollout(self) -> None:
        """Seed the generation backend from (seed, step, rank): a resumed run samples what an
        uninterrupted one would have (the backend's generator is not part of the global RNG state)."""
        gen = getattr(getattr(self.agent, "backend", None), "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(self.tc.seed * 1_000_003 + self.step_idx * 7919 + self.rank)

    def _engine_call(self, method: str) -> None:
        fn = getattr(getattr(self.agent, "backend", None), method, None)
        if fn is not None:
            fn()

    def _sync_rollout_weights(self) -> None:
        """A colocated engine (vLLM) samples from its own copy of the weights: wake it and push the
        current ones in (a no-op when unchanged). The HF backend samples from the model itself."""
        self._engine_call("wake_up")
        sync = getattr(getattr(self.agent, "backend", None), "sync_weights", None)
        if sync is not None:
            sync(self.acc.unwrap_model(self.model))

    @contextlib.contextmanager
    def _timed(self, t: dict, name: str):
        start = time.perf_counter()
        yield
        t[name] = t.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ rewards and scoring

    def completion_text(self, traj: Trajectory) -> str:
        """Decoded response used by reward functions (the model's and the retriever's text, no notices)."""
        return response_text(self.tokenizer, traj)

    def format_ok(self, traj: Trajectory) -> bool:
        """``format_ok`` of the response with every retrieved block emptied (``format_view``)."""
        return format_ok(format_view(self.tokenizer, traj))

    def compute_rewards(self, trajs: list[Trajectory]) -> list[float]:
        """Reward of each trajectory (also stored in ``traj.meta['reward']``).

        The reward function gets the response texts, the gold answers and, as keywords,
        ``predictions`` (the model's answer read from its own tokens, ``policy_answer``) and
        ``formatted`` (``self.format_ok``), so a retrieved passage cannot answer for the model.
        """
        if not trajs:
            return []
        answers = [list(getattr(tr.example, "golden_answers", []) or []) for tr in trajs]
        out = [float(r) for r in self.reward_fn(
            [self.completion_text(tr) for tr in trajs], answers,
            predictions=[policy_answer(self.tokenizer, tr) for tr in trajs],
            formatted=[self.format_ok(tr) for tr in trajs])]
        if len(out) != len(trajs):
            raise UserError(f"reward function returned {len(out)} rewards for {len(trajs)} completions")
        for tr, r in zip(trajs, out):
            tr.meta["reward"] = r
        return out

    @torch.no_grad()
    def score_fn(self, trajs: list[Trajectory]) -> list[Tensor]:
        """Old-policy per-token log-probs of each trajectory ([len(traj)] each; position 0 = 0).

        Scored in eval mode (no dropout), like the old log-probs of the update (``_score``), so the
        probe filter ranks by the policy itself; the model's previous mode is restored.
        """
        if not trajs:
            return []
        b = to_batch(trajs, self.pad_id)
        was_training = self.model.training
        self.model.eval()
        try:
            lp = self._micro_logprobs(self.model, b["input_ids"].to(self.acc.device), b["attention_mask"].to(self.acc.device))
        finally:
            self.model.train(was_training)
        return [lp[i, : len(tr)].cpu() for i, tr in enumerate(trajs)]

    def _autocast(self):
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.autocast_bf16)

    @torch.no_grad()
    def _micro_logprobs(self, model, ids: Tensor, mask: Tensor) -> Tensor:
        mb = self.tc.micro_batch_size
        with self._autocast():
            parts = [token_logprobs(model, ids[i : i + mb], mask[i : i + mb])[0] for i in range(0, ids.shape[0], mb)]
        return torch.cat(parts).float()

    @torch.no_grad()
    def _score(self, batch: dict) -> None:
        """Old-policy, reference and (gae) value estimates on the exact batch tokens."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        self.model.eval()
        batch["old_logp"] = self._micro_logprobs(self.model, ids, am)
        batch["behaviour_logp"], batch["seq_weights"] = batch["old_logp"], None
        if self.algo.kl_coef > 0 or self.algo.kl_in_reward:
            if self.reference is not None:
                batch["ref_logp"] = self._micro_logprobs(self.reference, ids, am)
            else:
                from rexrag.models import reference_logprobs_context

                with reference_logprobs_context(self.acc.unwrap_model(self.model)):
                    batch["ref_logp"] = self._micro_logprobs(self.model, ids, am)
        if self.critic is not None:
            mb = self.tc.micro_batch_size
            with self._autocast():
                batch["old_values"] = torch.cat([self.critic(ids[i : i + mb], am[i : i + mb]) for i in range(0, ids.shape[0], mb)]).float()
        self.model.train()

    def _advantages(self, batch: dict) -> None:
        mask = batch["loss_mask"]
        rewards = batch["rewards"]
        if self.algo.kl_in_reward:
            kl = kl_penalty(batch["old_logp"], batch["ref_logp"], self.algo.kl_type)
            rewards = token_rewards(rewards, mask) - self.algo.kl_coef * torch.where(mask > 0, kl, torch.zeros_like(kl))
        adv, ret = self.estimator(rewards, mask, batch["group_ids"], batch.get("old_values"), self.algo)
        batch["advantages"], batch["returns"] = adv, ret

    # ------------------------------------------------------------------ update

    def _global_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        return float(self.acc.reduce(torch.tensor([x], dtype=torch.float64, device=self.acc.device), "sum")[0])

    def _chunks(self, n_rows: int) -> list[Tensor]:
        """Local row indices of each mini-batch: chunk i of every process forms global mini-batch i."""
        n_mini = max(1, round(self._global_sum(float(n_rows)) / self.tc.mini_batch_size))
        n_mini = min(n_mini, self._global_min(n_rows))  # every process needs >= 1 row per mini-batch
        return list(torch.arange(n_rows).tensor_split(n_mini))

    def _global_min(self, x: int) -> int:
        return int(self.acc.reduce(torch.tensor([float(x)], device=self.acc.device), "min")[0]) if self.world > 1 else x

    def update(self, batch: dict) -> dict[str, float]:
        """``ppo_epochs`` passes over the batch in mini-batches; returns mean actor/critic metrics."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        chunks = self._chunks(batch["input_ids"].shape[0])
        horizon = self.cfg.rollout.max_total_tokens  # constant length for seq-mean-token-sum-norm
        for _ in range(self.tc.ppo_epochs):
            for rows in chunks:
                for k, v in self._mini_batch_update(batch, rows, horizon).items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        out = {k: sums[k] / counts[k] for k in sums}
        out["actor/nan_skips"] = float(self.nan_skips)
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _mini_batch_update(self, batch: dict, rows: Tensor, horizon: int) -> dict[str, float]:
        mask = batch["loss_mask"][rows]
        # Global normalisers (divided by W because DDP averages gradients over processes).
        norm = {"num_tokens": max(self._global_sum(float(mask.sum())), 1.0) / self.world,
                "num_seqs": max(self._global_sum(float((mask.sum(-1) > 0).sum())), 1.0) / self.world,
                "horizon": horizon}
        mb = self.tc.micro_batch_size
        micro = [rows[i : i + mb] for i in range(0, len(rows), mb)]
        metrics: dict[str, float] = {}
        finite = True
        for j, idx in enumerate(micro):
            with contextlib.ExitStack() as stack:
                if j < len(micro) - 1 and self.world > 1:  # one gradient all-reduce per mini-batch
                    for module in (self.model, self.critic):
                        if module is not None:
                            stack.enter_context(self.acc.no_sync(module))
                loss, m = self._micro_loss(batch, idx, norm)
                finite &= _finite(loss.detach())
                self.acc.backward(loss)
            for k, v in m.items():  # loss values are partial sums of the mini-batch loss; the rest are means
                metrics[k] = metrics.get(k, 0.0) + (v if k in _SUMMED else v / len(micro))
        actor_params = [p for p in self.model.parameters() if p.requires_grad]
        # (DeepSpeed clips inside its engine and returns None here.)
        gnorm = self.acc.clip_grad_norm_(actor_params, self.tc.max_grad_norm)
        metrics["actor/grad_norm"] = float(gnorm) if gnorm is not None else float("nan")
        ok = finite and (gnorm is None or _finite(gnorm))
        if self.critic is not None:
            cnorm = self.acc.clip_grad_norm_(list(self.critic.parameters()), self.tc.max_grad_norm)
            metrics["critic/grad_norm"] = float(cnorm) if cnorm is not None else float("nan")
            ok = ok and (cnorm is None or _finite(cnorm))
        if ok:
            self.optimizer.step()
        else:  # never let NaN/inf reach the weights or the Adam moments
            self.nan_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _micro_loss(self, batch: dict, idx: Tensor, norm: dict) -> tuple[Tensor, dict[str, float]]:
        ids, am, mask = batch["input_ids"][idx], batch["attention_mask"][idx], batch["loss_mask"][idx]
        with self._autocast():
            logp, ent = token_logprobs(self.model, ids, am, with_entropy=self.algo.entropy_coef > 0)
        logp = logp.float()
        seq_w = batch["seq_weights"][idx] if batch.get("seq_weights") is not None else None
        loss, m = policy_loss(logp, batch["behaviour_logp"][idx], batch["advantages"][idx], mask, self.algo, seq_w, **norm)
        if self.algo.kl_coef > 0 and not self.algo.kl_in_reward:
            kl, km = kl_loss(logp, batch["ref_logp"][idx], mask, self.algo, **norm)
            loss = loss + self.algo.kl_coef * kl
            m.update(km)
        if ent is not None:
            e, em = entropy_loss(ent.float(), mask, self.algo.loss_agg, **norm)
            loss = loss - self.algo.entropy_coef * e
            m.update(em)
        if self.critic is not None:
            with self._autocast():
                values = self.critic(ids, am).float()
            vl, vm = value_loss(values, batch["old_values"][idx], batch["returns"][idx], mask, self.algo.value_clip, "token-mean", num_tokens=norm["num_tokens"])
            loss = loss + self.algo.vf_coef * vl
            m.update(vm)
        m["actor/loss"] = float(loss.detach())
        return loss, m

    # ------------------------------------------------------------------ metrics

    def _rollout_metrics(self, originals: list[Trajectory], batch: dict, rewards: list[float], agent_metrics: dict) -> dict[str, float]:
        r = torch.tensor(rewards, dtype=torch.float64)
        resp = torch.tensor([len(tr) - tr.prompt_len for tr in originals], dtype=torch.float64)
        policy_tok = torch.tensor([tr.count(Seg.POLICY) for tr in originals], dtype=torch.float64)
        out = {
            "reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
            "reward/max": float(r.max()), "reward/min": float(r.min()),
            "reward/positive_rate": float((r > 0).double().mean()),
            "rollout/response_length_mean": float(resp.mean()), "rollout/response_length_max": float(resp.max()),
            "rollout/policy_tokens_mean": float(policy_tok.mean()),
            "rollout/searches_per_traj": float(sum(tr.n_searches for tr in originals) / len(originals)),
            "rollout/answered_rate": float(sum(policy_answer(self.tokenizer, tr) is not None for tr in originals) / len(originals)),
            "rollout/trajectories": float(batch["input_ids"].shape[0]),
            "actor/entropy_mc": float(-masked_mean(batch["old_logp"], (batch["segments"] == Seg.POLICY).float())),
            "actor/adv_mean": float(masked_mean(batch["advantages"], batch["loss_mask"])),
        }
        out["rollout/valid_format_rate"] = float(sum(self.format_ok(tr) for tr in originals) / len(originals))
        out.update({k if k.startswith("rollout/") else f"rollout/{k}": float(v) for k, v in agent_metrics.items()
                    if isinstance(v, (int, float))})
        return out

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average each metric over the processes that report it (key sets may differ by rank)."""
        if self.world == 1:
            return metrics
        from accelerate.utils import gather_object

        per_rank = gather_object([metrics])
        keys = sorted({k for m in per_rank for k in m})
        return {k: sum(m[k] for m in per_rank if k in m) / sum(1 for m in per_rank if k in m) for k in keys}

    # ------------------------------------------------------------------ the run

    def state(self) -> dict:
        return {"data": self.sampler.state_dict(), "nan_skips": self.nan_skips}

    def save(self) -> None:
        ckpt.save_checkpoint(self.tc.out_dir, self.step_idx, accelerator=self.acc, model=self.model,
                             tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                             trainer_state=self.state(), critic=self.critic, explorer=self.explorer, keep_last=self.tc.keep_last)

    def resume(self) -> bool:
        """Load the latest checkpoint of ``out_dir``; False when there is none."""
        path = ckpt.latest_checkpoint(self.tc.out_dir)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, accelerator=self.acc, model=self.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, critic=self.critic, explorer=self.explorer)
        self.step_idx, self.nan_skips = int(state["step"]), int(state.get("nan_skips", 0))
        self.sampler.load_state_dict(state["data"])
        return True

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) to ``trainer.steps``; checkpoints every ``save_every`` steps and at the end."""
        resumed = self.resume() if self.tc.resume else False
        logger = MetricsLogger(self.tc.out_dir, enabled=self.acc.is_main_process, tensorboard=self.tc.log_tensorboard,
                               wandb_project=self.tc.wandb_project, config=config_to_dict(self.cfg),
                               resume_step=self.step_idx if resumed else None, total_steps=self.tc.steps,
                               progress=self.progress)
        history = []
        try:
            while self.step_idx < self.tc.steps:
                metrics = self.step()
                logger.log(self.step_idx, metrics)
                history.append(metrics)
                if self.tc.save_every and self.step_idx % self.tc.save_every == 0 and self.step_idx < self.tc.steps:
                    self.save()
            if history:
                self.save()
        finally:
            logger.close()
        return history
