"""Turn-level credit: the advantage term of per-turn process rewards (pure tensor functions).

With a process reward (``trainer.process_reward``, ``rexrag.process_rewards``) each trajectory has a
reward ``p[b, k]`` per agent turn k. The trainer adds to the outcome estimator's advantages (any group
estimator: ``grpo``, ``rloo``) a per-turn term:

    R[b, k]  = sum_{j >= k} gamma^(j - k) * p[b, j]            process reward-to-go, gamma = algo.turn_discount
    A'[b, k] = R[b, k] - mean{ R[b', k] : b' in group(b), b' has turn k }
    A[b, t]  = A_outcome[b, t] + A'[b, turn(t)]                 on every trainable token t

Choices, and how they differ from the step-level grouping of GiGPO (arXiv 2505.10978) and verl's RFC:

- The baseline is per (group, turn index): the reward-to-go of turn k is compared with the other rollouts'
  turn k. A baseline shared by all turns of a group would favour early turns (their reward-to-go sums
  more future turns) rather than good searches. GiGPO groups by identical states; two rollouts' turn k
  rarely share a state here, so the turn index stands in for it. A (group, turn) with one member gets 0.
- The term is centred, not divided by its std: the weights of ``trainer.process_reward`` then set the
  exchange rate to the outcome advantage (``evidence*0.2``: a turn that finds one of two supporting
  passages its peers missed gets about +0.1, against an outcome advantage of order 1). Divided by the
  std, any weight would give process differences the size of a right answer, the over-correction a
  2026 study warns of.
- A group whose outcomes are all equal (a dead end) has zero outcome advantage but still gets this term
  wherever its rollouts' searches differ.
- REX-RAG probes join their source's group and carry their source's turns up to the cut (same turn
  indices, same searches: ``Trajectory.truncated``), so they are compared turn by turn like any member.

Shapes: B rows, T tokens, K turns (the most any row has).
"""

from __future__ import annotations

import torch
from torch import Tensor


def turn_returns(turn_rewards: Tensor, gamma: float) -> Tensor:
    """[B, K] per-turn rewards -> [B, K] reward-to-go ``R[:, k] = p[:, k] + gamma * R[:, k + 1]``."""
    out = torch.zeros_like(turn_rewards)
    running = torch.zeros_like(turn_rewards[:, 0]) if turn_rewards.shape[1] else None
    for k in reversed(range(turn_rewards.shape[1])):
        running = turn_rewards[:, k] + gamma * running
        out[:, k] = running
    return out


def turns_present(turns: Tensor, response_mask: Tensor, n_turns: int) -> Tensor:
    """[B, K] bool: row b has a trainable token in turn k (``turns`` [B, T] long, the agent turn of each token)."""
    B = turns.shape[0]
    m = response_mask > 0
    present = torch.zeros(B, n_turns, dtype=torch.bool, device=turns.device)
    rows = torch.arange(B, device=turns.device)[:, None].expand_as(turns)
    present[rows[m], turns[m].clamp(0, n_turns - 1)] = True
    return present


def process_advantages(turn_rewards: Tensor, turns: Tensor, response_mask: Tensor, group_ids: Tensor,
                       gamma: float) -> tuple[Tensor, Tensor]:
    """The per-token process advantage term and its per-turn values.

    Args: ``turn_rewards`` [B, K] (0 beyond a row's last turn), ``turns`` [B, T] long, ``response_mask`` [B, T],
    ``group_ids`` [B] long, ``gamma`` in [0, 1].
    Returns (``adv`` [B, T], exactly 0 where ``response_mask`` is 0; ``per_turn`` [B, K], 0 where a row has no
    trainable token in that turn or is alone in its (group, turn)).
    """
    B, K = turn_rewards.shape
    if K == 0:
        return torch.zeros_like(response_mask), turn_rewards
    returns = turn_returns(turn_rewards.double(), float(gamma))
    present = turns_present(turns, response_mask, K)
    _, inv = torch.unique(group_ids, return_inverse=True)
    G = int(inv.max()) + 1 if B else 0
    p = present.double()
    sums = torch.zeros(G, K, dtype=torch.float64, device=returns.device).index_add_(0, inv, returns * p)
    counts = torch.zeros(G, K, dtype=torch.float64, device=returns.device).index_add_(0, inv, p)
    mean = sums / counts.clamp(min=1)
    per_turn = torch.where(present & (counts[inv] > 1), returns - mean[inv], torch.zeros_like(returns))
    tok = per_turn.gather(1, turns.clamp(0, K - 1))
    adv = torch.where(response_mask > 0, tok, torch.zeros_like(tok)).to(response_mask.dtype)
    return adv, per_turn.to(turn_rewards.dtype)
