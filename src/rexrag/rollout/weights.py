"""The policy's weights on their way into a generation engine, and the GPU share such an engine may take.

:func:`stream_weights` is what every weight sync feeds to vLLM's in-place loader: a generator, one
tensor materialised at a time (FSDP shards gathered tensor by tensor, in the same order on every
process), cast to the engine's dtype, LoRA merged out of place. :func:`engine_memory_fraction` sizes a
colocated engine from what the trainer holds and has yet to allocate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor

from rexrag.errors import UserError

_LORA_PREFIX = "base_model.model."


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor shard (an all-gather: every process must call it in the same
    order), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _lora_layers(model) -> dict[str, object]:
    """State-dict key of each LoRA-adapted base weight -> its PEFT LoRA layer (empty without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": mod for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and hasattr(mod, "base_layer")}


def lora_delta(layer) -> Tensor:
    """``sum_a scaling_a * B_a @ A_a`` over the layer's active adapters, fp32, out of place
    ([out, in], transposed for ``fan_in_fan_out`` layers): the merged weight is ``W + delta`` and ``W``
    is never written (PEFT's merge/unmerge round trip adds rounding drift to the frozen base)."""
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = _full(layer.lora_A[name].weight.detach()).float(), _full(layer.lora_B[name].weight.detach()).float()
        d = (b @ a) * layer.scaling[name]
        d = d.T if getattr(layer, "fan_in_fan_out", False) else d
        delta = d if delta is None else delta + d
    return delta


def stream_weights(model, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """``(hf_name, tensor)`` pairs of ``model``'s weights in ``dtype``, one tensor materialised at a time.

    ``model`` is the unwrapped policy (plain, PEFT-wrapped or FSDP2-sharded). A DTensor shard is cast
    to ``dtype`` before it is gathered (half the bytes for bf16), so at most one full tensor (plus the
    loader's own copy) is resident; the order is the state dict's, identical on every process. LoRA
    adapters are merged out of place (:func:`lora_delta`) and their factors are not sent."""
    lora = _lora_layers(model)
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        t = t.detach()
        layer = lora.get(name)
        if layer is not None:
            delta = lora_delta(layer)
            t = _full(t).float() + delta if delta is not None else _full(t)
            out = t.to(dtype)
        else:
            out = _full(t.to(dtype))
        yield name.removeprefix(_LORA_PREFIX).replace(".base_layer.", "."), out


# --------------------------------------------------------------------------- GPU memory


def engine_memory_fraction(free: int, total: int, trainable_bytes: int, sleep_level: int,
                           activation_share: float = 0.15) -> float:
    """Share of the GPU a colocated vLLM engine may take when it starts (``gpu_memory_utilization``).

    Started after the policy, reference and critic are placed, the engine sees them in ``free``; what
    the trainer has yet to allocate is reserved: AdamW's two moments (``2 * trainable_bytes``, created
    at the first step) always; with the engine awake through the update (``sleep_level == 0``) also the
    gradients (``trainable_bytes``) and ``activation_share`` of the GPU for activations. Asleep, the
    engine hands its memory back for the update, so only what outlives it is reserved."""
    reserve = 2 * trainable_bytes
    if sleep_level == 0:
        reserve += trainable_bytes + int(activation_share * total)
    return max(0.0, (free - reserve) / total)


def auto_gpu_memory_utilization(model, sleep_level: int, minimum: float = 0.05) -> float:
    """:func:`engine_memory_fraction` on this process's GPU (1.0 off CUDA, where vLLM ignores it). Too
    little left is a ``UserError`` naming the setting and the rank."""
    if not torch.cuda.is_available():
        return 1.0
    free, total = torch.cuda.mem_get_info()
    trainable = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
    frac = engine_memory_fraction(free, total, trainable, sleep_level)
    if frac < minimum:
        raise UserError(f"rank {os.environ.get('RANK', '0')}: only {frac:.1%} of the GPU is left for the vLLM engine "
                        f"beside the trainer ({free / 2**30:.1f} GiB free of {total / 2**30:.1f}, "
                        f"{3 * trainable / 2**30:.1f} GiB reserved for optimizer state and gradients); lower "
                        "trainer memory (LoRA, FSDP across more GPUs), set rollout.vllm_sleep_level=2, or set "
                        "rollout.vllm_gpu_memory_utilization explicitly")
    return frac


def _local_bytes(t: Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


