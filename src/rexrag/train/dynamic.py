"""The prompts of one step and their rollouts: plainly, or with DAPO's dynamic sampling.

Dynamic sampling (``data.dynamic_sampling``; DAPO, arXiv 2503.14476). A group whose rewards are all equal
gives every member a zero group-relative advantage: it carries no signal. Each round samples a fresh
global batch of prompts (every process its share), rolls them out, scores them and lets REX-RAG add its
probes (probes join their group first, so a dead-end group that a probe rescued is kept: probes, then the
filter). Groups without a signal are dropped: no reward spread and, with turn-level credit
(``trainer.process_reward``), no spread of any turn's process reward-to-go among the members that reached
that turn either (such a group has a gradient on its searches: dropping it would undo the credit); rounds continue until this process holds its share of
``data.batch_size`` groups with signal or ``data.dynamic_sampling_max_rounds`` rounds ran. Every process
runs the same number of rounds (rollouts, REX-RAG's batch-wide statistics and sharded forwards are
collective), decided by an all-reduce of "still short". Still short after the last round, a process fills
its share with dropped groups (zero advantage: they cost an update, they teach nothing), so every process
trains on ``batch_size / world`` groups. A prompt is used at most once per step (rounds may cross an
epoch boundary of the sampler): group ids stay unique. Every round's tokens are sampled by the backend,
so they count in its sampled-token statistics. The engine sleeps once, after the last round.
"""

from __future__ import annotations

import time

import torch

from rexrag.algos.turn_credit import turn_returns
from rexrag.sharding import global_max


def sample_step(trainer, t: dict) -> tuple[list, list[float], list, dict]:
    """(originals, their rewards, kept probes, agent metrics) for one step of ``trainer``; then the
    engine sleeps (GPU) and the processes wait for each other, timed as ``rollout_wait`` (else the wait
    would count as the update's: its first collective is where an early process would wait)."""
    out = _sample(trainer, t)
    start = time.perf_counter()
    trainer.colocation.after_rollout()
    t["rollout_wait"] = t.get("rollout_wait", 0.0) + time.perf_counter() - start
    return out


def _sample(trainer, t: dict) -> tuple[list, list[float], list, dict]:
    data = trainer.cfg.data
    if not data.dynamic_sampling:
        prompts = trainer.sampler.next_batch()[trainer.rank :: trainer.world]  # whole groups per process
        return trainer.sample([trainer.examples[i] for i in prompts], t)
    share, seen = data.batch_size // trainer.world, set()
    kept: list[tuple] = []
    dropped: list[tuple] = []
    rounds, metrics = 0, {}
    while True:
        rounds += 1
        prompts = [trainer.examples[i] for i in _fresh_prompts(trainer, seen)]
        trajs, rewards, probes, metrics = trainer.sample(prompts, t, round_idx=rounds - 1)
        gamma = None if getattr(trainer, "process", None) is None else float(trainer.cfg.algo.turn_discount)
        for group in _groups(trajs, rewards, probes):
            (kept if has_signal(group, gamma) else dropped).append(group)
        short = global_max(trainer.acc, float(len(kept) < share)) > 0
        if not short or rounds >= data.dynamic_sampling_max_rounds:
            break
    filled = max(0, share - len(kept))
    chosen = kept[:share] + dropped[:filled]
    trajs = [tr for g in chosen for tr in g[0]]
    rewards = [r for g in chosen for r in g[1]]
    probes = [p for g in chosen for p in g[2]]
    if trainer.explorer is not None and hasattr(trainer.explorer, "rebase"):
        trainer.explorer.rebase(trajs, rewards, probes)  # alpha, e and probe accuracy of the batch trained on
    metrics = {**metrics, "dynamic_rounds": float(rounds), "dynamic_groups_dropped": float(len(dropped) - min(filled, len(dropped))),
               "dynamic_groups_filled": float(min(filled, len(dropped)))}
    return trajs, rewards, probes, metrics


def _fresh_prompts(trainer, seen: set) -> list[int]:
    """This process's share of ``batch_size`` prompts whose group ids this step has not used. The global
    list is built from the sampler alone, so every process draws the same one."""
    out: list[int] = []
    while len(out) < trainer.cfg.data.batch_size:
        for i in trainer.sampler.next_batch():
            gid = trainer.examples[i].group_id
            if gid not in seen and len(out) < trainer.cfg.data.batch_size:
                out.append(i)
                seen.add(gid)
    return out[trainer.rank :: trainer.world]


def _groups(trajs: list, rewards: list[float], probes: list) -> list[tuple[list, list[float], list]]:
    """(originals, rewards, probes) per group id, in first-seen order."""
    by: dict[int, tuple[list, list, list]] = {}
    for tr, r in zip(trajs, rewards, strict=True):
        g = by.setdefault(tr.group_id, ([], [], []))
        g[0].append(tr)
        g[1].append(float(r))
    for p in probes:
        by[p.group_id][2].append(p)
    return list(by.values())


def has_signal(group: tuple, gamma: float | None = None, tol: float = 1e-9) -> bool:
    """Whether ``group`` ((originals, rewards, probes)) gives any member a non-zero advantage: its outcome rewards
    differ or, with turn-level credit (``gamma``: ``algo.turn_discount``; None without a process reward), the
    process reward-to-go of some turn differs among the members that reached it (``meta['turn_rewards']``),
    the same comparison :func:`rexrag.algos.turn_credit.process_advantages` centres."""
    values = list(group[1]) + [float(p.meta.get("reward", 0.0)) for p in group[2]]
    if max(values) - min(values) > tol:
        return True
    if gamma is None:
        return False
    returns = [turn_returns(torch.tensor([tr.meta.get("turn_rewards") or []], dtype=torch.float64), gamma)[0].tolist()
               for tr in [*group[0], *group[2]]]
    for k in range(max(map(len, returns), default=0)):
        at_k = [r[k] for r in returns if len(r) > k]
        if len(at_k) > 1 and max(at_k) - min(at_k) > tol:
            return True
    return False

