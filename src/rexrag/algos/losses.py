"""Policy, KL, value and entropy losses: pure tensor functions returning ``(loss, metrics)``.

Shapes: B = trajectories, T = tokens (right-padded), V = vocabulary. ``mask`` is the [B, T] float
loss mask (POLICY, and PROBE tokens when trained): retrieved ``<information>`` text, notices, the
prompt and padding never enter a loss or a metric. Every function first replaces masked-out entries
with zeros, so garbage there (even inf/NaN) cannot leak into the loss *or its gradient*.

One :func:`aggregate` serves every reduction mode. Its optional ``num_tokens`` / ``num_seqs``
normalisers let the trainer split a mini-batch into micro-batches (and processes) whose losses sum to
exactly the mini-batch loss: it passes the mini-batch's global counts, divided by the world size.

Differences from public code: the REX-RAG mixture enters only through ``behaviour_logp`` (the
denominator of the ratio, which defaults to the old policy's log-probs) and optional per-sequence
weights ``seq_weights``; clip-higher and dual-clip follow DAPO/verl.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rexrag.errors import UserError

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the masked-out entries (before any exp/log so no inf/NaN can appear there)."""
    return torch.where(mask > 0, x, torch.zeros_like(x))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, T] over ``mask`` [B, T]; 0 when the mask is empty."""
    m = mask > 0
    return torch.where(m, x, torch.zeros_like(x)).sum() / m.sum().clamp(min=1)


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    horizon: Optional[int] = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    - ``token-mean``: sum over all masked tokens / number of masked tokens.
    - ``seq-mean-token-mean``: mean over sequences (with >= 1 masked token) of each sequence's token mean.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): mean over sequences of token *sums* / ``horizon``
      (a constant length, default T), so long and short answers weigh per token alike.
    ``num_tokens`` / ``num_seqs`` override the denominators (global counts for micro-batching).
    """
    m = mask > 0
    lm = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else m.sum().clamp(min=1)
        return lm.sum() / denom
    per_seq_tokens = m.sum(-1)
    nonempty = per_seq_tokens > 0
    n_seqs = num_seqs if num_seqs is not None else nonempty.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (lm.sum(-1) / per_seq_tokens.clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        H = horizon if horizon is not None else loss_mat.shape[-1]
        return lm.sum() / (n_seqs * max(H, 1))
    raise UserError(f"unknown loss aggregation {mode!r}; choose one of {list(AGG_MODES)}")


def sequence_log_ratio(logp: Tensor, log_ratio: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio, per token [B, T]: every token of row i carries
    sg(mean over its masked tokens of ``log_ratio``) + logp - sg(logp), so its value is the sequence's
    and its gradient is the token's own score (GSPO-token; equal to GSPO with seq-mean-token-mean)."""
    m = mask > 0
    seq = (torch.where(m, log_ratio, torch.zeros_like(log_ratio)).sum(-1) / m.sum(-1).clamp(min=1)).detach()
    return seq[:, None] + logp - logp.detach()


def policy_loss(
    logp: Tensor,
    behaviour_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg,
    seq_weights: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    **agg,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with clip-higher and optional dual clip.

    ratio = exp(logp - behaviour_logp), all [B, T]; behaviour_logp is the old policy's log-probs, or
    REX-RAG's mixture log q_t. loss_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); with dual
    clip (c > 1) negative-advantage tokens are capped at -A c. ``cfg.ratio_level == "sequence"`` (GSPO):
    r is the sequence's length-normalised ratio (:func:`sequence_log_ratio`) clipped to
    [1 - gspo_clip_low, 1 + gspo_clip_high]. ``seq_weights`` [B] and ``token_weights`` [B, T] (detached;
    REX-RAG's sequence weights, the rollout correction's importance weights) scale the per-token loss.
    ``agg`` goes to :func:`aggregate` (mode = cfg.loss_agg).
    """
    logp, behaviour_logp, advantages = _clean(logp, mask), _clean(behaviour_logp, mask), _clean(advantages, mask)
    log_ratio = (logp - behaviour_logp).clamp(-20.0, 20.0)
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    if getattr(cfg, "ratio_level", "token") == "sequence":
        log_ratio = sequence_log_ratio(logp, log_ratio, mask)
        lo, hi = 1.0 - cfg.gspo_clip_low, 1.0 + cfg.gspo_clip_high
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(lo, hi)
    loss_mat = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).float()
    dual = torch.zeros_like(loss_mat)
    if cfg.dual_clip_c:
        cap = -advantages * cfg.dual_clip_c
        use_cap = (advantages < 0) & (loss_mat > cap)
        dual = use_cap.float()
        loss_mat = torch.where(use_cap, cap, loss_mat)
    if seq_weights is not None:
        loss_mat = loss_mat * seq_weights.detach()[:, None].to(loss_mat.dtype)
    if token_weights is not None:
        loss_mat = loss_mat * _clean(token_weights.detach().to(loss_mat.dtype), mask)
    loss = aggregate(loss_mat, mask, cfg.loss_agg, **agg)
    with torch.no_grad():
        metrics = {
            "actor/pg_loss": float(loss),
            "actor/clip_frac": float(masked_mean(clipped, mask)),
            "actor/dual_clip_frac": float(masked_mean(dual, mask)),
            "actor/approx_kl": float(masked_mean(0.5 * log_ratio**2, mask)),  # vs behaviour policy
            "actor/ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, metrics


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token KL estimate of the policy from the reference, [B, T] -> [B, T].

    k1 = log p - log p_ref; k2 = (log p - log p_ref)^2 / 2; k3 ("low-var") = e^x - x - 1 with
    x = log p_ref - log p (always >= 0; clamped to [-10, 10] as in verl for stability).
    """
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    if kind == "k3":
        x = (-diff).clamp(-20.0, 20.0)
        return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    raise UserError(f"unknown KL estimator {kind!r}; choose one of {list(KL_KINDS)}")


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, cfg, **agg) -> tuple[Tensor, dict[str, float]]:
    """KL-to-reference loss term (unscaled; the trainer multiplies by cfg.kl_coef). [B, T] -> scalar."""
    kl = kl_penalty(_clean(logp, mask), _clean(ref_logp, mask), cfg.kl_type)
    loss = aggregate(kl, mask, cfg.loss_agg, **agg)
    return loss, {"actor/kl_loss": float(loss.detach()), "actor/kl": float(masked_mean(kl.detach(), mask))}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float, mode: str = "token-mean", **agg
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, ±clip).
    All [B, T]; ``clip <= 0`` disables clipping."""
    values, old_values, returns = _clean(values, mask), _clean(old_values, mask), _clean(returns, mask)
    err = (values - returns) ** 2
    if clip > 0:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        loss_mat = 0.5 * torch.maximum(err, err_clip)
        clipfrac = (err_clip > err).float()
    else:
        loss_mat, clipfrac = 0.5 * err, torch.zeros_like(err)
    loss = aggregate(loss_mat, mask, mode, **agg)
    with torch.no_grad():
        metrics = {
            "critic/vf_loss": float(loss),
            "critic/vf_clip_frac": float(masked_mean(clipfrac, mask)),
            "critic/vpred_mean": float(masked_mean(values, mask)),
            "critic/returns_mean": float(masked_mean(returns, mask)),
        }
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last axis: [B, T, V] -> [B, T]."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1)
    p = torch.softmax(logits, dim=-1)
    return logz - (p * logits).sum(-1)


def entropy_loss(entropy: Tensor, mask: Tensor, mode: str, **agg) -> tuple[Tensor, dict[str, float]]:
    """Aggregated entropy [B, T] -> scalar (the trainer *subtracts* entropy_coef times this)."""
    ent = aggregate(_clean(entropy, mask), mask, mode, **agg)
    return ent, {"actor/entropy": float(masked_mean(entropy.detach(), mask))}
