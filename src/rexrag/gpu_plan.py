"""GPU memory a colocated run needs, phase by phase, and the vLLM engine share that fits (``rexrag train --plan``).

The GPU sibling of :mod:`rexrag.memory_plan` (host memory of a CPU run). :func:`plan_gpu` is one pure function:
for a model :class:`Shape`, a :class:`Layout` (GPUs, memory of one, FSDP2 full shard or DDP) and a :class:`Run`
(what the config fixes) it says what each GPU holds in each phase of an RL step and the engine share
(``rollout.vllm_gpu_memory_utilization``) that fits beside the trainer. The phases, in step order:

- ``load``: every process loads the whole policy (and the critic's and the reference's copies) before
  ``accelerate`` shards it (``rexrag.train.build``); the cache is emptied before the engine measures.
- ``weight sync``: the engine's weights woken, its KV cache still asleep, one gathered tensor in flight.
- ``rollout``: the engine awake with its whole share (weights, KV cache, workspace).
- ``probe scoring`` (REX-RAG): the engine still awake while the policy scores the probe candidates in
  micro-batches of ``rex.score_micro_batch_size`` rows (``Trainer.score_fn``); this phase is why that
  setting exists: the scoring forward is planned beside the share instead of growing into its KV cache.
- ``log-probs``, ``update``, ``optimizer step``: the engine asleep (``rollout.vllm_sleep_level`` 1 or 2)
  holding only its CUDA graphs; at level 0 it keeps its share throughout.

Resident in every phase: the policy's shard (all of it under DDP), the reference in bf16, the critic
(``gae``), AdamW's moments (policy and critic), DDP's gradient buckets, the CUDA context, NCCL's buffers
and allocator slack. Activations of one decoder layer are taken as ``(24 h + 8 i)`` bytes a token in bf16
(with gradients; ``16 h + 6 i`` without), checkpoints as one residual row a layer a token in the dtype
the layers compute in (bf16 under FSDP2's mixed precision, ``model.fsdp_mixed_precision``; else the
weights'); this formula gives 0.09 MiB a token for SmolLM2-135M with fp32 gradient checkpointing, where
the CPU plan measured 0.095. FSDP2 keeps the root unit (embedding, head) and two layers gathered in a
forward, and a layer's and the root's gradients unsharded in fp32 before their reduce-scatter. The LM
head holds 18 bytes x vocabulary a token of its slice with gradients (measured, :mod:`rexrag.memory_plan`),
12 for a whole micro-batch's logits and 10 without gradients. Overheads (CUDA context, NCCL, engine
workspace and CUDA graphs) are estimates that ``bench/gpu_smoke.py`` logs measured free memory beside.
Everything here is an estimate, never run on the 8-GPU recipes; a derived share leaves ``SHARE_MARGIN``
of the GPU free for that reason.

How vLLM reads the share (the reading used here; checked against vLLM's V1 GPU worker as public sources show
it, ``Worker.init_device`` / ``determine_available_memory`` and ``vllm/v1/worker/utils.py:request_memory``,
and the API docs of ``vllm.utils.mem_utils`` up to 0.29; rexrag pins 0.32): ``gpu_memory_utilization``
is the budget of THIS engine instance as a share of the card's TOTAL memory. At start vLLM requires
``free >= ceil(util x total)`` and fails otherwise; its weights, the activation peak of a profiling
forward and its non-torch memory come out of that budget and the KV cache gets the rest. Memory other
users of the GPU hold (here: the trainer in the same process) is NOT part of the budget; CUDA graphs are
captured after the KV cache is sized and are counted here outside the share. So the share that fits is
``(total - what the trainer holds beside the awake engine) / total``, and at engine start the trainer's
memory still to come (AdamW's moments, the probe-scoring forward, the update at sleep level 0) is kept
back from the measured free memory (:func:`rexrag.rollout.weights.engine_gpu_share`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from rexrag.errors import ConfigError, UserError

MIB, GIB = 2**20, 2**30


def total(parts: dict[str, int]) -> int:
    """The bytes of a phase's parts (as the CPU plan adds them; not imported from it: memory_plan
    reaches the generation backends, which size their GPU share from this module)."""
    return sum(parts.values())

# Overheads (estimates until bench/gpu_smoke.py measures them on a lent GPU).
CUDA_CONTEXT = 600 * MIB  # CUDA context, cuBLAS/cuDNN handles
NCCL_BUFFERS = GIB  # one NCCL communicator over 8 GPUs (several processes only)
ALLOCATOR_SLACK, SLACK_SHARE = GIB, 0.10  # fragments: 1 GiB + 10 % of a phase's transient tensors
ENGINE_WORKSPACE = 512 * MIB  # vLLM's non-torch memory and attention workspace, inside its share
ENGINE_GRAPHS = GIB  # CUDA graphs, captured after the KV cache is sized: outside the share, kept asleep
# max_num_seqs when the rows a process generates are unknown, and the least profiled batch (rexrag.rollout.vllm_backend)
ENGINE_SEQS, ENGINE_BATCHED_TOKENS = 256, 8192
HF_ROWS = 64  # rows the HF loop generates at once (rexrag.rollout.backends default)
HEAD_BYTES = {"slice": 18, "whole": 12, "no_grad": 10}  # bytes x vocabulary a token of LM-head logits
# Whether models.sequence_logprobs slices the LM head under FSDP2 as it does elsewhere (tests/test_gpu_plan.py
# checks this against rexrag.models); False would count a micro-batch's whole logits there.
FSDP_HEAD_CHUNKED = True
SHARE_STEP = 0.001  # the derived share is floored to this
SHARE_MARGIN = 0.02  # of the GPU, left free beside the largest awake phase by a derived share (the plan estimates)


class GpuPlanError(UserError):
    """A setting whose memory cannot fit a phase of the run on its GPUs (one line, the numbers in it)."""


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Shape:
    """What GPU memory depends on in a Llama/Qwen2-style decoder (fields as in its ``config.json``)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_word_embeddings: bool
    head_dim: int = 0  # 0: hidden // heads
    attention_bias: bool = False  # q/k/v biases (Qwen2: yes)

    hd = property(lambda self: self.head_dim or self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.hd, self.kv_heads * self.hd
        bias = (q + 2 * kv) if self.attention_bias else 0
        return h * q + 2 * h * kv + bias + q * h + 3 * h * self.intermediate + 2 * h

    embedding_params = property(lambda self: self.vocab * self.hidden)

    @property
    def params(self) -> int:
        return self.embedding_params * (1 if self.tie_word_embeddings else 2) + self.layers * self.layer_params + self.hidden

    @property
    def root_params(self) -> int:
        """Embedding, final norm and (untied) head: the root FSDP unit, gathered for a whole forward."""
        return self.params - self.layers * self.layer_params

    @property
    def decoder_params(self) -> int:
        """The critic's copy: the decoder without an untied output head."""
        return self.params - (0 if self.tie_word_embeddings else self.embedding_params)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.hd * dtype_bytes

    def layer_activation_bytes(self, grad: bool) -> int:
        """Bytes a token that one decoder layer holds in bf16: saved for backward, or live without gradients."""
        return 24 * self.hidden + 8 * self.intermediate if grad else 16 * self.hidden + 6 * self.intermediate

    @classmethod
    def from_config(cls, config) -> "Shape":
        """From a ``config.json`` mapping or a transformers config (a ``KeyError`` names what is missing)."""
        def get(key, default=KeyError):
            value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
            if value is None and default is KeyError:
                raise KeyError(f"the model's config has no {key!r}")
            return default if value is None else value

        heads = get("num_attention_heads")
        return cls(layers=get("num_hidden_layers"), hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   heads=heads, kv_heads=get("num_key_value_heads", heads), vocab=get("vocab_size"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)), head_dim=get("head_dim", 0),
                   attention_bias=bool(get("attention_bias", get("model_type", "") == "qwen2")))


def _qwen25(layers, hidden, intermediate, heads, kv_heads, vocab=151_936, tied=True) -> Shape:
    return Shape(layers, hidden, intermediate, heads, kv_heads, vocab, tied, attention_bias=True)


# The models our recipes name, as their config.json on the Hugging Face hub gives them (Qwen/Qwen2.5-*,
# base and -Instruct alike); their parameter counts match the published ones (tests/test_gpu_plan.py).
KNOWN_SHAPES = {
    "qwen2.5-0.5b": _qwen25(24, 896, 4864, 14, 2),
    "qwen2.5-1.5b": _qwen25(28, 1536, 8960, 12, 2),
    "qwen2.5-3b": _qwen25(36, 2048, 11008, 16, 2),
    "qwen2.5-7b": _qwen25(28, 3584, 18944, 28, 4, vocab=152_064, tied=False),
}


def find_shape(name_or_path: str, download: bool = False) -> tuple[Shape, str]:
    """(shape, where it came from): a local ``config.json``, the Hugging Face cache, the table of known
    shapes, or (``download``: at training time, when the weights are fetched anyway) the hub."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return Shape.from_config(json.loads((path / "config.json").read_text())), str(path / "config.json")
    key = name_or_path.rstrip("/").split("/")[-1].lower().removesuffix("-instruct")
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key], f"the published config.json of {name_or_path} (rexrag.gpu_plan.KNOWN_SHAPES)"
    try:
        from transformers import AutoConfig

        return Shape.from_config(AutoConfig.from_pretrained(name_or_path, local_files_only=True)), "the HF cache"
    except Exception:  # noqa: BLE001 - not cached: below
        pass
    from rexrag.models import BUILTIN_MODELS, model_config

    if download or name_or_path.lower() in BUILTIN_MODELS:
        return Shape.from_config(model_config(name_or_path)), "its transformers config"
    raise UserError(f"model.name_or_path={name_or_path!r}: no config.json at hand to plan GPU memory from (not a local "
                    f"directory, not in the HF cache); known shapes: {sorted(KNOWN_SHAPES)} (base and -instruct)")


# --------------------------------------------------------------------------- what the run fixes


@dataclass(frozen=True)
class Layout:
    """Processes (one a GPU), the memory of one GPU, and how the policy is spread over them."""

    gpus: int
    gpu_bytes: int
    sharding: str = "fsdp"  # fsdp (FSDP2 full shard) | ddp

    @property
    def fsdp(self) -> bool:
        return self.sharding == "fsdp" and self.gpus > 1


@dataclass(frozen=True)
class Run:
    """What the configuration fixes for GPU memory (:func:`run_from_config` reads it from a ``Config``)."""

    shape: Shape
    param_bytes: int = 4  # model.dtype: master weights, gradients, residual stream under autocast
    act_bytes: int = 2  # activations: bf16 autocast / weights (2) or fp32 (4)
    gather_bytes: int = 4  # FSDP2 gathers and computes in this (model.fsdp_mixed_precision; bf16: 2)
    lora_params: int = 0  # trained adapter parameters; 0 trains every parameter
    reference: bool = True  # frozen bf16 copy (algo.kl_coef > 0 without LoRA)
    critic: bool = False  # algo.adv_estimator == gae
    moment_bytes: int = 8  # AdamW's two moments a trained parameter (bf16 moments: 4)
    gradient_checkpointing: bool = True
    max_tokens: int = 4608  # rollout.max_total_tokens
    micro_tokens: int = 8 * 4608  # tokens per forward/backward, worst case
    head_chunk: int = 512  # trainer.logprob_chunk_tokens
    score_tokens: int = 0  # tokens per probe-scoring forward (0: REX-RAG off)
    backend: str = "vllm"  # vllm | hf
    sleep_level: int = 2
    share: float = 0.0  # rollout.vllm_gpu_memory_utilization (0: derived)
    cuda_graphs: bool = True
    step_rows: int = 0  # rows one process generates in a step (for the summary)

    @property
    def trained(self) -> int:
        return self.lora_params or self.shape.params


@dataclass
class GpuPlan:
    """Bytes per part in each phase on one GPU, the engine's share and KV cache, and the first problem."""

    run: Run
    layout: Layout
    phases: dict[str, dict[str, int]]
    share: float | None  # None without a vLLM engine
    kv_tokens: int = 0
    reserve_after_start: int = 0  # what the trainer allocates after the engine starts (kept back at start)
    problem: str | None = None

    def check(self) -> "GpuPlan":
        if self.problem:
            raise GpuPlanError(self.problem)
        return self


def describe(parts: dict[str, int]) -> str:
    """'policy weights 1.4 + ... = 30.2 GiB' (parts of 0.05 GiB and more)."""
    shown = [f"{k} {v / GIB:.1f}" for k, v in parts.items() if v >= GIB / 20]
    return " + ".join(shown) + f" = {total(parts) / GIB:.1f} GiB"


def _sharded(x: int, layout: Layout) -> int:
    return x // layout.gpus if layout.fsdp else x


def engine_parts(run: Run) -> dict[str, int]:
    """What vLLM's share holds before its KV cache: weights, profiled activations, workspace (bf16)."""
    s = run.shape
    batched = max(run.max_tokens, ENGINE_BATCHED_TOKENS)  # the profiling forward; fp32 logits of max_num_seqs rows
    act = batched * s.layer_activation_bytes(grad=False) + (run.step_rows or ENGINE_SEQS) * s.vocab * 12
    return {"weights": 2 * s.params, "activations": act, "workspace": ENGINE_WORKSPACE}


def engine_minimum(run: Run) -> int:
    """The least share vLLM starts with: its weights, activations, workspace and one full-length row of KV cache."""
    return total(engine_parts(run)) + run.max_tokens * run.shape.kv_bytes_per_token()


def _residents(run: Run, layout: Layout) -> dict[str, int]:
    s, pb, w = run.shape, run.param_bytes, layout.gpus
    critic = s.decoder_params + s.hidden + 1 if run.critic else 0
    trained = run.trained + critic
    return {"CUDA context": CUDA_CONTEXT, "NCCL buffers": NCCL_BUFFERS if w > 1 else 0,
            "policy weights": _sharded(s.params * pb + (run.lora_params * 4 if run.lora_params else 0), layout),
            "reference (bf16)": _sharded(2 * s.params, layout) if run.reference and not run.lora_params else 0,
            "critic weights": _sharded(critic * pb, layout),
            "DDP gradient buckets": trained * pb if w > 1 and not layout.fsdp else 0,
            "optimizer moments": _sharded(trained * run.moment_bytes, layout)}


def _forward(run: Run, layout: Layout, tokens: int, grad: bool) -> dict[str, int]:
    """Transient tensors of one forward (``grad``: and backward) over ``tokens`` tokens of the policy (and critic)."""
    s, pb, scale = run.shape, run.param_bytes, run.act_bytes / 2
    residual = run.gather_bytes if layout.fsdp else pb  # the residual stream's dtype: the weights' as computed
    layer = int(tokens * s.layer_activation_bytes(grad) * scale)
    if grad and run.gradient_checkpointing:
        acts = s.layers * tokens * s.hidden * residual + layer
    elif grad:
        acts = s.layers * layer
    else:
        acts = layer + tokens * s.hidden * residual  # one layer live, plus the decoder's output for the head
    chunked = run.head_chunk and (FSDP_HEAD_CHUNKED or not layout.fsdp)
    head_tokens = min(run.head_chunk, tokens) if chunked else tokens
    head = HEAD_BYTES["no_grad" if not grad else "slice" if chunked else "whole"] * s.vocab * head_tokens
    out = {"activations": acts * (2 if grad and run.critic else 1), "LM-head logits": head}
    if layout.fsdp:  # the root unit stays gathered for the forward, two layers in flight (prefetch); gradients
        # of the root and of one layer unsharded in float32 before their reduce-scatter
        units = s.root_params + 2 * s.layer_params + (s.embedding_params if grad and run.critic else 0)
        out["FSDP gathered weights"] = units * run.gather_bytes + ((s.root_params + s.layer_params) * 4 if grad else 0)
    if grad:
        out["gradients"] = _sharded((run.trained + (s.decoder_params if run.critic else 0)) * pb, layout)
    return out


def _phase(residents: dict[str, int], engine: dict[str, int], transient: dict[str, int]) -> dict[str, int]:
    """A phase's parts; the allocator's slack grows with the trainer's transient tensors (the engine's
    memory is vLLM's own pool)."""
    return {**residents, **engine, **transient, "allocator slack": ALLOCATOR_SLACK + int(SLACK_SHARE * total(transient))}


def phases(run: Run, layout: Layout, share_bytes: int) -> dict[str, dict[str, int]]:
    """Bytes per part in each phase on one GPU, with the vLLM engine holding ``share_bytes`` while awake."""
    s, res, vllm, actor = run.shape, _residents(run, layout), run.backend == "vllm", replace(run, critic=False)
    pb = run.param_bytes
    out = {"load": {"CUDA context": CUDA_CONTEXT, "policy (whole)": s.params * pb,
                    "critic (whole)": s.decoder_params * pb if run.critic else 0,
                    "reference copy": s.params * pb if run.reference and not run.lora_params else 0}}
    graphs = {"engine CUDA graphs": ENGINE_GRAPHS if vllm and run.cuda_graphs else 0}
    awake = {"engine share (awake)": share_bytes, **graphs}
    if vllm:
        eng = engine_parts(run)  # asleep: weights woken first (the KV cache after the sync), the workspace kept
        held = ({"engine share (awake)": share_bytes} if run.sleep_level == 0 else
                {"engine weights": eng["weights"] + eng["workspace"]})
        stream = 2 * s.embedding_params * 2  # the largest tensor gathered in bf16, and the engine's copy of it
        out["weight sync"] = _phase(res, {**held, **graphs}, {"weight stream": stream})
        out["rollout"] = _phase(res, awake, {})
    else:  # the HF loop: the policy gathered whole under FSDP (rollout.fsdp_gather_for_rollout), its KV cache, a prefill
        full = s.params * pb - _sharded(s.params * pb, layout) if layout.fsdp else 0
        prefill = _forward(actor, replace(layout, gpus=1), HF_ROWS * run.max_tokens, grad=False)["activations"]
        awake = {"HF gathered weights": full}
        out["rollout"] = _phase(res, awake, {"HF KV cache": HF_ROWS * run.max_tokens * s.kv_bytes_per_token(),
                                             "activations": prefill})
    if run.score_tokens:
        score = _forward(actor, layout, run.score_tokens, grad=False)
        if not vllm:
            score.pop("FSDP gathered weights", None)  # the HF loop keeps the policy gathered whole meanwhile
        out["probe scoring"] = _phase(res, awake, score)
    asleep = (({"engine share (awake)": share_bytes} if run.sleep_level == 0 else {}) | graphs) if vllm else {}
    out["log-probs"] = _phase(res, asleep, _forward(actor, layout, run.micro_tokens, grad=False))
    out["update"] = _phase(res, asleep, _forward(run, layout, run.micro_tokens, grad=True))
    grads = _forward(run, layout, 1, grad=True)["gradients"]
    out["optimizer step"] = _phase(res, asleep, {"gradients": grads, "AdamW temporaries": grads * 4 // pb})
    return {name: {k: v for k, v in parts.items() if v} for name, parts in out.items()}


def _holds_share(run: Run, name: str) -> bool:
    return run.backend == "vllm" and (name in ("rollout", "probe scoring") or (run.sleep_level == 0 and name != "load"))


def plan_gpu(run: Run, layout: Layout) -> GpuPlan:
    """The plan for ``run`` on ``layout`` (pure: no GPU touched). The derived share is the largest that fits
    every phase where the engine is awake, less ``SHARE_MARGIN`` (floored to ``SHARE_STEP``); ``problem``
    names the first phase that cannot fit, the setting to change and the numbers."""
    gpu = layout.gpu_bytes
    bare = phases(run, layout, 0)
    share = None
    if run.backend == "vllm":
        others = {name: total(p) for name, p in bare.items() if _holds_share(run, name)}
        room = gpu * (1 - SHARE_MARGIN) - max(others.values())
        share = run.share or max(0.0, math.floor(room / gpu / SHARE_STEP) * SHARE_STEP)
    share_bytes = int((share or 0.0) * gpu)
    plan = GpuPlan(run, layout, phases(run, layout, share_bytes), share)
    if share is not None:
        plan.kv_tokens = max(0, share_bytes - total(engine_parts(run))) // run.shape.kv_bytes_per_token()
        start = {k: v for k, v in _residents(run, layout).items() if k != "optimizer moments"}
        plan.reserve_after_start = max(others.values()) - total(start)
    plan.problem = _problem(plan, bare)
    return plan


def _fits_at(run: Run, layout: Layout, phase: str, knob: str) -> str:
    """' (fits at rex.score_micro_batch_size=2)': the most rows of ``knob`` at which ``phase`` fits, if any."""
    field_name = "score_tokens" if knob == "rex.score_micro_batch_size" else "micro_tokens"
    rows = getattr(run, field_name) // run.max_tokens
    for n in range(rows - 1, 0, -1):
        trial = replace(run, **{field_name: n * run.max_tokens})
        bare = phases(trial, layout, 0)
        if _holds_share(run, phase):
            other = max(total(p) for name, p in bare.items() if _holds_share(run, name))
            if layout.gpu_bytes * (1 - SHARE_MARGIN) - other >= engine_minimum(run):
                return f" (fits at {knob}={n})"
        elif total(bare[phase]) <= layout.gpu_bytes:
            return f" (fits at {knob}={n})"
    return ""


def _problem(plan: GpuPlan, bare: dict[str, dict[str, int]]) -> str | None:
    """The first phase that does not fit, as one line naming the setting to change and the numbers."""
    run, lay, gpu = plan.run, plan.layout, plan.layout.gpu_bytes
    of = f"> {gpu / GIB:.1f} GiB of the GPU"
    micro = "lower trainer.micro_batch_size (or trainer.micro_batch_tokens)" + (
        "" if run.gradient_checkpointing else ", or set model.gradient_checkpointing=true")
    hints = {"load": "every process loads the whole model before sharding; set model.lora_rank > 0, algo.kl_coef=0, "
                     "or use a smaller model",
             "weight sync": "the engine's weights do not fit beside the trainer's; shard over more GPUs or set "
                            "model.lora_rank > 0",
             "rollout": f"the HF loop generates {HF_ROWS} rows at once, each with its KV cache; use rollout.backend=vllm "
                        "or a lower rollout.max_total_tokens",
             "probe scoring": "lower rex.score_micro_batch_size", "log-probs": micro, "update": micro,
             "optimizer step": "shard it (FSDP2, configs/accelerate/fsdp.yaml), use more GPUs, set "
                               "trainer.optimizer_state_dtype=bfloat16 or model.lora_rank > 0"}
    res = _residents(run, lay)
    if total(res) > gpu:
        return f"the trainer's state alone does not fit one GPU: {describe(res)} {of}; {hints['optimizer step']}"
    for name, parts in bare.items():
        if name in hints and not _holds_share(run, name) and total(parts) > gpu:
            what = ""
            if name in ("log-probs", "update"):
                what = f" (trainer.micro_batch_size: {run.micro_tokens} tokens a forward)"
                hints[name] += _fits_at(run, lay, name, "trainer.micro_batch_size")
            elif name == "probe scoring":
                what = f" (rex.score_micro_batch_size: {run.score_tokens} tokens a forward)"
                hints[name] += _fits_at(run, lay, name, "rex.score_micro_batch_size")
            return f"the {name} phase does not fit{what}: {describe(parts)} {of}; {hints[name]}"
    if plan.share is None:
        return None
    need, gpu_share = engine_minimum(run), plan.share * gpu
    over = [n for n, p in plan.phases.items() if _holds_share(run, n) and total(p) > gpu]
    if over and run.share:
        name = max(over, key=lambda n: total(plan.phases[n]))
        return (f"rollout.vllm_gpu_memory_utilization={run.share:g} does not fit the {name} phase: "
                f"{describe(plan.phases[name])} {of}; lower it, or set it to 0 to derive it from this plan")
    if gpu_share >= need:
        return None
    binding = max((n for n in bare if _holds_share(run, n)), key=lambda n: total(bare[n]))
    knob = {"probe scoring": "rex.score_micro_batch_size", "update": "trainer.micro_batch_size",
            "log-probs": "trainer.micro_batch_size"}.get(binding)
    setting = "rollout.vllm_gpu_memory_utilization" if run.share else knob or "the trainer's memory"
    return (f"{setting}: the {binding} phase leaves the vLLM engine {gpu_share / GIB:.1f} GiB ({plan.share:.3f} of "
            f"{gpu / GIB:.1f} GiB), below the {need / GIB:.1f} GiB it needs (weights, activations, workspace and one "
            f"{run.max_tokens}-token row of KV cache){_fits_at(run, lay, binding, knob) if knob and not run.share else ''}; "
            f"beside it: {describe(bare[binding])}")


# --------------------------------------------------------------------------- from a Config


def score_rows(cfg) -> int:
    """Rows per probe-scoring forward (``Trainer.score_fn``): ``rex.score_micro_batch_size``, 0 = the
    update's ``trainer.micro_batch_size``."""
    n = cfg.rex.score_micro_batch_size
    if n < 0:
        raise ConfigError(f"rex.score_micro_batch_size must be >= 0 (0 = trainer.micro_batch_size), got {n}")
    return n or cfg.trainer.micro_batch_size


def score_tokens(cfg) -> int:
    """Tokens per probe-scoring forward at most (what ``Trainer.score_fn`` and the plan both use)."""
    rows, budget, longest = score_rows(cfg), cfg.trainer.micro_batch_tokens, cfg.rollout.max_total_tokens
    return max(min(budget, rows * longest), longest) if budget else rows * longest


def lora_params(shape: Shape, rank: int, targets: list[str]) -> int:
    """Parameters of rank-``rank`` LoRA adapters on the named linear layers of every decoder layer."""
    h, q, kv, i = shape.hidden, shape.heads * shape.hd, shape.kv_heads * shape.hd, shape.intermediate
    dims = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h, "gate_proj": h + i, "up_proj": h + i,
            "down_proj": i + h}
    return shape.layers * rank * sum(dims.get(t, 0) for t in targets)


PARAM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def run_from_config(cfg, shape: Shape, gpus: int = 1) -> Run:
    """The :class:`Run` of ``rexrag train`` with ``cfg`` (``auto`` backend: vLLM, what a GPU run uses)."""
    m, r, tc = cfg.model, cfg.rollout, cfg.trainer
    if r.vllm_gpu_reserve_gb < 0 and r.vllm_gpu_reserve_gb != -1:
        raise ConfigError(f"rollout.vllm_gpu_reserve_gb must be >= 0 or -1 (from the plan), got {r.vllm_gpu_reserve_gb}")
    longest = r.max_total_tokens
    micro = max(tc.micro_batch_tokens, longest) if tc.micro_batch_tokens else tc.micro_batch_size * longest
    mixed = getattr(m, "fsdp_mixed_precision", "float32")  # auto: bf16 with autocast on a GPU (fast bf16)
    gather = 2 if mixed == "bfloat16" or (mixed == "auto" and m.autocast_bf16) else PARAM_BYTES[m.dtype]
    return Run(shape, param_bytes=PARAM_BYTES[m.dtype], act_bytes=2 if m.autocast_bf16 or m.dtype != "float32" else 4,
               gather_bytes=gather,
               lora_params=lora_params(shape, m.lora_rank, m.lora_target) if m.lora_rank else 0,
               reference=cfg.algo.kl_coef > 0 and not m.lora_rank, critic=cfg.algo.adv_estimator == "gae",
               moment_bytes=8 if tc.optimizer_state_dtype == "float32" else 4,
               gradient_checkpointing=m.gradient_checkpointing, max_tokens=longest, micro_tokens=micro,
               head_chunk=tc.logprob_chunk_tokens, score_tokens=score_tokens(cfg) if cfg.rex.enabled else 0,
               backend="hf" if r.backend == "hf" else "vllm", sleep_level=r.vllm_sleep_level,
               share=r.vllm_gpu_memory_utilization, cuda_graphs=r.vllm_enforce_eager is not True,
               step_rows=cfg.data.batch_size * r.n // max(gpus, 1))


def plan_from_config(cfg, gpus: int | None = None, gpu_memory_gb: float | None = None, sharding: str | None = None,
                     download: bool = False) -> tuple[GpuPlan, str]:
    """(the plan of ``cfg`` on this layout, where the model's shape came from). Left out: the processes
    ``accelerate`` started (``WORLD_SIZE``) or this machine's GPUs (else 1), this GPU's memory (else 80 GiB),
    FSDP2 (the 3B/7B recipes' launch) unless the launch said DDP. No model is loaded."""
    import torch

    shape, source = find_shape(cfg.model.name_or_path, download=download)
    cuda = torch.cuda.is_available()
    if gpus is None:
        gpus = int(os.environ.get("WORLD_SIZE", "0")) or (torch.cuda.device_count() if cuda else 0) or 1
    if gpu_memory_gb is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        gpu_bytes = torch.cuda.get_device_properties(local).total_memory if cuda else 80 * GIB
    elif not 0 < gpu_memory_gb < float("inf"):
        raise UserError(f"--gpu-memory-gb {gpu_memory_gb!r} is not a positive number of GiB")
    else:
        gpu_bytes = int(gpu_memory_gb * GIB)
    if sharding is None:
        launched = os.environ.get("ACCELERATE_USE_FSDP")
        sharding = "ddp" if launched is not None and launched.lower() != "true" else "fsdp"
    if gpus < 1 or sharding not in ("fsdp", "ddp"):
        raise UserError(f"--gpus {gpus} --sharding {sharding}: need at least one GPU and fsdp or ddp")
    layout = Layout(gpus, gpu_bytes, sharding)
    return plan_gpu(run_from_config(cfg, shape, gpus), layout), source


@contextlib.contextmanager
def planned_gpu_memory(cfg):
    """Around ``build_trainer``: on CUDA the plan is checked before any model loads (a setting that cannot
    fit stops with :class:`GpuPlanError`, exit 2), and a derived engine share gets the plan's reserve
    (``rollout.vllm_gpu_reserve_gb``, put back afterwards: the saved config keeps -1). Off CUDA only the
    plan's settings are checked."""
    score_rows(cfg)
    import torch

    if not torch.cuda.is_available():
        yield None
        return
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # as rexrag.sharding reads the launch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan, _ = plan_from_config(cfg, world, sharding="fsdp" if fsdp else "ddp", download=True)
    plan.check()
    saved = cfg.rollout.vllm_gpu_reserve_gb
    if plan.share is not None and saved == -1:
        cfg.rollout.vllm_gpu_reserve_gb = plan.reserve_after_start / GIB
    try:
        yield plan
    finally:
        cfg.rollout.vllm_gpu_reserve_gb = saved


# --------------------------------------------------------------------------- the table


def _gib(v: int) -> str:
    return f"{v / GIB:.1f}" if v else ""


def summary_lines(plan: GpuPlan, name: str, source: str) -> list[str]:
    s, run, lay = plan.run.shape, plan.run, plan.layout
    lines = [f"model {name}: {s.params / 1e9:.2f}B parameters, {s.layers} layers x {s.hidden} (MLP {s.intermediate}, "
             f"{s.heads}/{s.kv_heads} heads, vocabulary {s.vocab:,}, {'tied' if s.tie_word_embeddings else 'untied'} "
             f"head), shape from {source}",
             f"layout: {lay.gpus} x {lay.gpu_bytes / GIB:g} GiB, {lay.sharding.upper() if lay.gpus > 1 else 'one process'}; "
             f"{run.micro_tokens:,} tokens per update forward, "
             + (f"{run.score_tokens:,} per probe-scoring forward, " if run.score_tokens else "REX-RAG off, ")
             + f"gradient checkpointing {'on' if run.gradient_checkpointing else 'off'}, "
             + ("critic on, " if run.critic else "") + f"backend {run.backend}"
             + (f", sleep level {run.sleep_level}" if run.backend == "vllm" else "")]
    if plan.share is not None:
        rows = plan.kv_tokens // run.max_tokens
        lines.append(f"engine share (rollout.vllm_gpu_memory_utilization): {plan.share:.3f}"
                     f"{' (derived)' if not run.share else ''} = {plan.share * lay.gpu_bytes / GIB:.1f} GiB: "
                     + describe(engine_parts(run)).rsplit(" = ", 1)[0]
                     + f" + KV cache {plan.kv_tokens:,} tokens ({rows} rows of {run.max_tokens:,} at once; "
                     f"a step generates {run.step_rows} rows a GPU); kept back at engine start: "
                     f"{plan.reserve_after_start / GIB:.1f} GiB")
    return lines + (["under FSDP2 the LM head builds a micro-batch's whole logits (rexrag.models), counted as such"]
                    if lay.fsdp and not FSDP_HEAD_CHUNKED else [])


def render(plan: GpuPlan, name: str, source: str):
    """The plan as a rich table (GiB per GPU; parts as rows, phases as columns) with its summary lines."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    from rich import box

    names = list(plan.phases)
    parts = list(dict.fromkeys(k for p in plan.phases.values() for k in p))
    table = Table(title=f"GPU memory plan, GiB per GPU ({plan.layout.gpus} x {plan.layout.gpu_bytes / GIB:g} GiB): "
                        "estimates", box=box.MARKDOWN, title_justify="left")
    table.add_column("part")
    for n in names:
        table.add_column(n, justify="right")
    for part in parts:
        table.add_row(part, *(_gib(plan.phases[n].get(part, 0)) for n in names))
    totals = [total(plan.phases[n]) for n in names]
    table.add_row("total", *(f"{t / GIB:.1f}" for t in totals))
    table.add_row("free", *(f"{(plan.layout.gpu_bytes - t) / GIB:.1f}" + (" !" if t > plan.layout.gpu_bytes else "")
                            for t in totals))
    tail = Text("does not fit: see the error below" if plan.problem else "fits: every phase is within the GPU")
    return Group(*(Text(line) for line in summary_lines(plan, name, source)), table, tail)


def print_plan(plan: GpuPlan, name: str, source: str, console=None) -> None:
    from rich.console import Console

    (console or Console(width=200, soft_wrap=True)).print(render(plan, name, source))
