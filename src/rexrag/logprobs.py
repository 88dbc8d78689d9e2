"""Per-token log-probs of given tokens: the one log-prob path of trainer, probe scoring and tests.

``sequence_logprobs`` differs from the usual ``log_softmax(logits).gather`` (verl, TRL): it runs the
decoder once and applies the LM head in chunks of positions, taking ``logit[target] - logsumexp``
in float32, so no [B, T, V] float32 log-softmax copy exists (V is 49k for SmolLM2, 152k for Qwen2.5);
with gradients each chunk is recomputed in backward instead of kept. It is the only log-prob path:
asked for entropy it computes it per chunk from the same logits (the PPO ratio therefore does not
depend on whether the entropy bonus is on). The chunked head runs under DDP (as the wrapper's forward)
and FSDP2 (as a registered forward method) too. ``position_ids`` is the one place positions are derived
from an attention mask.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask (1 = real token, left or right padding) -> [B, T] long position of each token among
    its row's real tokens (0 at padding), so padding never shifts positions. The one definition used by
    the log-prob passes, the value model and the HF rollout backend."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class TokenLogprob(torch.autograd.Function):
    """logits [..., V] (any float dtype), targets [...] long -> log p(target) [...] float32, computed in float32.

    The same numbers as ``logits.float().gather(...) - logits.float().logsumexp(-1)`` (bitwise); backward
    ``onehot(target) - softmax`` in one [N, V] float32 buffer, where autograd's fills four [N, V] tensors
    plus a cast (10 % of the demo's update with a 49k vocabulary)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return lf.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        g = logits.to(torch.float32, copy=True)  # a fresh buffer also for float32 logits: the saved ones stay intact
        g.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -grad * softmax
        g.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1).to(g.dtype))
        return g.to(logits.dtype), None


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                    temperature: float = 1.0):
    """hidden [N, H], targets [N] -> log p(target) [N] in float32 (logit/T - logsumexp), and with
    ``with_entropy`` also the [N] entropy of each position's distribution (from the same logits)."""
    logits = head(hidden)  # [N, V], bf16 under autocast
    if temperature != 1.0:
        logits = logits.float() / temperature
    if not with_entropy:
        return TokenLogprob.apply(logits, targets)
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return lp, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def _has_plain_head(model) -> bool:
    """True when logits are exactly ``head(decoder(x))`` (no softcapping / logit scaling); FSDP2 included
    (:func:`_head_logprobs`)."""
    from rexrag.sharding import is_ddp_module

    model = model.module if is_ddp_module(model) else model
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    return callable(getattr(model, "get_decoder", None)) and model.get_output_embeddings() is not None


def _chunked_head(model, input_ids: Tensor, src: Tensor, targets: Tensor, chunk_tokens: int, with_entropy: bool,
                  temperature: float, **forward_kwargs):
    """Decoder once, then the LM head over the hidden states at ``src`` [M] (flat positions of
    ``input_ids`` [R, W]) in slices of ``chunk_tokens``: log p(targets) [M] (and entropy [M])."""
    hidden = model.get_decoder()(input_ids=input_ids, **forward_kwargs).last_hidden_state
    flat_h, head = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src), model.get_output_embeddings()
    grad = torch.is_grad_enabled() and flat_h.requires_grad
    parts = []
    for s in range(0, max(flat_h.shape[0], 1), chunk_tokens):  # no position: one empty slice (same collectives)
        h, t = flat_h[s : s + chunk_tokens], targets[s : s + chunk_tokens]
        if grad:
            # Keep only the chunk's inputs for backward; its [N, V] logits are recomputed.
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, head, h, t, with_entropy, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(head, h, t, with_entropy, temperature))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True)) if with_entropy else torch.cat(parts)


_FSDP_HEAD = "_rexrag_chunked_head"  # the method name registered on an FSDP2 root


def _through_ddp(ddp, *args, **kwargs):
    """:func:`_chunked_head` of the module under ``ddp``, called through DDP's own ``__call__``: DDP prepares
    its reducer for the backward in its forward, so calling the decoder and head directly would leave the
    gradient all-reduce unprepared. The inner module's ``forward`` is the chunked head for this one call."""
    inner = ddp.module
    inner.forward = types.MethodType(_chunked_head, inner)  # an instance attribute shadows the class's forward
    try:
        return ddp(*args, **kwargs)
    finally:
        del inner.forward


def _head_logprobs(model, *args, **kwargs):
    """:func:`_chunked_head` of ``model``. Under DDP it runs as the wrapper's forward (:func:`_through_ddp`).
    An FSDP2 root runs it as a forward (``register_fsdp_forward_method``):
    its unit (embeddings, norm, head: shards outside a forward) is gathered around it, re-gathered in its
    backward (the head slices recomputed there too) and its gradients reduce-scattered."""
    from rexrag.sharding import is_ddp_module, is_fsdp_module

    if is_ddp_module(model):
        return _through_ddp(model, *args, **kwargs)
    if not is_fsdp_module(model):
        return _chunked_head(model, *args, **kwargs)
    if _FSDP_HEAD not in model.__dict__:
        from torch.distributed.fsdp import register_fsdp_forward_method

        model.__dict__[_FSDP_HEAD] = types.MethodType(_chunked_head, model)
        register_fsdp_forward_method(model, _FSDP_HEAD)
    return getattr(model, _FSDP_HEAD)(*args, **kwargs)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_tokens: int = 512,
                      with_entropy: bool = False, temperature: float = 1.0, pack: bool = False):
    """Per-token log-probs of the given tokens under ``model`` (the one log-prob function).

    input_ids, attention_mask: [B, T] (right or left padding; 1 = real token).
    Returns [B, T] float32 with ``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``,
    ``out[:, 0] = 0`` and 0 wherever ``attention_mask`` is 0. Position ids follow the mask
    (:func:`position_ids`). Differentiable when grad is enabled.

    With ``with_entropy`` returns ``(logprobs, entropy)``, entropy [B, T] float32 the entropy of the
    distribution that predicted token t (same zeros), computed per chunk from the same logits; the
    log-probs are bitwise the ones returned without it.

    ``temperature``: the sampling temperature of the rollouts; logits are divided by it (as verl does)
    so the ratio compares the policy that sampled the tokens. 1.0 leaves the logits untouched.

    ``pack``: padding-free, the rows run as one sequence of their real tokens (``rexrag.packing``); the
    same [B, T] comes back (the padded result within float tolerance, not bitwise).
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, T]")
    B, T = input_ids.shape
    mask = attention_mask.long()
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    if T < 2:
        return (out, out.clone()) if with_entropy else out
    if pack:
        return _packed_logprobs(model, input_ids, mask, out, chunk_tokens, with_entropy, temperature)
    pos = position_ids(mask)
    targets = input_ids[:, 1:]
    if not _has_plain_head(model):
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, :-1]
        res = _chunk_logprobs(lambda x: x, logits, targets, with_entropy, temperature)
    else:
        src = torch.arange(B * T, device=input_ids.device).view(B, T)[:, :-1].reshape(-1)  # every position but the last
        res = _head_logprobs(model, input_ids, src, targets.reshape(-1), chunk_tokens, with_entropy, temperature,
                             attention_mask=mask, position_ids=pos, use_cache=False)
        res = tuple(r.view(B, T - 1) for r in res) if with_entropy else res.view(B, T - 1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()  # target real and context non-empty

    def _pad(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :1], torch.where(valid, x, torch.zeros_like(x))], dim=1)

    return (_pad(res[0]), _pad(res[1])) if with_entropy else _pad(res)


def _packed_logprobs(model, input_ids: Tensor, mask: Tensor, out: Tensor, chunk_tokens: int, with_entropy: bool,
                     temperature: float):
    """``sequence_logprobs(..., pack=True)``: [B, T] in, [B, T] out (``out`` the zeros to fill)."""
    from rexrag.packing import pack, varlen_forward_kwargs

    p = pack(input_ids, mask)
    targets, kw = input_ids.reshape(-1)[p.dest], varlen_forward_kwargs(model, p)
    if _has_plain_head(model):
        res = _head_logprobs(model, p.input_ids, p.src, targets, chunk_tokens, with_entropy, temperature, **kw)
    else:
        logits = model(input_ids=p.input_ids, **kw).logits[0].index_select(0, p.src)
        res = _chunk_logprobs(lambda x: x, logits, targets, with_entropy, temperature)

    def _unpack(x: Tensor) -> Tensor:
        return out.reshape(-1).index_put((p.dest,), x.float()).view_as(out)

    return (_unpack(res[0]), _unpack(res[1])) if with_entropy else _unpack(res)
