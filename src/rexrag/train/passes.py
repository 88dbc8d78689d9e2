"""The trainer's forward passes: the no-grad sweeps before the update (pi_old, reference, values, probe
scores) and the with-grad update itself, as :class:`ForwardPasses`, a mixin of
:class:`rexrag.train.trainer.Trainer`. They live apart so the trainer module holds the step's order and
this one what each sweep computes; the mixin reads the trainer's attributes (``model``, ``critic``,
``reference``, ``acc``, ``cfg``/``tc``/``algo``, ``passes``, ``pad_id``, ``temperature``, ``explorer``,
``optimizer``, ``scheduler``) and updates only ``passes`` and ``nan_skips``.

Which forward pass each quantity comes from (all on the exact batch tokens via
``models.sequence_logprobs``; each sweep is counted per step in ``passes/<kind>``):

- probe scores (REX filter ranking): ``probe_scores``, a no-grad eval-mode pass of the policy over the
  probe *candidates* (before their continuation); skipped when every candidate is kept.
- pi_old: ``old_logprobs``, one no-grad eval-mode pass of the policy, **or** -- when the update is
  exactly on-policy (``ppo_epochs == 1``, one mini-batch, ``trainer.reuse_update_forward``, no
  ``kl_in_reward``) -- the update's own forward, detached, and no separate pass. Never both. With no
  dropout the two are bitwise equal (same kernels, same micro-batches), so the switch changes no number.
- REX-RAG behaviour log q (``rexrag.rex.correction``): computed from pi_old with no forward of its own
  (prefix mu = pi_old / e^(1/s), continuation mu = pi_old, inserted-prompt mu from the pool's trie). In
  the on-policy case it is computed per micro-batch from the detached pi_old (the correction is
  row-local), and once more over all rows after the update for its ``rex/`` metrics.
- reference log-probs: ``reference``, a no-grad pass of the frozen copy (or of the policy with LoRA
  adapters disabled); no reference model and no pass when ``algo.kl_coef == 0``.
- old values (``gae``): ``values``, a no-grad critic pass.
- pi_theta (and entropy, from the same chunked LM-head pass, when ``entropy_coef > 0``): ``update``,
  one with-grad sweep per PPO epoch.

Micro-batches: ``trainer.micro_batch_size`` rows each (default), or with ``trainer.micro_batch_tokens``
rows sorted by length and packed under a padded-token budget, each cut to its longest row; the loss
is the same either way (normalised by mini-batch totals). ``train/padding_fraction`` is the padded
share of the update's token slots; ``trainer.pack_sequences`` computes no padding (``update/padding_ratio``:
tokens computed per real token). ``model.gradient_checkpointing`` recomputes decoder activations in
backward (HF, non-reentrant).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from rexrag.algos.losses import entropy_loss, kl_loss, policy_loss, value_loss
from rexrag.models import sequence_logprobs
from rexrag.rollout.trajectory import Trajectory, to_batch
from rexrag.sharding import all_agree, global_max, global_min, global_sum
from rexrag.train.batch import Batch, Micro, Targets, micro_batches, padding_fraction, padding_ratio

# Micro-batch losses are normalised by mini-batch totals, so they add up to the mini-batch loss.
_SUMMED = frozenset({"actor/pg_loss", "actor/kl_loss", "critic/vf_loss", "actor/loss"})


def _finite(x: Tensor | float) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)).all())


class ForwardPasses:
    """Every forward sweep of a training step (see the module docstring); mixed into ``Trainer``."""

    # ------------------------------------------------------------------ no-grad passes

    @torch.no_grad()
    def score_fn(self, trajs: list[Trajectory]) -> list[Tensor]:
        """Old-policy per-token log-probs of each trajectory ([len(traj)] each; position 0 = 0).

        Scored in eval mode (no dropout), like the old log-probs of the update (``_old_logprobs``), so
        the probe filter ranks by the policy itself; the model's previous mode is restored.

        Micro-batches of ``rex.score_micro_batch_size`` rows (``rexrag.gpu_plan.score_rows``; a token budget
        capped at that many full rows): the vLLM engine is awake meanwhile, holding its share of the GPU,
        and the GPU memory plan reserves exactly one such forward beside it. Bounding the forward was
        chosen over sleeping the KV cache (the probes' continuations reuse their sources' cached prefixes,
        which a sleep discards, and a sleep/wake pair costs each step) and over scoring through the engine
        (its bf16 log-probs are not the trainer's pi_old that the filter ranks by).
        """
        import copy

        from rexrag.gpu_plan import score_rows, score_tokens

        if not trajs:
            if self.sharded:  # the others' scoring forwards are collective: serve them
                self._lockstep(lambda i, m: sequence_logprobs(self.model, i, m)).drain()
            return []
        b = to_batch(trajs, self.pad_id)
        ids, am = b["input_ids"].to(self.acc.device), b["attention_mask"].to(self.acc.device)
        tc, scoring = self.tc, copy.copy(self.tc)  # the micro-batch split reads self.tc
        scoring.micro_batch_size = score_rows(self.cfg)
        scoring.micro_batch_tokens = score_tokens(self.cfg) if tc.micro_batch_tokens else 0
        self.tc = scoring
        try:
            lp = self._policy_pass(self.model, ids, am, "probe_scores")
        finally:
            self.tc = tc
        return [lp[i, : len(tr)].cpu() for i, tr in enumerate(trajs)]

    def _autocast(self):
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.model.autocast_bf16)

    def _micros(self, rows: Tensor, lengths: Tensor, width: int) -> list[Micro]:
        return micro_batches(rows, lengths, width, self.tc.micro_batch_size, self.tc.micro_batch_tokens,
                             self.tc.pack_sequences)

    @torch.no_grad()
    def _no_grad_pass(self, fn: Callable[[Tensor, Tensor], Tensor], ids: Tensor, am: Tensor) -> Tensor:
        """``fn(ids [b, w], mask [b, w]) -> [b, w]`` over micro-batches of all rows -> [B, T] float32
        (0 beyond each micro-batch's width)."""
        lengths = am.sum(-1)
        out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        lockstep = self._lockstep(fn)
        with self._autocast():
            for m in self._micros(torch.arange(ids.shape[0]), lengths, ids.shape[1]):
                if lockstep is not None:
                    lockstep.tick()
                out[m.rows, : m.width] = fn(ids[m.rows, : m.width], am[m.rows, : m.width]).float()
            if lockstep is not None:
                lockstep.drain()
        return out

    def _lockstep(self, fn: Callable[[Tensor, Tensor], Tensor]):
        """A Lockstep whose dummy is ``fn`` on a 2-token row (FSDP), else None."""
        if not self.sharded:
            return None
        from rexrag.sharding import Lockstep

        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.acc.device)
        return Lockstep(lambda: fn(ids, torch.ones_like(ids)))

    def _policy_pass(self, model, ids: Tensor, am: Tensor, kind: str) -> Tensor:
        """One no-grad log-prob pass of ``model`` in eval mode (no dropout); the policy's mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            lp = self._no_grad_pass(lambda i, m: sequence_logprobs(model, i, m, temperature=self.temperature,
                                                                   pack=self.tc.pack_sequences), ids, am)
        finally:
            self.model.train(was_training)
        self.passes[kind] += 1
        return lp

    def _old_logprobs(self, batch: Batch) -> Tensor:
        """[B, T] pi_old on the exact batch tokens: one no-grad pass of the policy."""
        return self._policy_pass(self.model, batch.input_ids, batch.attention_mask, "old_logprobs")

    def _ref_logprobs(self, batch: Batch) -> Tensor | None:
        """[B, T] reference log-probs (frozen copy, or the policy with LoRA adapters disabled); None, and
        no pass, when ``kl_coef == 0`` (the KL term, in the loss or the reward, is then 0)."""
        if self.algo.kl_coef <= 0:
            return None
        if self.reference is not None:
            return self._policy_pass(self.reference, batch.input_ids, batch.attention_mask, "reference")
        from rexrag.models import reference_logprobs_context

        with reference_logprobs_context(self.acc.unwrap_model(self.model)):
            return self._policy_pass(self.model, batch.input_ids, batch.attention_mask, "reference")

    def _values(self, batch: Batch) -> Tensor | None:
        """[B, T] critic values before the update (``gae``), else None."""
        if self.critic is None:
            return None
        self.passes["values"] += 1
        return self._no_grad_pass(lambda i, m: self.critic(i, m, pack=self.tc.pack_sequences), batch.input_ids,
                                  batch.attention_mask)

    # ------------------------------------------------------------------ update

    def _chunks(self, n_rows: int) -> list[Tensor]:
        """Local row indices of each mini-batch: chunk i of every process forms global mini-batch i."""
        n_mini = max(1, round(global_sum(self.acc, float(n_rows)) / self.tc.mini_batch_size))
        n_mini = min(n_mini, global_min(self.acc, n_rows))  # every process needs >= 1 row per mini-batch
        return list(torch.arange(n_rows).tensor_split(n_mini))

    def _dummy_loss(self) -> Tensor:
        """Zero loss through the policy (and critic) on a 2-token row: keeps FSDP's collectives in step."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.acc.device)
        with self._autocast():
            loss = sequence_logprobs(self.model, ids, torch.ones_like(ids)).sum() * 0.0
            if self.critic is not None:
                loss = loss + self.critic(ids, torch.ones_like(ids)).sum() * 0.0
        return loss

    def update(self, batch: Batch, targets: Targets, chunks: list[Tensor]) -> tuple[dict[str, float], Tensor | None]:
        """``ppo_epochs`` passes over the mini-batches ``chunks`` (row indices); returns the mean
        actor/critic metrics and, when ``targets.old_logp`` is None (on-policy reuse), the [B, T]
        detached log-probs of the update's own forward (else None)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        fresh = torch.zeros(batch.input_ids.shape, device=batch.input_ids.device) if targets.old_logp is None else None
        horizon = self.cfg.rollout.max_total_tokens  # constant length for seq-mean-token-sum-norm
        micros = [self._micros(rows, batch.lengths, batch.input_ids.shape[1]) for rows in chunks]
        for _ in range(self.tc.ppo_epochs):
            for rows, mbs in zip(chunks, micros, strict=True):
                for k, v in self._mini_batch_update(batch, targets, rows, mbs, horizon, fresh).items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            self.passes["update"] += 1
        out = {k: sums[k] / counts[k] for k in sums}
        out["actor/nan_skips"] = float(self.nan_skips)
        out["actor/lr"] = self.scheduler.get_last_lr()[0]
        flat, packed = [m for mbs in micros for m in mbs], self.tc.pack_sequences
        out["train/padding_fraction"] = padding_fraction(flat, batch.lengths, packed)
        out["update/padding_ratio"] = padding_ratio(flat, batch.lengths, packed)  # tokens computed per real token
        return out, fresh

    def _mini_batch_update(self, batch: Batch, targets: Targets, rows: Tensor, micro: list[Micro], horizon: int,
                           fresh: Tensor | None) -> dict[str, float]:
        mask = batch.loss_mask[rows]
        # Global normalisers (divided by W because DDP averages gradients over processes).
        norm = {"num_tokens": max(global_sum(self.acc, float(mask.sum())), 1.0) / self.world,
                "num_seqs": max(global_sum(self.acc, float((mask.sum(-1) > 0).sum())), 1.0) / self.world,
                "horizon": horizon}
        metrics: dict[str, float] = {}
        finite = True
        # FSDP: every forward/backward is collective, so all processes run as many micro-batches
        # (None = a dummy one with zero loss); elsewhere each runs its own.
        n_micro = int(global_max(self.acc, len(micro))) if self.sharded else len(micro)
        for j, mb in enumerate(micro + [None] * (n_micro - len(micro))):
            with contextlib.ExitStack() as stack:
                if j < n_micro - 1 and self.world > 1:  # one gradient all-reduce per mini-batch
                    for module in (self.model, self.critic):
                        if module is not None:
                            stack.enter_context(self.acc.no_sync(module))
                if mb is None:
                    self.acc.backward(self._dummy_loss())
                    continue
                loss, m = self._micro_loss(batch, targets, mb, norm, fresh)
                finite &= _finite(loss.detach())
                self.acc.backward(loss)
            for k, v in m.items():  # loss values are partial sums of the mini-batch loss; the rest are means
                metrics[k] = metrics.get(k, 0.0) + (v if k in _SUMMED else v / len(micro))
        actor_params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = self.acc.clip_grad_norm_(actor_params, self.tc.max_grad_norm)
        metrics["actor/grad_norm"] = float(gnorm) if gnorm is not None else float("nan")
        ok = finite and (gnorm is None or _finite(gnorm))
        if self.critic is not None:
            cnorm = self.acc.clip_grad_norm_(list(self.critic.parameters()), self.tc.max_grad_norm)
            metrics["critic/grad_norm"] = float(cnorm) if cnorm is not None else float("nan")
            ok = ok and (cnorm is None or _finite(cnorm))
        # One decision for all processes: a rank that stepped while another skipped would leave the
        # replicas (DDP) or the shards' moments (FSDP) out of step for good.
        if all_agree(ok):
            self.optimizer.step()
        else:  # never let NaN/inf reach the weights or the Adam moments
            self.nan_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _behaviour(self, batch: Batch, targets: Targets, mb: Micro, logp: Tensor,
                   fresh: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(behaviour [b, w], seq_weights [b] | None) of a micro-batch. On-policy reuse: pi_old is ``logp``
        detached (stored into ``fresh``), corrected row by row by the explorer (its correction is
        row-local); else the slices of ``targets``."""
        idx, w = mb.rows, mb.width
        if targets.old_logp is not None:
            seq_w = targets.seq_weights[idx] if targets.seq_weights is not None else None
            return targets.behaviour_logp[idx, :w], seq_w
        old = logp.detach()
        fresh[idx, :w] = old
        if self.explorer is None:
            return old, None
        beh, seq_w, _ = self.explorer.correct(batch.mapping(idx, w), old, batch.is_probe[idx], batch.probe_start[idx])
        return beh, seq_w

    def _micro_loss(self, batch: Batch, targets: Targets, mb: Micro, norm: dict,
                    fresh: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        idx, w = mb.rows, mb.width
        ids, am, mask = batch.input_ids[idx, :w], batch.attention_mask[idx, :w], batch.loss_mask[idx, :w]
        with self._autocast():
            if self.algo.entropy_coef > 0:
                logp, ent = sequence_logprobs(self.model, ids, am, with_entropy=True, temperature=self.temperature,
                                              chunk_tokens=self.tc.logprob_chunk_tokens, pack=self.tc.pack_sequences)
            else:
                logp = sequence_logprobs(self.model, ids, am, temperature=self.temperature,
                                         chunk_tokens=self.tc.logprob_chunk_tokens, pack=self.tc.pack_sequences)
                ent = None
        logp = logp.float()
        behaviour, seq_w = self._behaviour(batch, targets, mb, logp, fresh)
        tok_w = targets.token_weights[idx, :w] if targets.token_weights is not None else None
        loss, m = policy_loss(logp, behaviour, targets.advantages[idx, :w], mask, self.algo, seq_w, tok_w, **norm)
        if targets.ref_logp is not None and not self.algo.kl_in_reward:
            kl, km = kl_loss(logp, targets.ref_logp[idx, :w], mask, self.algo, **norm)
            loss = loss + self.algo.kl_coef * kl
            m.update(km)
        if ent is not None:
            e, em = entropy_loss(ent.float(), mask, self.algo.loss_agg, **norm)
            loss = loss - self.algo.entropy_coef * e
            m.update(em)
        if self.critic is not None:
            with self._autocast():
                values = self.critic(ids, am, pack=self.tc.pack_sequences).float()
            vl, vm = value_loss(values, targets.old_values[idx, :w], targets.returns[idx, :w], mask, self.algo.value_clip,
                                "token-mean", num_tokens=norm["num_tokens"])
            loss = loss + self.algo.vf_coef * vl
            m.update(vm)
        m["actor/loss"] = float(loss.detach())
        return loss, m
