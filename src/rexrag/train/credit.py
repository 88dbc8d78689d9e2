"""Turn-level credit and the pass-rate curriculum inside a training step (the trainer's hooks).

- :class:`ProcessCredit` (``trainer.process_reward``): scores every trajectory's turns when its outcome reward
  is computed (originals and REX-RAG probes alike), adds the turn-level term of
  ``rexrag.algos.turn_credit`` to the outcome estimator's advantages, and logs ``process/`` metrics. With no
  process reward the trainer holds None and its advantages are the estimator's, untouched.
- :func:`search_metrics`: what the searches did, logged every step whatever the reward (the control arm
  needs them too): ``search/recall`` of the supporting passages (data with ``supporting_doc_ids``), and two
  reward-hacking sentinels, ``search/query_copy_rate`` (queries that copy the question) and
  ``search/turn_limit_rate`` (rollouts that used every search turn).
- :func:`observe_curriculum`: folds the step's original rollouts into the ``pass_rate`` sampler's estimate,
  gathered from every process so all draw the same next batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rexrag.algos.turn_credit import process_advantages
from rexrag.errors import ConfigError
from rexrag.process_rewards import KEY, build_process_reward, check_data, process_reward_trajectories
from rexrag.rewards import normalize_answer

GROUP_ESTIMATORS = ("grpo", "rloo")  # estimators with a group baseline, to which the turn term is added
COPY_SHARE = 0.9  # a query holding this share of the question's words copies it


def check_setup(cfg, examples: list, where: str) -> None:
    """Refuse, before any model loads, a process reward the estimator or the data cannot serve (``ConfigError``)."""
    if not cfg.trainer.process_reward:
        return
    if cfg.algo.adv_estimator not in GROUP_ESTIMATORS:
        raise ConfigError(f"{KEY}={cfg.trainer.process_reward!r} adds a group-relative term to the outcome advantage; "
                          f"algo.adv_estimator={cfg.algo.adv_estimator} has no group baseline (use one of "
                          f"{list(GROUP_ESTIMATORS)})")
    check_data(cfg.trainer.process_reward, examples, where)


class ProcessCredit:
    """The process reward of ``cfg.trainer.process_reward`` and its advantage term (``algo.turn_discount``)."""

    def __init__(self, cfg, tokenizer):
        self.fn = build_process_reward(cfg.trainer.process_reward)
        self.gamma = float(cfg.algo.turn_discount)
        self.tokenizer = tokenizer
        self.last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> ProcessCredit | None:
        if not cfg.trainer.process_reward:
            return None
        if cfg.algo.adv_estimator not in GROUP_ESTIMATORS:
            check_setup(cfg, [], "")  # raises, naming the estimator
        return cls(cfg, tokenizer)

    def score(self, trajs: list) -> None:
        """Per-turn rewards of ``trajs`` into ``traj.meta['turn_rewards']``."""
        process_reward_trajectories(self.fn, self.tokenizer, trajs)

    def add(self, batch, advantages: Tensor) -> Tensor:
        """``advantages`` [B, T] plus the turn-level term of ``batch.turn_rewards`` [B, K]; metrics into ``last``."""
        term, per_turn = process_advantages(batch.turn_rewards, batch.turns, batch.loss_mask, batch.group_ids, self.gamma)
        self.last = signal_metrics(batch.rewards, batch.group_ids, term, batch.loss_mask)
        return advantages + term

    def metrics(self, originals: list) -> dict[str, float]:
        """``process/reward_per_turn`` (the weighted sum, over the originals' turns), each term's mean per turn,
        and the ``process/no_signal_*`` shares of the last :meth:`add`."""
        rewards = [r for tr in originals for r in tr.meta.get("turn_rewards", [])]
        out = {"process/reward_per_turn": sum(rewards) / len(rewards) if rewards else 0.0, **self.last}
        out.update({f"process/{name}_per_turn": v for name, v in self.fn.last.items()})
        return out


def signal_metrics(rewards: Tensor, group_ids: Tensor, term: Tensor, mask: Tensor, tol: float = 1e-9) -> dict[str, float]:
    """``process/no_signal_before``: share of groups whose outcome rewards are all equal (zero outcome advantage,
    dead ends included); ``process/no_signal_after``: share of groups that the process term leaves at zero too."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if len(inv) else 0
    if G == 0:
        return {}
    r = rewards.double()
    hi = torch.full((G,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((G,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    flat = (hi - lo) <= tol
    moved = torch.where(mask > 0, term.abs(), torch.zeros_like(term)).amax(dim=1).double()
    has_term = torch.zeros(G, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, moved, "amax") > tol
    return {"process/no_signal_before": float(flat.double().mean()),
            "process/no_signal_after": float((flat & ~has_term).double().mean())}


def copies_question(query: str, question: str) -> bool:
    """The query holds at least ``COPY_SHARE`` of the question's (normalised) words."""
    q = normalize_answer(question).split()
    if not q:
        return False
    words = set(normalize_answer(query).split())
    return sum(w in words for w in q) / len(q) >= COPY_SHARE


def search_metrics(originals: list, max_turns: int) -> dict[str, float]:
    """``search/recall`` (mean share of ``supporting_doc_ids`` retrieved, over rollouts whose example has them),
    ``search/query_copy_rate`` and ``search/turn_limit_rate`` (rollouts with ``max_turns`` searches)."""
    if not originals:
        return {}
    recalls, copies, queries = [], 0, 0
    for tr in originals:
        ex = tr.example
        gold = {str(d) for d in ((getattr(ex, "metadata", None) or {}).get("supporting_doc_ids") or [])}
        if gold:
            found = {d for r in tr.retrievals for d in r.doc_ids}
            recalls.append(len(found & gold) / len(gold))
        for r in tr.retrievals:
            queries += 1
            copies += copies_question(r.query, getattr(ex, "question", ""))
    out = {"search/query_copy_rate": copies / queries if queries else 0.0,
           "search/turn_limit_rate": sum(tr.n_searches >= max_turns > 0 for tr in originals) / len(originals)}
    if recalls:
        out["search/recall"] = sum(recalls) / len(recalls)
    return out


def observe_curriculum(trainer, trajs: list, rewards: list[float]) -> None:
    """Fold the original rollouts ``trajs`` of every process into ``trainer.sampler``'s pass-rate estimate (no-op
    for a sampler without ``observe``)."""
    if not hasattr(trainer.sampler, "observe"):
        return
    from rexrag.curriculum import group_results
    from rexrag.sharding import gather_objects

    mine = group_results(trajs, rewards, trainer.cfg.rex.success_reward, trainer.prompt_index)
    trainer.sampler.observe([x for part in gather_objects(mine) for x in part])
