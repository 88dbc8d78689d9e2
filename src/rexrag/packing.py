"""Padding-free forwards: a micro-batch's rows packed into one sequence, attention kept within each row.

Shapes: b rows of a micro-batch laid out [b, w] (right or left padding, 1 = real token in the mask),
N = their real tokens, M = the tokens that get a log-prob (each row's tokens after its first).

:func:`pack` turns [b, w] into one row [1, N] of the real tokens, with ``position_ids`` restarting at 0
for every row and ``cu_seqlens`` [b' + 1] marking where each non-empty row starts (FlashAttention's
varlen convention). Nothing is computed for padding. Attention must not cross rows; which kernel keeps
it inside them depends on the model's attention implementation (:func:`varlen_forward_kwargs`):

* ``flash_attention_2`` (CUDA with ``flash-attn``): transformers calls ``flash_attn_varlen_func`` with the
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` passed to the decoder. Written against that documented API;
  it has **never run** on the machines this was built on (no GPU, no flash-attn).
* ``sdpa`` (the default everywhere else): the model is switched to :data:`VARLEN_SDPA`, registered in
  transformers' attention and mask registries. Given ``cu_seq_lens_q`` it runs sdpa once per row (causal);
  without it, it *is* sdpa (same masks, same kernel), so padded forwards (generation, the value model)
  are unchanged by the switch. Attention then costs sum(L_i^2) per layer.
* anything else (``eager``, ...): no ``cu_seqlens``; with no attention mask and ``position_ids`` that
  restart, transformers' masking utilities (``find_packed_sequence_indices``, transformers 5) build a
  block-diagonal causal [N, N] mask. Exact, but attention then costs N^2 and the mask N^2 bytes.

Why not always the mask: on a 2-core CPU, 8 rows of 250..1800 tokens (N = 6,050) through 4 SmolLM2
layers, forward + backward, took 63-71 s with the mask against 25-31 s per row (80-96 s padded; a
busy machine, load ~4.9: an order of magnitude, not a measurement). The mask path needs
``use_cache=False`` (with a cache transformers skips the packed-sequence detection and attends across
rows without a word); :func:`varlen_forward_kwargs` always sets it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

VARLEN_SDPA = "rexrag_varlen_sdpa"
FLASH = "flash_attention_2"


@dataclass
class Packed:
    """A micro-batch's rows as one sequence.

    input_ids     [1, N]  the real tokens, row after row
    position_ids  [1, N]  0..L_i-1 within each row
    cu_seqlens    [b'+1]  int32 start of each non-empty row, then N
    max_len       int     the longest row
    src           [M]     packed index of each token that predicts the next one in its row
    dest          [M]     flat slot (row * w + column) in [b, w] of the predicted token
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_len: int
    src: Tensor
    dest: Tensor

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(input_ids: Tensor, attention_mask: Tensor) -> Packed:
    """[b, w] ids and mask -> :class:`Packed`. A token gets a log-prob slot when it and the token before it
    are real (as :func:`rexrag.models.sequence_logprobs` defines it for padded rows)."""
    mask = attention_mask.bool()
    b, w = mask.shape
    lengths = mask.sum(-1)
    slots = mask.reshape(-1).nonzero().squeeze(-1)  # [N] flat slot of each real token, row-major
    n = slots.numel()
    starts = lengths.cumsum(0) - lengths
    pos = torch.arange(n, device=mask.device) - torch.repeat_interleave(starts, lengths)
    kept = lengths[lengths > 0]
    cu = F.pad(kept.cumsum(0), (1, 0)).to(torch.int32)
    index = torch.full((b * w,), -1, dtype=torch.long, device=mask.device)
    index[slots] = torch.arange(n, device=mask.device)
    pairs = (mask[:, 1:] & mask[:, :-1]).nonzero()  # (row, column of the predicting token)
    prev = pairs[:, 0] * w + pairs[:, 1]
    return Packed(input_ids=input_ids.reshape(-1)[slots].unsqueeze(0), position_ids=pos.unsqueeze(0), cu_seqlens=cu,
                  max_len=int(kept.max()) if kept.numel() else 0, src=index[prev], dest=prev + 1)


def config_of(model):
    """The transformers config of ``model`` through DDP / peft wrappers (None when it has none)."""
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "module"):
        cfg = getattr(model.module, "config", None)
    return cfg


def _sliding(cfg) -> bool:
    """True when some layer attends in a sliding window (the per-row sdpa has no window)."""
    types = getattr(cfg, "layer_types", None) or []
    return bool(getattr(cfg, "sliding_window", None)) and (not types or "sliding_attention" in types)


def varlen_forward_kwargs(model, packed: Packed) -> dict:
    """The decoder keyword arguments of a packed forward of ``model`` (see the module docstring).

    An ``sdpa`` model (without sliding-window layers) is switched to :data:`VARLEN_SDPA` here, once: a
    change that leaves its padded forwards as they were. The all-ones mask lets transformers skip building
    a causal mask (sdpa) and keeps ``flash_attention_2`` on its varlen branch; the kernels read the rows
    from ``cu_seq_lens_q``."""
    register()
    cfg = config_of(model)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl == "sdpa" and not _sliding(cfg):
        cfg._attn_implementation = impl = VARLEN_SDPA
    kw = {"position_ids": packed.position_ids, "use_cache": False}
    if impl not in (VARLEN_SDPA, FLASH):
        return {**kw, "attention_mask": None}  # transformers' block-diagonal mask from the position ids
    cu = packed.cu_seqlens
    return {**kw, "attention_mask": torch.ones_like(packed.input_ids), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": packed.max_len, "max_length_k": packed.max_len}


def varlen_sdpa_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, cu_seq_lens_q: Tensor | None = None, **kwargs):
    """transformers attention function: query [1, H, N, D], key/value [1, Hkv, N, D] -> ([1, N, H, D], None).
    With ``cu_seq_lens_q`` causal sdpa within each row (the mask is ignored: rows are the mask); without it
    transformers' sdpa as is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1 or getattr(module, "sliding_window", None):
        raise ValueError("packed attention takes one packed row [1, N] and no sliding window")
    bounds = cu_seq_lens_q.tolist()
    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, dropout=dropout,
                                   scaling=scaling, is_causal=True)[0] for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=1), None


def register() -> None:
    """Register :data:`VARLEN_SDPA` with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if VARLEN_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


# --------------------------------------------------------------------------- choosing the kernel


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(setting: str, device, compute_dtype: torch.dtype) -> str | None:
    """The ``attn_implementation`` to load a model with: ``auto`` -> flash_attention_2 on CUDA when flash-attn
    is installed and the forward computes in bf16/fp16 (FlashAttention has no fp32 kernel), else None
    (transformers' default, sdpa). ``model.attn_implementation`` refuses flash_attention_2 without flash-attn
    (``rexrag.config.ModelConfig``, before any model loads)."""
    if setting != "auto":
        return setting
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    return FLASH if cuda and flash_attn_installed() and compute_dtype in (torch.bfloat16, torch.float16) else None
