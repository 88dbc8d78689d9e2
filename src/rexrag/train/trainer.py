"""The RL training loop. One step reads top to bottom (see :meth:`Trainer.step`):

sample prompts -> rollouts (n per prompt) -> rewards -> [REX: explore] -> old-policy / reference
log-probs recomputed on the exact tokens -> [REX: correct] -> [rollout correction] -> advantages ->
``ppo_epochs`` passes of mini-batch updates (gradient accumulation, clipping) -> log -> [REX: end_step].
Tensors flow as a :class:`~rexrag.train.batch.Batch` (rollout) and :class:`~rexrag.train.batch.Targets`.
The forward passes (which quantity comes from which sweep, micro-batches) and the update are
:class:`rexrag.train.passes.ForwardPasses`, a mixin of :class:`Trainer`.

Multi-process data parallel goes through ``accelerate`` (DDP or FSDP2; configs in ``configs/accelerate``;
DeepSpeed is refused: ``rexrag.sharding.check_supported``). Every process draws the same global prompt batch and takes prompts
``rank, rank + W, ...`` (whole groups per process: group advantages need no communication) and
generates them with its own backend (one colocated vLLM engine per process, or the HF loop;
``rexrag.rollout.colocate`` syncs, sleeps and wakes it). Mini-batch ``i`` is chunk ``i`` of every
process's rows; losses are normalised by the mini-batch's *global* token/sequence counts, so W
processes give the gradient of one process with the same global batch. Exceptions to exactness:
``reinforce_pp`` whitens per process, and sampling differs unless the rollout function seeds by
prompt. Launch CPU processes with ``accelerate launch --multi_gpu --num_processes N`` (gloo).
``seq-mean-token-sum-norm`` divides by the constant ``rollout.max_total_tokens``.

Differences from verl / Search-R1: no mini-batch shuffling (it would tie results to the process
count); the value model (``gae``) is a separate copy of the policy's decoder with a linear head; a
non-finite loss or gradient skips the optimizer update (counted in ``actor/nan_skips``) instead of
writing NaN into the weights.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from rexrag.algos.advantages import get_adv_estimator, token_rewards
from rexrag.algos.losses import kl_penalty
from rexrag.algos.rollout_correction import rollout_correction
from rexrag.config import Config, ConfigError, config_to_dict
from rexrag.curriculum import make_sampler
from rexrag.data import check_examples
from rexrag.errors import UserError
from rexrag.memory import trim_heap
from rexrag.models import ValueModel, enable_gradient_checkpointing
from rexrag.rewards import build_reward, format_ok, reward_trajectories
from rexrag.rollout.colocate import Colocation, mismatch_metrics
from rexrag.rollout.trajectory import Trajectory
from rexrag.rollout.views import format_view
from rexrag.sharding import (check_supported, drain, gather_objects, is_sharded, make_accelerator, module_bytes,
                              set_fsdp_mixed_precision)
from rexrag.train import checkpoint as ckpt
from rexrag.train import rundir
from rexrag.train.batch import Batch, Targets
from rexrag.train.credit import ProcessCredit, observe_curriculum, search_metrics
from rexrag.train.credit import check_setup as check_credit
from rexrag.train.logging import MetricsLogger, memory_metrics
from rexrag.train.dynamic import sample_step
from rexrag.train.metrics import rollout_metrics, update_flops
from rexrag.train.optim import make_optimizer
from rexrag.train.passes import ForwardPasses
from rexrag.train.periodic_eval import PeriodicEval

RolloutFn = Callable[[list, int], list[Trajectory]]
# Forward sweeps counted per step and logged as passes/<kind> (each over all rows, in micro-batches).
PASSES = ("probe_scores", "old_logprobs", "reference", "values", "update")


class Explorer(Protocol):
    """The REX-RAG hook (``rexrag.rex.explorer.RexExplorer``): ``explore`` after rewards (kept probes join
    the batch after the originals), ``correct`` after the old/reference log-probs (behaviour log-probs for
    the PPO ratio, optional [B] row weights; row-local: an on-policy update calls it per micro-batch, then
    on all rows), ``end_step`` after the update; ``state_dict`` / ``load_state_dict`` go into checkpoints."""

    def explore(self, originals, rewards, agent, score_fn, reward_fn) -> list[Trajectory]: ...
    def correct(self, batch, old_logprobs, is_probe, probe_start) -> tuple[Tensor, Tensor | None, dict]: ...
    def end_step(self) -> dict: ...


# --------------------------------------------------------------------------- small pieces


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 1/(w+1) to 1 over ``warmup_steps`` steps, then constant."""
    return lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0


def rollout_seed(seed: int, step: int, round_idx: int, rank: int) -> int:
    """The sampling seed of a step's rollouts, by (run seed, step, dynamic-sampling round, rank): a resumed run
    samples what an uninterrupted one would have, each round draws fresh samples (a shared seed would correlate
    the rounds), and an async rollout worker (``rexrag.train.async_source``) seeds batch ``step`` the same way."""
    return seed * 1_000_003 + step * 7919 + round_idx * 15_485_863 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flop_shape(model) -> dict | None:
    """What ``update_flops`` needs of the policy; None for a model without a transformers config."""
    c = getattr(model, "config", None)
    if getattr(c, "num_hidden_layers", None) is None or getattr(c, "hidden_size", None) is None:
        return None
    # an input embedding is a lookup, not a matmul, unless the output head shares its weight
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    lookup = emb.weight if head is None or head.weight is not emb.weight else None
    params = [p for p in model.parameters() if p is not lookup]
    return {"params": sum(p.numel() for p in params), "trained_params": sum(p.numel() for p in params if p.requires_grad),
            "layers": c.num_hidden_layers, "hidden": c.hidden_size}


# --------------------------------------------------------------------------- trainer


class Trainer(ForwardPasses):
    """Runs ``cfg.trainer.steps`` RL steps of ``model`` on ``examples``.

    ``rollout_source`` (set after construction, by ``build_trainer`` for ``rollout.mode`` other than sync):
    an object whose ``sample(trainer, examples, t)`` replaces :meth:`sample`'s generation, whose ``last``
    metrics join the step's and whose ``close()`` ends :meth:`train` (``rexrag.train.async_source``).

    Args:
        cfg: full :class:`rexrag.config.Config` (algo, rollout.n, data.batch_size, trainer.*, rex.*).
        model: the policy (HF causal LM, optionally peft-wrapped); trained in place.
        tokenizer: for decoding responses for the reward and for saving with checkpoints.
        examples: QA examples (``rexrag.data.QAExample``) with unique ``group_id``.
        rollout_fn: ``fn(examples, n) -> list[Trajectory]`` (n per example, same group id);
            defaults to ``agent.rollout``.
        agent: the ``SearchAgent`` (needed by the explorer to continue probes).
        explorer: REX-RAG hook object (explore / correct / end_step), or None.
        reward_fn: callable ``fn(completions, answers, **kw) -> list[float]`` (see ``compute_rewards``
            for what it gets); default ``rexrag.rewards.build_reward(cfg.trainer.reward)``.
        accelerator: an ``accelerate.Accelerator``; one is created when None.
        reference: frozen reference model; default ``rexrag.models.make_reference`` (None with LoRA:
            adapters are disabled instead). Not built, and no reference pass runs, when ``algo.kl_coef == 0``.
    """

    rollout_source = None  # see the class docstring

    def __init__(self, cfg: Config, model, tokenizer, examples: list, *, rollout_fn: RolloutFn | None = None,
                 agent=None, explorer: Explorer | None = None, reward_fn: Callable | None = None,
                 accelerator=None, reference: Any = "auto", progress: bool = True):
        self.cfg, self.tc, self.algo = cfg, cfg.trainer, cfg.algo
        self.acc = accelerator or make_accelerator()
        check_supported(self.acc)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.sharded = is_sharded(self.acc)  # FSDP: forwards are collective (rexrag.sharding)
        if cfg.data.batch_size % self.world:
            raise UserError(f"data.batch_size={cfg.data.batch_size} must be divisible by the number of processes ({self.world})")
        if rollout_fn is None and agent is None:
            raise UserError("Trainer needs a rollout_fn or a SearchAgent")
        self.rollout_fn = rollout_fn or agent.rollout
        check_examples(examples, cfg.data)  # unique group ids; enough prompts for dynamic sampling
        self.agent, self.explorer, self.tokenizer, self.examples = agent, explorer, tokenizer, examples
        self.reward_fn = reward_fn or build_reward(self.tc.reward)
        self.reward_name = getattr(self.reward_fn, "name", None) or getattr(self.reward_fn, "__qualname__", repr(self.reward_fn))
        self.estimator = get_adv_estimator(self.algo.adv_estimator)
        check_credit(cfg, examples, "the training examples")  # trainer.process_reward: estimator and data fields
        self.process = ProcessCredit.from_config(cfg, tokenizer)  # None: the estimator's advantages, untouched
        seed_everything(self.tc.seed)
        self.sampler = make_sampler(len(examples), cfg.data, self.tc.seed)  # data.curriculum
        self.prompt_index = {ex.group_id: i for i, ex in enumerate(examples)}
        self.critic = ValueModel(model) if self.algo.adv_estimator == "gae" else None
        self.reference = None
        if self.algo.kl_coef > 0:
            from rexrag.models import make_reference

            self.reference = make_reference(model, cfg.model, self.acc.device) if reference == "auto" else reference
        if self.tc.micro_batch_tokens < 0:
            raise ConfigError(f"trainer.micro_batch_tokens must be >= 0 (0 = split by micro_batch_size), got {self.tc.micro_batch_tokens}")
        if cfg.model.gradient_checkpointing:  # load_model enables it too; a model built elsewhere gets it here
            enable_gradient_checkpointing(model)
        self.model, self.optimizer, self.scheduler = self._prepare(model)
        self.flop_shape = _flop_shape(self.acc.unwrap_model(self.model))
        ckpt.register_state(self.acc, scheduler=self.scheduler, sampler=self.sampler, explorer=explorer)
        self.step_idx, self.nan_skips = 0, 0
        self.passes = dict.fromkeys(PASSES, 0)  # full sweeps over the batch per kind, this step
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        self.attach_backend(getattr(agent, "backend", None))
        self.periodic_eval = PeriodicEval(cfg, self.world, agent)  # trainer.eval_every: data.eval_files, eval/ metrics
        self.progress = progress
        # log-probs are taken at the rollouts' sampling temperature (greedy: the T=1 softmax, as the backends)
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        # Per-rank sampling seed so processes draw different samples for their prompts.
        seed_everything(self.tc.seed + 1_000_003 * self.rank)

    def _prepare(self, model):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.tc.lr}]
        if not groups[0]["params"]:
            raise UserError("the model has no trainable parameters")
        modules = [model]
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": self.tc.critic_lr or self.tc.lr})
            modules.append(self.critic)
        # the same seed on every process: DDP replicas must round their bf16 moments identically
        opt = make_optimizer(groups, self.tc.lr, self.tc.weight_decay, self.tc.optimizer_state_dtype, self.tc.seed)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_schedule(self.tc.warmup_steps))
        set_fsdp_mixed_precision(self.acc, self.cfg.model)  # FSDP2: bf16 gathers/compute where model.fsdp_mixed_precision says
        prepared = self.acc.prepare(*modules, opt)
        if self.critic is not None:
            model, self.critic, opt = prepared
        else:
            model, opt = prepared
        if self.reference is not None:
            self.reference.to(self.acc.device)
            if self.sharded:
                from rexrag.sharding import shard_like_policy

                shard_like_policy(self.reference, self.acc)
        model.train()
        return model, opt, sched

    def attach_backend(self, backend, synced_step: int | None = None) -> None:
        """Make ``backend`` the agent's generation backend, driven around the update by a
        ``rexrag.rollout.colocate.Colocation`` (sync, sleep, wake). Under FSDP the HF backend generates
        with the prepared (sharded) model: gathered once per rollout (``rollout.fsdp_gather_for_rollout``),
        else its forwards in lockstep across processes (``rexrag.sharding.Lockstep``)."""
        if self.agent is not None:
            self.agent.backend = backend
        hf_sharded = self.sharded and backend is not None and hasattr(backend, "lockstep")
        self.colocation = Colocation(backend, gather=hf_sharded and self.cfg.rollout.fsdp_gather_for_rollout,
                                     synced_step=synced_step)  # an engine holding step synced_step's weights
        if not hf_sharded:
            return
        from rexrag.sharding import Lockstep, dummy_forward

        backend.model = self.model
        backend.reset_cache()
        backend.lockstep = Lockstep(dummy_forward(self.model, self.acc.device, self.pad_id))

    # ------------------------------------------------------------------ the step

    def step(self) -> dict[str, float]:
        """One RL step; returns the (process-averaged) metrics."""
        t = {"start": time.perf_counter()}
        self.passes = dict.fromkeys(PASSES, 0)
        trajs, rewards, probes, agent_metrics = sample_step(self, t)  # (data.dynamic_sampling: more rounds)
        observe_curriculum(self, trajs, rewards)  # data.curriculum=pass_rate: the estimate the next draw uses
        n_orig, rex_metrics = len(trajs), {}
        trajs = trajs + probes
        batch = Batch.collate(trajs, self.pad_id, self.cfg.rex.train_probe_tokens, self.acc.device)
        chunks = self._chunks(batch.size)
        reuse = self._reuse_update_forward(len(chunks))
        with self._timed(t, "logprob"):
            old_logp = None if reuse else self._old_logprobs(batch)  # reuse: the update's forward gives it
            ref_logp = self._ref_logprobs(batch)
            old_values = self._values(batch)
        behaviour, seq_w = old_logp, None
        if self.explorer is not None and old_logp is not None:
            behaviour, seq_w, rex_metrics = self.explorer.correct(batch.mapping(), old_logp, batch.is_probe, batch.probe_start)
        tok_w, keep, corr_metrics = None, None, {}
        if self.algo.rollout_correction != "none":  # engine vs trainer (never with reuse: needs old_logp first)
            tok_w, keep, corr_metrics = rollout_correction(old_logp, batch.rollout_logprobs, batch.sampled,
                                                           batch.loss_mask, batch.is_probe, self.algo)
        with self._timed(t, "adv"):
            # on the unrejected mask: a rejected row keeps its outcome in its group's statistics (with
            # kl_in_reward a fully masked row would otherwise score 0 and skew its group)
            adv, ret = self._advantages(batch, old_logp, ref_logp, old_values)
        if keep is not None:
            batch.loss_mask = batch.loss_mask * keep  # rejected tokens leave the loss and its denominator
        targets = Targets(advantages=adv, returns=ret, old_logp=old_logp, behaviour_logp=behaviour, seq_weights=seq_w,
                          token_weights=tok_w, ref_logp=ref_logp, old_values=old_values)
        with self._timed(t, "update"):
            upd, fresh_old = self.update(batch, targets, chunks)
            trim_heap()  # the update's freed fragments go back to the OS before the next rollout
        if old_logp is None:  # on-policy reuse: the correction's metrics over the whole batch, no forward
            old_logp = fresh_old
            if self.explorer is not None:
                _, _, rex_metrics = self.explorer.correct(batch.mapping(), old_logp, batch.is_probe, batch.probe_start)
        self.scheduler.step()
        self.step_idx += 1
        if self.explorer is not None:
            rex_metrics = {**rex_metrics, **self.explorer.end_step()}
        metrics = {**rollout_metrics(self.tokenizer, trajs[:n_orig], batch, old_logp, adv, rewards, agent_metrics,
                                     trajs[n_orig:], self.format_ok), **upd, **self.colocation.last,
                   **mismatch_metrics(batch.segments, batch.is_probe, batch.rollout_logprobs, old_logp), **corr_metrics,
                   **{k if k.startswith("rex/") else f"rex/{k}": v for k, v in rex_metrics.items()},
                   **{f"passes/{k}": float(v) for k, v in self.passes.items()},
                   **search_metrics(trajs[:n_orig], self.cfg.rollout.max_turns),
                   **(self.process.metrics(trajs[:n_orig]) if self.process is not None else {}),
                   **(self.sampler.metrics() if hasattr(self.sampler, "metrics") else {}),
                   **(self.rollout_source.last if self.rollout_source is not None else {})}  # async/: staleness, queue
        metrics = self._reduce(metrics)
        t_total = time.perf_counter() - t["start"]
        n_tok = float(batch.attention_mask.sum()) * self.world
        metrics.update({f"timing/{k}_s": v for k, v in t.items() if k != "start"})
        metrics.update({"timing/step_s": t_total, "timing/tokens_per_s": n_tok / max(t_total, 1e-9), **memory_metrics()})
        if self.flop_shape is not None and t.get("update"):  # this process's update: its rows, its time
            flops = update_flops(batch.lengths, **self.flop_shape) * self.passes["update"]
            metrics.update({"timing/update_gflops": flops / t["update"] / 1e9, "timing/update_share": t["update"] / t_total})
        if self.reference is not None:  # this process's part of the frozen reference (a shard under FSDP)
            metrics["memory/reference_gib"] = module_bytes(self.reference) / 2**30
        return metrics

    def sample(self, examples: list, t: dict | None = None, round_idx: int = 0,
               ) -> tuple[list[Trajectory], list[float], list[Trajectory], dict]:
        """The sampling half of a step, no update: ``rollout.n`` rollouts per example from the current
        policy, their rewards, REX-RAG's kept probes (``[]`` without an explorer) and the agent's rollout
        metrics. ``t`` collects phase times (weight_sync, gen, reward, explore); ``round_idx`` is the
        dynamic-sampling round within the step."""
        t = {} if t is None else t
        if self.rollout_source is not None:  # rollout.mode=one_step_off|async: generated by worker processes
            return self.rollout_source.sample(self, examples, t)
        self.colocation.reseed(rollout_seed(self.tc.seed, self.step_idx, round_idx, self.rank))
        with self._timed(t, "weight_sync"):  # an engine with its own weights copy gets the current ones
            self.colocation.before_rollout(self.acc.unwrap_model(self.model), self.step_idx)
        with self.colocation.rollout(self.model):  # FSDP + hf: the policy gathered once for gen and probes
            with self._timed(t, "gen"):
                self.model.eval()
                trajs = self.rollout_fn(examples, self.cfg.rollout.n)
                drain(getattr(self.agent, "backend", None))  # FSDP lockstep: until every process's rows are done
                self.model.train()
            # copy now: probe continuations below run the same agent and overwrite its last_metrics
            agent_metrics = dict(getattr(self.agent, "last_metrics", None) or {})
            with self._timed(t, "reward"):
                rewards = self.compute_rewards(trajs)
            probes: list[Trajectory] = []
            if self.explorer is not None:
                with self._timed(t, "explore"):
                    probes = list(self.explorer.explore(trajs, rewards, self.agent, self.score_fn, self.compute_rewards))
        return trajs, rewards, probes, agent_metrics

    def _reuse_update_forward(self, n_mini: int) -> bool:
        """On-policy (one epoch, one mini-batch): pi_old is the update's own forward, detached. Not with
        ``kl_in_reward``, whose advantages need pi_old before the update."""
        return (self.tc.reuse_update_forward and self.tc.ppo_epochs == 1 and n_mini == 1
                and not self.algo.kl_in_reward and self.algo.rollout_correction == "none")

    @contextlib.contextmanager
    def _timed(self, t: dict, name: str):
        start = time.perf_counter()
        yield
        t[name] = t.get(name, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ rewards and scoring

    def format_ok(self, traj: Trajectory) -> bool:
        """``format_ok`` of the response with every retrieved block emptied (``format_view``)."""
        return format_ok(format_view(self.tokenizer, traj))

    def compute_rewards(self, trajs: list[Trajectory]) -> list[float]:
        """Reward of each trajectory, also stored in ``traj.meta['reward']`` (``rexrag.rewards.reward_trajectories``
        says what the reward function gets)."""
        out = reward_trajectories(self.reward_fn, self.reward_name, self.tokenizer, trajs)
        if self.process is not None:  # trainer.process_reward: per-turn rewards into meta['turn_rewards']
            self.process.score(trajs)
        return out

    def _advantages(self, batch: Batch, old_logp: Tensor | None, ref_logp: Tensor | None,
                    old_values: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(advantages [B, T], returns [B, T] | None) from the estimator; with ``kl_in_reward`` the
        per-token reward carries -kl_coef * KL(pi_old || ref) on the loss tokens."""
        mask, rewards = batch.loss_mask, batch.rewards
        if self.algo.kl_in_reward:
            rewards = token_rewards(rewards, mask)
            if ref_logp is not None:
                kl = kl_penalty(old_logp, ref_logp, self.algo.kl_type)
                rewards = rewards - self.algo.kl_coef * torch.where(mask > 0, kl, torch.zeros_like(kl))
        adv, ret = self.estimator(rewards, mask, batch.group_ids, old_values, self.algo)
        if self.process is not None:  # plus the turn-level process term (rexrag.algos.turn_credit)
            adv = self.process.add(batch, adv)
        return adv, ret

    # ------------------------------------------------------------------ metrics

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average each metric over the processes that report it (key sets may differ by rank)."""
        if self.world == 1:
            return metrics
        per_rank = gather_objects(metrics)
        keys = sorted({k for m in per_rank for k in m})
        return {k: sum(m[k] for m in per_rank if k in m) / sum(1 for m in per_rank if k in m) for k in keys}

    # ------------------------------------------------------------------ the run

    def state(self) -> dict:
        return {"data": self.sampler.state_dict(), "nan_skips": self.nan_skips}

    def save(self) -> None:
        ckpt.save_checkpoint(self.tc.out_dir, self.step_idx, accelerator=self.acc, model=self.model,
                             tokenizer=self.tokenizer, trainer_state=self.state(), keep_last=self.tc.keep_last)

    def resume(self) -> bool:
        """Load the latest intact checkpoint of ``out_dir``; a ``UserError`` naming the directory when
        there is none (resuming is explicit; so is starting over)."""
        path = ckpt.latest_checkpoint(self.tc.out_dir)
        if path is None:
            raise UserError(f"trainer.resume=true: {self.tc.out_dir} holds no intact checkpoint to resume from; check "
                            "trainer.out_dir, start over there with `rexrag train --overwrite`, or drop --resume")
        state = ckpt.load_checkpoint(path, accelerator=self.acc)  # model(s), optimizer, RNG, scheduler, sampler, explorer
        self.step_idx, self.nan_skips = int(state["step"]), int(state.get("nan_skips", 0))
        self.sampler.load_state_dict(state["data"])
        return True

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) to ``trainer.steps``; checkpoints every ``save_every`` steps and at the end.

        A fresh run refuses an ``out_dir`` that holds another run (``rundir.check_fresh``); the
        resolved config is written to ``<out_dir>/config.yaml`` first."""
        if not self.tc.resume:
            rundir.check_fresh(self.tc.out_dir)
        self.acc.wait_for_everyone()  # every process has checked before the main one writes
        resumed = self.tc.resume and self.resume()
        if self.acc.is_main_process:
            rundir.save_config(self.tc.out_dir, self.cfg)
        logger = MetricsLogger(self.tc.out_dir, enabled=self.acc.is_main_process, tensorboard=self.tc.log_tensorboard,
                               wandb_project=self.tc.wandb_project, config=config_to_dict(self.cfg),
                               resume_step=self.step_idx if resumed else None, total_steps=self.tc.steps,
                               progress=self.progress)
        history = []
        try:
            while self.step_idx < self.tc.steps:
                metrics = self.step()
                metrics.update(self.periodic_eval(self))  # trainer.eval_every: eval/ EM, F1, cover-EM
                logger.log(self.step_idx, metrics)
                history.append(metrics)
                if self.tc.save_every and self.step_idx % self.tc.save_every == 0 and self.step_idx < self.tc.steps:
                    self.save()
            if history:
                self.save()
        finally:
            logger.close()
            if self.rollout_source is not None:  # workers stopped; batches in flight are discarded (not consumed)
                self.rollout_source.close()
        return history
