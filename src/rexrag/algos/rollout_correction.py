"""Rollout correction: importance weights and rejection masks for the gap between the engine that
sampled a token and the trainer that scores it. Pure tensor functions, one registry.

Provenance. Every trained token was drawn from a known law, recorded in the trajectory:
    POLICY tokens   the engine's sampling distribution pi_eng (``rollout_logprobs``, recorded per token)
    PROBE tokens    REX-RAG's pool trie (inserted, never sampled by the engine)
and, where probes exist, REX-RAG's mixture over the two (``rexrag.rex.correction``). The trainer's
PPO anchor is the behaviour log-prob ``b_t``: pi_old(y_t) recomputed by the trainer, or REX-RAG's
mixture q_t built from it. The law the token was really drawn from is the same expression with the
engine's probabilities in place of the trainer's, b_t^eng. One rule covers every origin (decoupled
PPO, as verl's ``rollout_corr``, AReaL and slime's TIS):

    pi_theta / b^eng = (pi_theta / b) * (b / b^eng)
                     = (PPO ratio, clipped)  *  (rollout weight w_t, truncated or rejected; detached).

The rollout weight needs no REX-specific case: on a POLICY token the mixture is linear in pi (an
original's q_t is (1-alpha) pi_old; a probe prefix token's is pi_old ((1-alpha) + alpha e^(-1/s)); a
continuation token's is pi_old), so b / b^eng = pi_old(y_t) / pi_eng(y_t) exactly; on a PROBE token
neither side involves the engine and w_t = 1. So this module gets the log-ratio
``d_t = log pi_old(y_t) - log pi_eng(y_t)`` on POLICY tokens (0 elsewhere) and returns
    weights [B, T]   multiplying each token's policy loss (1 where nothing is corrected), and
    keep    [B, T]   1 for tokens that stay in the loss, 0 for rejected ones (which also leave the
                     loss denominator: the trainer multiplies the loss mask by it).

Choices (``algo.rollout_correction``; the peer option each corresponds to):
    none        no correction (probes and engine samples treated as drawn from pi_old)
    token_tis   w_t = min(e^d_t, C)                       verl token TIS, slime --use-tis, TRL token truncate
    seq_tis     w = min(e^(sum_t d_t), C) per sequence    verl sequence TIS, TRL sequence truncate
    token_mask  keep_t = [low <= e^d_t <= high]           verl token mask / TRL token mask / icepop
    seq_mask    keep = [low <= e^(sum d) <= high]         verl sequence mask, TRL sequence mask
    geo_mask    keep = [low <= e^(mean d) <= high]        verl geometric rejection, SkyRL's default
Sequence-level IS without truncation is unbiased for the policy gradient when sampling from the engine;
truncation at C trades a bias bounded by P_pi(w > C) * max|R grad log pi| for bounded variance
(``tests/test_rollout_correction.py`` checks both on an enumerable toy).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rexrag.registry import Registry

CorrectionFn = Callable[[Tensor, Tensor, object], tuple[Tensor, Tensor]]
ROLLOUT_CORRECTIONS: Registry[CorrectionFn] = Registry("rollout correction")
_MAX_LOG = 20.0  # e^20: far beyond any cap; keeps exp finite on garbage


def rollout_corrections() -> tuple[str, ...]:
    return tuple(ROLLOUT_CORRECTIONS.names())


def engine_log_ratio(old_logp: Tensor, engine_logp: Tensor, sampled: Tensor) -> Tensor:
    """d [B, T] = log pi_old - log pi_eng on the engine's tokens (``sampled``, bool [B, T]), 0 elsewhere."""
    d = torch.where(sampled, old_logp.float() - engine_logp.float(), torch.zeros_like(old_logp, dtype=torch.float32))
    return d.clamp(-_MAX_LOG, _MAX_LOG)


def _ones(d: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ones_like(d), torch.ones_like(d)


@ROLLOUT_CORRECTIONS.register("none")
def _none(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    return _ones(d)


@ROLLOUT_CORRECTIONS.register("token_tis")
def _token_tis(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    w = torch.where(sampled, d.exp().clamp(max=cfg.rollout_correction_cap), torch.ones_like(d))
    return w, torch.ones_like(d)


@ROLLOUT_CORRECTIONS.register("seq_tis")
def _seq_tis(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    w = d.sum(-1).clamp(-_MAX_LOG, _MAX_LOG).exp().clamp(max=cfg.rollout_correction_cap)
    return w[:, None].expand_as(d).clone(), torch.ones_like(d)


def _inside(log_ratio: Tensor, cfg) -> Tensor:
    lo, hi = cfg.rollout_correction_low, cfg.rollout_correction_high
    r = log_ratio.exp()
    return ((r >= lo) & (r <= hi)).float()


@ROLLOUT_CORRECTIONS.register("token_mask")
def _token_mask(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    keep = torch.where(sampled, _inside(d, cfg), torch.ones_like(d))
    return torch.ones_like(d), keep


@ROLLOUT_CORRECTIONS.register("seq_mask")
def _seq_mask(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    return torch.ones_like(d), _inside(d.sum(-1).clamp(-_MAX_LOG, _MAX_LOG), cfg)[:, None].expand_as(d).clone()


@ROLLOUT_CORRECTIONS.register("geo_mask")
def _geo_mask(d: Tensor, sampled: Tensor, cfg) -> tuple[Tensor, Tensor]:
    mean = d.sum(-1) / sampled.sum(-1).clamp(min=1)
    return torch.ones_like(d), _inside(mean, cfg)[:, None].expand_as(d).clone()


def rollout_correction(old_logp: Tensor, engine_logp: Tensor, sampled: Tensor, loss_mask: Tensor, is_probe: Tensor,
                       cfg) -> tuple[Tensor, Tensor, dict[str, float]]:
    """(weights [B, T], keep [B, T], metrics) of ``cfg.rollout_correction`` (an ``AlgoConfig``) for a
    batch: ``old_logp`` / ``engine_logp`` [B, T] (trainer's and engine's log-probs of each token),
    ``sampled`` [B, T] bool (the POLICY tokens: drawn by the engine), ``loss_mask`` [B, T] (the tokens
    trained), ``is_probe`` [B]. Metrics, per kind
    (``policy``: originals' POLICY tokens, ``probe_policy``: probes'): mean / max of e^d, the share of
    tokens whose weight was truncated and the share rejected, over trained sampled tokens."""
    sampled = sampled.bool()
    d = engine_log_ratio(old_logp, engine_logp, sampled)
    weights, keep = ROLLOUT_CORRECTIONS.get(cfg.rollout_correction)(d, sampled, cfg)
    out: dict[str, float] = {}
    trained = sampled & (loss_mask > 0)
    for kind, rows in (("policy", ~is_probe), ("probe_policy", is_probe)):
        m = trained & rows[:, None]
        if not bool(m.any()):
            continue
        ratio = d.exp()[m]
        out[f"rollout_corr/{kind}/ratio_mean"] = float(ratio.mean())
        out[f"rollout_corr/{kind}/ratio_max"] = float(ratio.max())
        truncated = float((weights[m] >= cfg.rollout_correction_cap).float().mean()) if cfg.rollout_correction.endswith("_tis") else 0.0
        out[f"rollout_corr/{kind}/truncated_frac"] = truncated
        out[f"rollout_corr/{kind}/rejected_frac"] = float((keep[m] == 0).float().mean())
    return weights, keep, out
