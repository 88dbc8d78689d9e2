"""``RexExplorer``: the trainer's REX-RAG hook (mixed sampling + policy correction + adaptive ratio).

The trainer calls, once per step (see /API.md "Trainer <-> REX-RAG hook"):

    probes = explorer.explore(originals, rewards, agent, score_fn, reward_fn)   # after rollout + reward
    behaviour, seq_w, m = explorer.correct(batch, old_logprobs, is_probe, probe_start)  # before the loss
    metrics = explorer.end_step()                                                # after the update

The batch holds the originals first, then the kept probes. ``explore`` stores the step's alpha
(kept / (originals + kept)) and failure rate e (batch-wide under several processes, see
``rexrag.rex.comm``: K, the probe ranking, alpha, e and the accuracy that drives rho), so ``correct`` gives the same answer whether it is
called on the whole batch or on a mini-batch slice. Differences from the public code are listed in
``rexrag.rex.probe`` and ``rexrag.rex.correction``.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from rexrag.config import RexConfig, RolloutConfig
from rexrag.rex import probe as P
from rexrag.rex.comm import LocalComm
from rexrag.rex.correction import behaviour_logprobs
from rexrag.rex.pool import Pool
from rexrag.rollout.trajectory import Seg, Trajectory
from rexrag.sharding import drain

_SEG_NAMES = {Seg.PROMPT: "prompt", Seg.POLICY: "policy", Seg.INFO: "info", Seg.NOTICE: "notice", Seg.PROBE: "probe"}


class RexExplorer:
    """Implements the Explorer protocol of API.md for REX-RAG."""

    def __init__(
        self,
        cfg: RexConfig,
        rollout_cfg: RolloutConfig,
        tokenizer,
        pool: Pool | str | None = None,
        seed: int = 0,
        clip_range: tuple[float, float] = (0.2, 0.2),
        comm=None,
    ):
        self.cfg = cfg
        self.rollout_cfg = rollout_cfg
        self.tokenizer = tokenizer
        self.pool = pool if isinstance(pool, Pool) else Pool.load(pool if pool is not None else cfg.pool, tokenizer)
        self.rng = random.Random(seed)
        self.ratio = P.AdaptiveRatio(cfg.keep_ratio, cfg.rho_momentum)
        self.clip_range = clip_range
        self.comm = comm  # None: chosen at the first explore() (rexrag.rex.comm.default_comm)
        self._reset_step()

    def _reset_step(self) -> None:
        self.alpha = 0.0
        self.failure_rate = 0.0
        self._accuracy: float | None = None
        self._step_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ mixed sampling
    def _candidates(self, originals: list[Trajectory], failed: list[bool]) -> list[Trajectory]:
        cuts = [P.answer_cut(t, self.tokenizer) if f and not t.is_probe else None for t, f in zip(originals, failed)]
        sources = P.select_sources(
            [t.group_id for t in originals],
            failed,
            [c is not None for c in cuts],
            self.cfg.trigger,
            self.rng,
            probe_prob=self.cfg.probe_prob,
            probes_per_dead_group=self.cfg.probes_per_dead_group,
        )
        out = []
        for i in sources:
            k = self.rng.randrange(len(self.pool))  # uniform choice of exploratory prompt
            out.append(P.make_probe(originals[i], i, cuts[i], self.pool.token_ids[k], k))
        return out

    def _filter(self, candidates: list[Trajectory], n_originals: int, n_candidates: int, score_fn: Callable) -> list[Trajectory]:
        """The local candidates among the batch-wide top-K (K from all processes' originals)."""
        k = P.keep_count(n_originals, self.ratio.rho, n_candidates, self.cfg.keep_cap, self.cfg.keep_min)
        if k == 0:
            return []
        if k >= n_candidates:
            return candidates  # nothing to rank away; skip the scoring forward pass
        # Under several processes every one scores (maybe nothing): with a sharded policy the scoring
        # forward is collective (rexrag.sharding.Lockstep), so no process may skip it. The engine is awake
        # meanwhile: score_fn runs micro-batches of rex.score_micro_batch_size rows, the forward the GPU
        # memory plan reserves beside the engine's share (rexrag.gpu_plan, "probe scoring").
        local = P.probe_scores(candidates, score_fn(candidates)) if candidates or not isinstance(self.comm, LocalComm) else []
        parts = self.comm.gather(local)  # every process's scores, in rank order (ties: lower rank first)
        offset = sum(len(p) for p in parts[: self.comm.rank])
        kept = P.top_k([s for part in parts for s in part], k)
        return [candidates[i - offset] for i in kept if offset <= i < offset + len(candidates)]

    def _continue(self, kept: list[Trajectory], agent) -> list[Trajectory]:
        # Search budget: max_turns minus the retrievals in the kept prefix (the agent adds the
        # answer-only turn). The cut turn and the source's notice turns are refunded; the public code
        # gives a clone max_turns - k turns, k = its answering turn (see rexrag.rex.probe).
        budgets = [max(0, self.rollout_cfg.max_turns - t.n_searches) for t in kept]
        # the agent extends in place; remember what each probe was so its record can be checked
        before = [(list(t.token_ids), list(t.segments), t.source_index, t.probe_start, t.group_id, t.meta["pool_index"]) for t in kept]
        done = agent.run(kept, budgets)
        if len(done) != len(kept):
            raise RuntimeError(f"agent.run returned {len(done)} trajectories for {len(kept)} probes")
        for (ids, segs, src, start, gid, k), after in zip(before, done):
            n = len(ids)
            if after.token_ids[:n] != ids or after.segments[:n] != segs:
                raise RuntimeError("agent.run changed a probe's prefix tokens; probes must continue token-exactly")
            after.is_probe, after.source_index, after.probe_start, after.group_id = True, src, start, gid
            after.meta = {**after.meta, "pool_index": k}
        return done

    def explore(
        self,
        originals: list[Trajectory],
        rewards: list[float],
        agent,
        score_fn: Callable[[list[Trajectory]], list[torch.Tensor]],
        reward_fn: Callable[[list[Trajectory]], list[float]],
    ) -> list[Trajectory]:
        """Kept, finished probes (is_probe, source group, meta['reward'] set) for this step's batch."""
        if len(rewards) != len(originals):
            raise ValueError(f"{len(rewards)} rewards for {len(originals)} originals")
        self._reset_step()
        if self.comm is None:
            from rexrag.rex.comm import default_comm

            self.comm = default_comm()
        failed = P.failed_mask(rewards, self.cfg.success_reward)
        group_ids = [t.group_id for t in originals]
        candidates = self._candidates(originals, failed)
        n_orig, n_failed, n_cand = self.comm.sum([len(originals), sum(failed), len(candidates)])
        kept = self._filter(candidates, int(n_orig), int(n_cand), score_fn)
        probes = self._continue(kept, agent) if kept else []
        drain(getattr(agent, "backend", None))  # sharded policy: wait for the other processes' probes
        probe_rewards = [float(r) for r in reward_fn(probes)] if probes else []
        for t, r in zip(probes, probe_rewards, strict=True):
            t.meta["reward"] = r
        correct = [r >= self.cfg.success_reward for r in probe_rewards]
        n_kept, n_correct = self.comm.sum([len(probes), sum(correct)])  # batch-wide, as one controller sees it
        self._accuracy = n_correct / n_kept if n_kept else None
        self.failure_rate = n_failed / n_orig if n_orig else 0.0
        self.alpha = n_kept / (n_orig + n_kept) if n_kept else 0.0
        dead = set(P.dead_end_groups(group_ids, failed))
        rescued = {t.group_id for t, c in zip(probes, correct) if c and t.group_id in dead}
        self._step_metrics = {
            "rex/dead_end_frac": P.dead_end_fraction(group_ids, failed),
            "rex/failure_rate": self.failure_rate,
            "rex/probes_made": n_cand,
            "rex/probes_kept": n_kept,
            "rex/probe_acc": self._accuracy if self._accuracy is not None else float("nan"),
            "rex/dead_groups_rescued": float(len(rescued)),
            "rex/alpha": self.alpha,
        }
        return probes

    def rebase(self, originals: list[Trajectory], rewards: list[float], probes: list[Trajectory]) -> None:
        """The batch trained on was gathered over several :meth:`explore` rounds (dynamic sampling):
        alpha, the originals' failure rate and the probes' accuracy (hence rho) are recomputed
        batch-wide for it, so the correction describes the batch it corrects."""
        failed = P.failed_mask(rewards, self.cfg.success_reward)
        correct = [float(t.meta.get("reward", 0.0)) >= self.cfg.success_reward for t in probes]
        n_orig, n_failed, n_kept, n_correct = self.comm.sum([len(originals), sum(failed), len(probes), sum(correct)])
        self._accuracy = n_correct / n_kept if n_kept else None
        self.failure_rate = n_failed / n_orig if n_orig else 0.0
        self.alpha = n_kept / (n_orig + n_kept) if n_kept else 0.0
        self._step_metrics.update({"rex/failure_rate": self.failure_rate, "rex/probes_kept": n_kept, "rex/alpha": self.alpha,
                                   "rex/probe_acc": self._accuracy if self._accuracy is not None else float("nan")})

    @property
    def step_metrics(self) -> dict[str, float]:
        """The last :meth:`explore`'s ``rex/`` statistics (before :meth:`end_step` adds rho)."""
        return dict(self._step_metrics)

    def adopt(self, originals: list[Trajectory], rewards: list[float], probes: list[Trajectory],
              step_metrics: dict[str, float]) -> None:
        """Take a step's exploration done elsewhere (an async rollout worker ran :meth:`explore` on its own
        explorer, ``rexrag.train.async_worker``): its statistics, then alpha, e and the probes' accuracy
        recomputed here on the batch as trained (:meth:`rebase`), for :meth:`correct` and :meth:`end_step`."""
        if self.comm is None:
            from rexrag.rex.comm import default_comm

            self.comm = default_comm()
        self._reset_step()
        self._step_metrics = dict(step_metrics)
        self.rebase(originals, rewards, probes)

    # ------------------------------------------------------------------ correction
    def correct(
        self, batch: dict[str, torch.Tensor], old_logprobs: torch.Tensor, is_probe: torch.Tensor, probe_start: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(behaviour_logprobs [B, T], seq_weights [B] | None, metrics). Equals old_logprobs exactly
        (same tensor) and None when the step has no kept probes or correction is ``none``."""
        segments = batch["segments"]
        if bool(is_probe.any()) and self.alpha <= 0.0:
            raise RuntimeError("correct() got probes but explore() kept none this step; call explore() first")
        behaviour, weights = behaviour_logprobs(
            self.cfg.correction,
            batch["input_ids"],
            segments,
            old_logprobs,
            is_probe,
            probe_start,
            self.pool.trie,
            self.alpha,
            self.failure_rate,
            self.cfg.seq_weight_cap,
        )
        metrics = self._ratio_metrics(old_logprobs, behaviour, weights, batch["loss_mask"].bool())
        for seg, name in _SEG_NAMES.items():
            metrics[f"rex/tokens_{name}"] = float((segments == seg).sum())
        return behaviour, weights, metrics

    def _ratio_metrics(self, old, behaviour, weights, mask) -> dict[str, float]:
        """Importance ratio pi_old / q at the start of the update, over loss tokens (rex_token), or the
        sequence weights (rex_sequence); 'clipped' = outside [1 - clip_low, 1 + clip_high]."""
        if weights is not None:
            r = weights.double()
            cap = self.cfg.seq_weight_cap
            clipped = (r >= cap).double().mean()
        else:
            r = (old - behaviour).double().exp()[mask]
            lo, hi = self.clip_range
            clipped = ((r < 1 - lo) | (r > 1 + hi)).double().mean() if r.numel() else torch.tensor(0.0)
        if r.numel() == 0:
            return {"rex/ratio_mean": 1.0, "rex/ratio_min": 1.0, "rex/ratio_max": 1.0, "rex/ratio_clipfrac": 0.0}
        return {
            "rex/ratio_mean": float(r.mean()),
            "rex/ratio_min": float(r.min()),
            "rex/ratio_max": float(r.max()),
            "rex/ratio_clipfrac": float(clipped),
        }

    # ------------------------------------------------------------------ step end / checkpoint
    def end_step(self) -> dict[str, float]:
        """Update rho from the kept probes' accuracy; return the step's rex/ metrics."""
        rho = self.ratio.update(self._accuracy)
        metrics = {**self._step_metrics, "rex/rho": rho}
        self._accuracy = None  # a second end_step in the same step must not update rho twice
        return metrics

    def state_dict(self) -> dict:
        return {"ratio": self.ratio.state_dict(), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore rho and the probe RNG. A state carried to another number of processes
        (``rexrag.train.checkpoint.PerProcessState``) has ``rng_seed`` instead of ``rng``: rho is global
        and taken as saved; this process's RNG is reseeded with ``rng_seed``, which the checkpoint
        derives deterministically from (trainer seed, step, new rank)."""
        self.ratio.load_state_dict(state["ratio"])
        if "rng_seed" in state:
            self.rng.seed(int(state["rng_seed"]))
        elif "rng" in state:
            rng_state = state["rng"]
            # JSON round trips turn the tuple state into lists
            if isinstance(rng_state, list):
                rng_state = (rng_state[0], tuple(rng_state[1]), rng_state[2])
            self.rng.setstate(rng_state)
