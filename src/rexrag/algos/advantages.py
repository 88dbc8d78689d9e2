"""Advantage estimators: pure tensor functions behind one registry with one signature.

Every estimator is ``fn(rewards, response_mask, group_ids, values, cfg) -> (advantages, returns)``:

- ``rewards``: [B] outcome rewards (one per trajectory), or [B, T] token-level rewards (used when the
  KL penalty is folded into the reward). A [B] reward sits on the last trainable token of its row.
- ``response_mask``: [B, T] float, 1 on trainable tokens (POLICY, and PROBE when trained). Prompt,
  retrieved ``<information>`` and notice tokens are 0: they get advantage 0 and, for ``gae``, no value
  and no TD error at all (the recursion jumps over them).
- ``group_ids``: [B] long, the GRPO group of each row (probes share their source's id, so group
  sizes vary; a group may have a single member).
- ``values``: [B, T] critic values (``gae`` only; ``None`` otherwise). ``values[b, t]`` is V of the
  state *before* token t, aligned like the per-token log-probs.
- ``cfg``: :class:`rexrag.config.AlgoConfig`.

Returns ``advantages`` and ``returns``, both [B, T] and exactly 0 where ``response_mask`` is 0.

Differences from public code (verl ``core_algos``): groups are found from ids of any size, including
size 1 (a singleton has no baseline to compare with, so its advantage is 0 rather than verl's
``r - 0``/``std=1`` special case); the std is the unbiased one, plus ``EPS``; GAE skips observation
tokens instead of running the recursion over a response-only mask that still contains them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from rexrag.errors import UserError
from rexrag.registry import Registry

EPS = 1e-6

AdvFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], object], tuple[Tensor, Tensor]]
_REGISTRY: Registry[AdvFn] = Registry("advantage estimator")


def register_adv_estimator(name: str) -> Callable[[AdvFn], AdvFn]:
    """Decorator adding an estimator under ``name``; a second registration of a name raises."""
    return _REGISTRY.register(name)


def get_adv_estimator(name: str) -> AdvFn:
    return _REGISTRY.get(name)


def adv_estimators() -> list[str]:
    return _REGISTRY.names()


# --------------------------------------------------------------------------- helpers


def token_rewards(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """[B] outcome rewards -> [B, T] with each reward on its row's last trainable token.

    A [B, T] input is returned masked. A row without trainable tokens keeps no reward.
    """
    mask = response_mask > 0
    if rewards.dim() == 2:
        return torch.where(mask, rewards, torch.zeros_like(rewards))
    B, T = response_mask.shape
    pos = torch.arange(T, device=response_mask.device).expand(B, T)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=-1).values  # [B]
    out = torch.zeros(B, T, dtype=rewards.dtype, device=rewards.device)
    has = last >= 0
    out[has.nonzero(as_tuple=True)[0], last[has]] = rewards[has]
    return out


def sequence_scores(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """[B] or [B, T] rewards -> [B] sequence scores (masked sum over tokens for [B, T])."""
    if rewards.dim() == 1:
        return rewards
    return torch.where(response_mask > 0, rewards, torch.zeros_like(rewards)).sum(-1)


def group_stats(scores: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group mean, unbiased group std and group size, each [B].

    Groups are the distinct values of ``group_ids`` (any sizes). For a singleton the std is
    reported as 1 (there is no spread to estimate).
    """
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = counts.shape[0]
    s = scores.double()
    sums = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, inv, s)
    mean = sums / counts
    sq = torch.zeros(G, dtype=s.dtype, device=s.device).index_add_(0, inv, (s - mean[inv]) ** 2)
    var = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.ones_like(sq))
    return mean[inv].to(scores.dtype), var.sqrt()[inv].to(scores.dtype), counts[inv]


def masked_whiten(x: Tensor, mask: Tensor) -> Tensor:
    """(x - mean) / (std + EPS) over the masked entries of [B, T]; masked-out entries -> 0."""
    m = mask > 0
    vals = x[m]
    if vals.numel() < 2:  # no spread to normalise by: a lone token carries no signal
        return torch.zeros_like(x)
    out = (x - vals.mean()) / (vals.std() + EPS)
    return torch.where(m, out, torch.zeros_like(out))


def _broadcast(adv_seq: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """[B] sequence advantages -> ([B, T], [B, T]) on trainable tokens; returns = advantages."""
    adv = torch.where(response_mask > 0, adv_seq[:, None].to(response_mask.dtype), torch.zeros_like(response_mask))
    return adv, adv.clone()


# --------------------------------------------------------------------------- estimators


@register_adv_estimator("grpo")
def grpo(rewards, response_mask, group_ids, values, cfg):
    """GRPO: A_b = (r_b - mean_g) / (std_g + EPS), std unbiased; ``norm_adv_by_std=False`` is
    Dr. GRPO (A_b = r_b - mean_g). Singleton groups get A = 0. Shapes: [B] -> [B, T]."""
    scores = sequence_scores(rewards, response_mask)
    mean, std, counts = group_stats(scores, group_ids)
    adv = scores - mean
    if getattr(cfg, "norm_adv_by_std", True):
        adv = adv / (std + EPS)
    adv = torch.where(counts > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv, response_mask)


@register_adv_estimator("rloo")
def rloo(rewards, response_mask, group_ids, values, cfg):
    """RLOO: A_b = r_b - mean of the other members of its group = n/(n-1) * (r_b - mean_g).
    Singleton groups get A = 0. Shapes: [B] -> [B, T]."""
    scores = sequence_scores(rewards, response_mask)
    mean, _, counts = group_stats(scores, group_ids)
    n = counts.to(scores.dtype)
    adv = torch.where(counts > 1, (scores - mean) * n / (n - 1).clamp(min=1), torch.zeros_like(scores))
    return _broadcast(adv, response_mask)


def discounted_returns(tok_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_next over trainable tokens only (others skipped, 0). [B, T] -> [B, T]."""
    m = response_mask > 0
    B, T = tok_rewards.shape
    out = torch.zeros_like(tok_rewards)
    running = torch.zeros(B, dtype=tok_rewards.dtype, device=tok_rewards.device)
    for t in reversed(range(T)):
        g = tok_rewards[:, t] + gamma * running
        running = torch.where(m[:, t], g, running)
        out[:, t] = torch.where(m[:, t], g, torch.zeros_like(g))
    return out


@register_adv_estimator("reinforce_pp")
def reinforce_pp(rewards, response_mask, group_ids, values, cfg):
    """REINFORCE++: discounted token returns (gamma from cfg), whitened over every trainable token of
    the batch (no group baseline). Returns are the un-whitened G_t. Shapes: [B] or [B, T] -> [B, T]."""
    returns = discounted_returns(token_rewards(rewards, response_mask), response_mask, float(cfg.gamma))
    return masked_whiten(returns, response_mask), returns


@register_adv_estimator("gae")
def gae(rewards, response_mask, group_ids, values, cfg):
    """GAE over trainable tokens only: with t_1 < ... < t_n the trainable positions of a row,
    delta_i = r_{t_i} + gamma * V(t_{i+1}) - V(t_i) (V(t_{n+1}) = 0) and A_i = delta_i + gamma*lam*A_{i+1}.
    Observation tokens (INFO, NOTICE, PROMPT, PAD) are jumped over: their values never enter.
    returns = A + V. Shapes: rewards [B] or [B, T], values [B, T] -> [B, T]."""
    if values is None:
        raise UserError("algo.adv_estimator=gae needs a value model (critic values were not given)")
    m = response_mask > 0
    r = token_rewards(rewards, response_mask)
    v = torch.where(m, values.to(r.dtype), torch.zeros_like(r))  # huge/NaN values at skipped tokens vanish
    gamma, lam = float(cfg.gamma), float(cfg.lam)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_v = torch.zeros(B, dtype=r.dtype, device=r.device)
    last = torch.zeros(B, dtype=r.dtype, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * last
        adv[:, t] = torch.where(m[:, t], a, torch.zeros_like(a))
        next_v = torch.where(m[:, t], v[:, t], next_v)
        last = torch.where(m[:, t], a, last)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns
