"""Per-step rollout metrics: rewards, lengths, searches, formats and the learning signal a step carries."""

from __future__ import annotations

import torch
from torch import Tensor

from rexrag.algos.losses import masked_mean
from rexrag.rollout.views import policy_answer
from rexrag.rollout.trajectory import Seg, Trajectory


def groups_with_signal(group_ids: list[int], rewards: list[float], tol: float = 1e-9) -> float:
    """Share of groups whose rewards are not all equal (0.0 for no groups).

    A group-relative estimator (GRPO, RLOO) gives every member of an all-equal group a zero advantage,
    so this is the share of groups that carry any learning signal this step.
    """
    by_group: dict[int, list[float]] = {}
    for g, r in zip(group_ids, rewards, strict=True):
        by_group.setdefault(g, []).append(float(r))
    if not by_group:
        return 0.0
    return sum(1 for rs in by_group.values() if max(rs) - min(rs) > tol) / len(by_group)


def rollout_metrics(tokenizer, originals: list[Trajectory], batch, old_logp: Tensor, advantages: Tensor,
                    rewards: list[float], agent_metrics: dict, probes: list[Trajectory] = (),
                    format_ok=None) -> dict[str, float]:
    """Per-step rollout metrics of a step's ``batch`` (``rexrag.train.batch.Batch``: originals first,
    then kept probes). ``rollout/groups_with_signal``: share of groups whose original rollouts' rewards
    differ (non-zero group-relative advantage); ``..._after_probes``: the same once kept probes have
    joined their groups; ``rollout/em_rate``: share of originals whose answer is an exact match;
    ``format_ok(traj) -> bool`` gives ``rollout/valid_format_rate``."""
    from rexrag.rewards import exact_match

    r = torch.tensor(rewards, dtype=torch.float64)
    gids = [tr.group_id for tr in originals]
    probe_rewards = [float(tr.meta.get("reward", 0.0)) for tr in probes]
    resp = torch.tensor([len(tr) - tr.prompt_len for tr in originals], dtype=torch.float64)
    policy_tok = torch.tensor([tr.count(Seg.POLICY) for tr in originals], dtype=torch.float64)
    answers = [policy_answer(tokenizer, tr) for tr in originals]
    out = {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
        "reward/max": float(r.max()), "reward/min": float(r.min()),
        "reward/positive_rate": float((r > 0).double().mean()),
        "rollout/response_length_mean": float(resp.mean()), "rollout/response_length_max": float(resp.max()),
        "rollout/policy_tokens_mean": float(policy_tok.mean()),
        "rollout/searches_per_traj": float(sum(tr.n_searches for tr in originals) / len(originals)),
        "rollout/answered_rate": float(sum(a is not None for a in answers) / len(originals)),
        "rollout/trajectories": float(batch.size),
        "rollout/groups_with_signal": groups_with_signal(gids, rewards),
        "rollout/groups_with_signal_after_probes": groups_with_signal(gids + [tr.group_id for tr in probes],
                                                                       list(rewards) + probe_rewards),
        "rollout/em_rate": float(sum(exact_match(a, list(getattr(tr.example, "golden_answers", []) or []))
                                     for a, tr in zip(answers, originals)) / len(originals)),
        "actor/entropy_mc": float(-masked_mean(old_logp, (batch.segments == Seg.POLICY).float())),
        "actor/adv_mean": float(masked_mean(advantages, batch.loss_mask)),
    }
    if format_ok is not None:
        out["rollout/valid_format_rate"] = float(sum(format_ok(tr) for tr in originals) / len(originals))
    out.update({k if k.startswith("rollout/") else f"rollout/{k}": float(v) for k, v in agent_metrics.items()
                if isinstance(v, (int, float))})
    return out


def update_flops(lengths: Tensor, params: int, trained_params: int, layers: int, hidden: int) -> float:
    """Floating-point operations of one forward+backward over rows of ``lengths`` [B] real tokens.

    ``params``: the parameters that multiply (an untied input embedding is a lookup: leave it out).
    Matmuls: 2 FLOPs a parameter a token forward, 2 backward for the activations' gradients and 2 for
    the weights' (trained parameters only): ``(4 * params + 2 * trained_params) * tokens``, i.e. the
    usual 6 x parameters x tokens for full fine-tuning. Attention scores and their weighted sum:
    ``6 * layers * hidden * T**2`` a row of T tokens (the 12 L d T of PaLM's count, halved for the causal
    mask). Padding and gradient checkpointing's recomputation are not counted: they are overhead.
    """
    t = lengths.double()
    return float((4 * params + 2 * trained_params) * t.sum() + 6 * layers * hidden * (t * t).sum())
