"""Typed configuration: one dataclass per component, loaded from YAML plus dotted overrides.

Every field is documented once, beside it (the ``doc`` metadata). ``load_config`` turns a YAML
mapping and ``key.sub=value`` strings into a validated ``Config``; an unknown key or a value of the
wrong type is a ``ConfigError`` that names the key and what is allowed. Cross-field rules live in
each dataclass's ``__post_init__`` with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rexrag.errors import ConfigError
from rexrag.protocol import DEFAULT_TOPK, INFORMATION_OPEN

OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")  # AdamW moments (rexrag.train.optim)
ASYNC_DEFAULT_STALENESS = {"sync": 0, "one_step_off": 1, "async": 2}  # rollout.mode -> its default max_staleness
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # model.attn_implementation (rexrag.packing)


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with its documentation attached (shown by ``rexrag train --help-config``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _choices(kind: str, value: str, allowed: tuple[str, ...] | list[str], hint: str = "") -> None:
    """``allowed`` comes from the module that owns the choice (a registry for extension points)."""
    if value not in allowed:
        raise ConfigError(f"{kind}={value!r} is not allowed; choose one of {list(allowed)}{hint}")


@dataclass
class ModelConfig:
    """The policy: which model, its dtype, LoRA and memory options (``model.*``)."""

    name_or_path: str = doc("Local path, hub id (needs network) or 'smollm2-135m' (offline default).", "smollm2-135m")
    dtype: str = doc("Parameter dtype: float32 | bfloat16 | float16.", "float32")
    lora_rank: int = doc("LoRA rank; 0 trains all parameters.", 0)
    lora_alpha: int = doc("LoRA alpha.", 32)
    lora_dropout: float = doc("LoRA dropout.", 0.0)
    lora_target: list[str] = doc("Module names LoRA adapts.", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    autocast_bf16: bool = doc("bf16 autocast for forward passes where the device supports it.", False)
    attn_implementation: str = doc("Attention kernel: auto (flash_attention_2 on CUDA when flash-attn is installed and "
                                   "forwards run in bf16/fp16, else sdpa) | sdpa | eager | flash_attention_2. Packed "
                                   "forwards (trainer.pack_sequences) keep attention within rows with any of them "
                                   "(rexrag.packing).", "auto")
    fsdp_mixed_precision: str = doc("FSDP2 all-gather and compute dtype: auto (bfloat16 when autocast_bf16 is on and "
                                    "rexrag.hardware.has_fast_bf16, else float32) | bfloat16 | float32. Gradients are "
                                    "reduced in float32; the sharded master weights keep model.dtype.", "auto")

    def __post_init__(self):
        _choices("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choices("model.fsdp_mixed_precision", self.fsdp_mixed_precision, ("auto", "bfloat16", "float32"))
        _choices("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                              "installed here (it builds for CUDA only); use model.attn_implementation=auto")
        if self.lora_rank < 0:
            raise ConfigError("model.lora_rank must be >= 0 (0 disables LoRA)")


@dataclass
class RetrievalConfig:
    """Where passages come from (a local index or a ``/retrieve`` URL) and the failure policy (``retrieval.*``)."""

    index: str = doc("Index directory built by `rexrag index` (used when url is empty).", "")
    url: str = doc("Search-R1-compatible /retrieve endpoint; overrides index when set.", "")
    topk: int = doc("Passages returned per search.", DEFAULT_TOPK)
    timeout_s: float = doc("HTTP timeout per request attempt.", 30.0)
    retries: int = doc("HTTP client: extra attempts after a connection error, timeout or 429/502/503/504 "
                       "(exponential back-off; never after another 4xx or a 500). The only retry layer.", 2)
    deadline_s: float = doc("HTTP client: bound on one retrieval call, all attempts and back-off included.", 60.0)
    max_failed_turns: int = doc("Consecutive rollout turns whose retrieval failed (the rows get a notice) before "
                                "the run stops with an error naming the retriever (0 = never stop).", 3)
    api_key: str = doc("Optional API key sent as X-API-Key to a remote retriever.", "")
    device: str = doc("Device a local dense index encodes queries on (cpu, cuda, ...); BM25 ignores it.", "cpu")

    def __post_init__(self):
        if self.topk < 1:
            raise ConfigError("retrieval.topk must be >= 1")
        if self.retries < 0 or self.max_failed_turns < 0:
            raise ConfigError("retrieval.retries and retrieval.max_failed_turns must be >= 0")
        if self.timeout_s <= 0 or self.deadline_s <= 0:
            raise ConfigError("retrieval.timeout_s and retrieval.deadline_s must be > 0")
        if self.url:
            _check_url("retrieval.url", self.url)


def _check_url(key: str, url: str) -> None:
    """A retriever URL must name its scheme and host: 'localhost:8000' parses as scheme 'localhost'."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # raises on a non-numeric port
    except ValueError as exc:
        raise ConfigError(f"{key}={url!r} is not a valid URL ({exc}); write e.g. http://127.0.0.1:8000/retrieve") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}={url!r} is not an http(s) URL with a host; write e.g. http://127.0.0.1:8000/retrieve")


@dataclass
class RolloutConfig:
    """The agent loop: group size, turns, token caps, sampling, template, backend (``rollout.*``)."""

    n: int = doc("Rollouts per prompt (GRPO group size G).", 5)
    max_turns: int = doc("Search turns allowed before the final answer-only turn.", 4)
    max_new_tokens_per_turn: int = doc("Tokens the policy may generate in one turn.", 256)
    max_obs_tokens: int = doc(f"Retrieved {INFORMATION_OPEN} text is truncated to this many tokens.", 500)
    max_total_tokens: int = doc("Cap on prompt + response tokens of one trajectory.", 4096)
    temperature: float = doc("Sampling temperature (0 = greedy).", 1.0)
    top_p: float = doc("Nucleus sampling mass.", 1.0)
    top_k: int = doc("Top-k sampling (0 = off).", 0)
    template: str = doc("Instruction template: 'rexrag', 'search-r1', a file path, or a literal containing {question}.", "rexrag")
    max_query_chars: int = doc("A search query longer than this is cut before retrieval.", 512)
    backend: str = doc("Generation backend: auto (vllm when installed, else hf) | hf | vllm (rexrag.rollout.backends).", "auto")
    engine_dtype: str = doc("Rollout compute dtype: auto (bfloat16 on GPUs and on CPUs with bf16 matrix units, else float32) | float32 | bfloat16 | float16. vLLM runs its weights in it; the HF loop runs fp32 weights under autocast to it.", "auto")
    vllm_kv_cache_gb: float = doc("vLLM on CPU: KV-cache size in GiB (per process).", 1.0)
    vllm_gpu_memory_utilization: float = doc("vLLM on GPU: fraction of the GPU the engine may hold; 0 = derived when the engine starts (after the policy, reference and optimizer are placed, and the caching allocator emptied) from the free memory less rollout.vllm_gpu_reserve_gb (rexrag.rollout.weights.auto_gpu_memory_utilization); a share below what the engine needs stops with one line naming the phase and the numbers.", 0.0)
    vllm_gpu_reserve_gb: float = doc("vLLM on GPU with vllm_gpu_memory_utilization=0: GiB per process the derived share keeps back, at engine start, for what the trainer allocates afterwards (AdamW moments of the policy and critic, the probe-scoring forward, with vllm_sleep_level=0 the update). -1 = from the GPU memory plan of the whole config (rexrag.gpu_plan), which `rexrag train` computes; without one (evaluation) AdamW's moments of the model's trainable parameters.", -1.0)
    vllm_enforce_eager: bool | None = doc("vLLM: no torch.compile / CUDA graphs. null = eager on the CPU (start-up in seconds), CUDA graphs on GPUs (launch-bound decode otherwise).", None)
    vllm_sleep_level: int = doc("vLLM sleep mode during the update: 0 off, 1 (KV cache released; weights offloaded to host on a GPU, kept on the CPU), 2 (weights and KV cache released; the sync refills the weights). On the CPU the engine's pages go back to the OS (rexrag.memory.release_pages) and vLLM rebuilds its packed weights at the reload.", 2)
    vllm_tensor_parallel_size: int = doc("vLLM: processes sharing one engine (tensor parallel). Only 1 is built: each process owns one engine.", 1)
    fsdp_gather_for_rollout: bool = doc("FSDP + hf backend: gather the policy's full weights once per rollout (no collective per decode step; holds the full weights while generating) instead of per forward.", True)
    format: str = doc("Agent format: tags (Search-R1's raw-text search, information and answer tags) | tool_calls (the tokenizer's chat template with the tools declared, the model's native tool calls, results as tool messages: rexrag.rollout.tool_calls). With tool_calls, template rexrag means rexrag.prompts.TOOL_TEMPLATE.", "tags")
    tool_parser: str = doc("tool_calls format: how the model's calls are read (rexrag.rollout.tool_calls.TOOL_PARSERS: hermes = Hermes/Qwen <tool_call>{json}</tool_call> | llama3_json = Llama 3.x JSON calls).", "hermes")
    tools: list[str] = doc("tool_calls format: the tools declared, each a registered name (search is built in: the configured retriever; @rexrag.register_tool adds more) or a dotted path to a function with a Google-style docstring.", factory=lambda: ["search"])
    final_answer: str = doc("tool_calls format: the answer in the final message (the first without a tool call): auto (its last answer-tag span, else the whole message) | tag (the span only) | message (the whole message); the text after the closing think tag.", "auto")
    mode: str = doc("When rollouts are generated: sync (by the trainer, between updates) | one_step_off (by rollout "
                    "worker processes, the batch of step t+1 while step t trains) | async (workers up to "
                    "max_staleness batches ahead). rexrag.train.async_source says what each mode guarantees.", "sync")
    max_staleness: int | None = doc("Async modes: no batch is trained more than this many weight versions after the "
                                    "version that generated it. null = the mode's own (sync 0, one_step_off 1, "
                                    "async 2); one_step_off accepts 0 (then it is sync, run by a worker).", None)
    workers: int = doc("Async modes: rollout worker processes per trainer process, each with its own engine "
                       "(batches go to them in turn). At most max_staleness + 1 (no more batches are ever in flight).", 1)
    async_address: str = doc("Async modes: host:port the trainer listens on for its rollout workers. Empty = start "
                             "the workers on this machine (127.0.0.1, a free port); set = start none and wait for "
                             "workers launched elsewhere with `python -m rexrag.train.async_worker --address "
                             "host:port --rank k` (k = 1..workers); trainer process t listens on port + t.", "")
    worker_timeout_s: float = doc("Async modes: a worker silent for this long (no batch, no heartbeat) while the "
                                  "trainer waits for it, or not connected this long after the start, ends the run "
                                  "with an error naming it.", 600.0)

    def __post_init__(self):
        from rexrag.rollout.backend_names import backend_choices  # names only: no engine is imported

        _choices("rollout.backend", self.backend, tuple(backend_choices()))
        _choices("rollout.engine_dtype", self.engine_dtype, ("auto", "float32", "bfloat16", "float16"))
        if self.vllm_kv_cache_gb <= 0 or not 0.0 <= self.vllm_gpu_memory_utilization <= 1.0:
            raise ConfigError("rollout.vllm_kv_cache_gb must be > 0 and rollout.vllm_gpu_memory_utilization in [0, 1] (0 = derived)")
        if self.vllm_sleep_level not in (0, 1, 2):
            raise ConfigError(f"rollout.vllm_sleep_level must be 0, 1 or 2, got {self.vllm_sleep_level}")
        if self.vllm_tensor_parallel_size < 1:
            raise ConfigError(f"rollout.vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        if self.n < 1:
            raise ConfigError("rollout.n must be >= 1")
        if self.max_turns < 0:
            raise ConfigError("rollout.max_turns must be >= 0")
        if self.temperature < 0:
            raise ConfigError("rollout.temperature must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("rollout.top_p must be in (0, 1] (1 = off)")
        if self.top_k < 0:
            raise ConfigError("rollout.top_k must be >= 0 (0 = off)")
        for key in ("max_new_tokens_per_turn", "max_total_tokens", "max_query_chars"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1")
        if self.max_obs_tokens < 0:
            raise ConfigError("rollout.max_obs_tokens must be >= 0")
        _choices("rollout.format", self.format, ("tags", "tool_calls"))
        self._check_async()
        _choices("rollout.final_answer", self.final_answer, ("auto", "tag", "message"))
        if self.format == "tool_calls":  # parser, tool schemas and names: before any model loads
            from rexrag.rollout.tool_calls import check_setup

            check_setup(self.tool_parser, list(self.tools))

    @property
    def staleness(self) -> int:
        """The bound k of ``mode`` (``max_staleness``, or the mode's default when it is null)."""
        return self.max_staleness if self.max_staleness is not None else ASYNC_DEFAULT_STALENESS[self.mode]

    def _check_async(self) -> None:
        _choices("rollout.mode", self.mode, tuple(ASYNC_DEFAULT_STALENESS))
        k = self.max_staleness
        if k is not None and k < 0:
            raise ConfigError(f"rollout.max_staleness must be >= 0 (0 = every batch from the current weights), got {k}")
        if self.mode == "sync" and k not in (None, 0):
            raise ConfigError(f"rollout.max_staleness={k} needs rollout.mode=async (sync trains every batch on the weights "
                              "that generated it)")
        if self.mode == "one_step_off" and k not in (None, 0, 1):
            raise ConfigError(f"rollout.max_staleness={k}: one_step_off is at most 1 step off; use rollout.mode=async")
        if self.workers < 1:
            raise ConfigError(f"rollout.workers must be >= 1, got {self.workers}")
        if self.mode == "sync" and (self.workers != 1 or self.async_address):
            raise ConfigError("rollout.workers and rollout.async_address need rollout.mode=one_step_off or async")
        if self.workers > self.staleness + 1:
            raise ConfigError(f"rollout.workers={self.workers} exceeds rollout.max_staleness + 1 = {self.staleness + 1}: "
                              "no more batches are ever in flight, so the extra workers would idle")
        if self.worker_timeout_s <= 0:
            raise ConfigError(f"rollout.worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if self.async_address:
            host, _, port = self.async_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"rollout.async_address={self.async_address!r} must be host:port, e.g. 10.0.0.1:29600")


@dataclass
class AlgoConfig:
    """Advantage estimator, PPO clipping, KL and entropy terms (``algo.*``)."""

    adv_estimator: str = doc("Advantage estimator registered in rexrag.algos.advantages (shipped: grpo | rloo | reinforce_pp | gae).", "grpo")
    norm_adv_by_std: bool = doc("GRPO: divide by group std (False = Dr. GRPO).", True)
    gamma: float = doc("GAE discount.", 1.0)
    lam: float = doc("GAE lambda.", 1.0)
    clip_low: float = doc("PPO clip epsilon below 1.", 0.2)
    clip_high: float = doc("PPO clip epsilon above 1 (0.28 = clip-higher).", 0.2)
    dual_clip_c: float = doc("Dual-clip constant c (> 1); 0 disables.", 0.0)
    loss_agg: str = doc("token-mean | seq-mean-token-mean | seq-mean-token-sum-norm.", "token-mean")
    kl_coef: float = doc("KL-to-reference coefficient.", 0.001)
    kl_type: str = doc("k1 | k2 | k3 (k3 = 'low-var').", "k3")
    kl_in_reward: bool = doc("Fold KL into the reward instead of the loss.", False)
    entropy_coef: float = doc("Entropy bonus coefficient.", 0.0)
    value_clip: float = doc("Value-loss clip range (gae only).", 0.2)
    vf_coef: float = doc("Value-loss coefficient (gae only).", 0.5)
    ratio_level: str = doc("token (PPO/GRPO) | sequence (GSPO: length-normalised sequence ratio, clipped with gspo_clip_*; pair with loss_agg=seq-mean-token-mean as in the paper).", "token")
    gspo_clip_low: float = doc("GSPO clip epsilon below 1 (ratio_level=sequence).", 3e-4)
    gspo_clip_high: float = doc("GSPO clip epsilon above 1 (ratio_level=sequence).", 4e-4)
    rollout_correction: str = doc("Engine-vs-trainer correction registered in rexrag.algos.rollout_correction: none | token_tis | seq_tis | token_mask | seq_mask | geo_mask.", "none")
    rollout_correction_cap: float = doc("C of token_tis / seq_tis: importance weights are truncated at C (> 1).", 2.0)
    rollout_correction_low: float = doc("Lower bound of the *_mask corrections' accepted ratio (geo_mask: SkyRL recommends about 0.99).", 0.5)
    rollout_correction_high: float = doc("Upper bound of the *_mask corrections' accepted ratio (geo_mask: about 1.01).", 2.0)
    turn_discount: float = doc("With trainer.process_reward: discount of the process reward-to-go over later turns, in "
                               "[0, 1] (0 = each turn only its own reward; rexrag.algos.turn_credit).", 1.0)

    def __post_init__(self):
        from rexrag.algos.advantages import adv_estimators
        from rexrag.algos.losses import AGG_MODES, KL_KINDS

        _choices("algo.adv_estimator", self.adv_estimator, adv_estimators())
        _choices("algo.loss_agg", self.loss_agg, AGG_MODES)
        _choices("algo.kl_type", self.kl_type, KL_KINDS)
        if self.dual_clip_c and self.dual_clip_c <= 1.0:
            raise ConfigError("algo.dual_clip_c must be > 1 (or 0 to disable)")
        from rexrag.algos.rollout_correction import rollout_corrections

        _choices("algo.rollout_correction", self.rollout_correction, rollout_corrections())
        _choices("algo.ratio_level", self.ratio_level, ("token", "sequence"))
        if self.rollout_correction_cap <= 1.0:
            raise ConfigError(f"algo.rollout_correction_cap must be > 1 (a cap <= 1 truncates every weight), "
                              f"got {self.rollout_correction_cap}")
        if not 0.0 <= self.rollout_correction_low < self.rollout_correction_high:
            raise ConfigError(f"algo.rollout_correction_low ({self.rollout_correction_low}) must be >= 0 and below "
                              f"algo.rollout_correction_high ({self.rollout_correction_high})")
        if self.gspo_clip_low <= 0 or self.gspo_clip_high <= 0:
            raise ConfigError("algo.gspo_clip_low and algo.gspo_clip_high must be > 0")
        if not 0.0 <= self.turn_discount <= 1.0:
            raise ConfigError(f"algo.turn_discount must be in [0, 1], got {self.turn_discount}")


@dataclass
class RexConfig:
    """REX-RAG probe exploration and policy correction (``rex.*``)."""

    enabled: bool = doc("Turn REX-RAG mixed sampling on.", False)
    trigger: str = doc("per_trajectory (public code) | dead_end_group (paper framing).", "per_trajectory")
    probe_prob: float = doc("p: chance a wrong original is probed (per_trajectory).", 0.2)
    probes_per_dead_group: int = doc("Probes per all-wrong group (dead_end_group).", 2)
    keep_ratio: float = doc("rho_0: initial share of B*G kept after the filter.", 0.08)
    keep_cap: int = doc("Optional cap on kept probes per step (0 = none).", 0)
    keep_min: int = doc("Keep at least this many probes per step when any exist (0 = paper rule; with tiny batches rho can decay below 1/(B*G) and then never update again).", 0)
    success_reward: float = doc("An original (or probe) with reward >= this counts as correct; below it is 'wrong' (public code: score < 1).", 1.0)
    rho_momentum: float = doc("rho <- m*rho + (1-m)*probe EM accuracy.", 0.9)
    correction: str = doc("rex_token | rex_sequence | none.", "rex_token")
    seq_weight_cap: float = doc("Truncation of the rex_sequence weight.", 10.0)
    train_probe_tokens: bool = doc("Train the inserted probe prompt tokens (public code: yes).", True)
    pool: str = doc("Exploratory prompt pool file ('' = bundled pool of 30).", "")
    score_micro_batch_size: int = doc("Rows per probe-scoring forward (the filter's old-policy pass, which runs while the vLLM engine is awake and holds its share); 0 = trainer.micro_batch_size. The GPU memory plan (rexrag.gpu_plan, `rexrag train --plan`) reserves one such forward beside the engine.", 0)

    def __post_init__(self):
        _choices("rex.trigger", self.trigger, ("per_trajectory", "dead_end_group"))
        _choices("rex.correction", self.correction, ("rex_token", "rex_sequence", "none"))
        if not 0.0 <= self.probe_prob <= 1.0:
            raise ConfigError("rex.probe_prob must be in [0, 1]")
        if not 0.0 <= self.keep_ratio <= 1.0:
            raise ConfigError("rex.keep_ratio must be in [0, 1]")
        if self.keep_cap < 0 or self.keep_min < 0 or self.probes_per_dead_group < 1:
            raise ConfigError("rex.keep_cap and rex.keep_min must be >= 0 and rex.probes_per_dead_group >= 1")
        if not 0.0 <= self.rho_momentum <= 1.0:
            raise ConfigError("rex.rho_momentum must be in [0, 1]")
        if self.seq_weight_cap <= 1.0:
            raise ConfigError("rex.seq_weight_cap must be > 1 (weights of originals are 1/(1-alpha) > 1)")


@dataclass
class DataConfig:
    """Training questions and batch size (``data.*``)."""

    train_files: list[str] = doc("Training QA files (FlashRAG jsonl or Search-R1 parquet).", factory=list)
    batch_size: int = doc("Prompts per step (B).", 8)
    shuffle: bool = doc("Shuffle the training examples each epoch.", True)
    skip_bad: bool = doc("Skip malformed rows (counted) instead of failing.", False)
    limit: int = doc("Use at most this many training examples (0 = all).", 0)
    eval_files: list[str] = doc("QA files evaluated during training (trainer.eval_every) and by `rexrag eval --from-run` "
                                "when it is given no dataset; each is one dataset named after its file (a "
                                "multi-source Search-R1 parquet: one per data_source).", factory=list)
    eval_limit: int = doc("At most this many questions per evaluation dataset (0 = all).", 0)
    dynamic_sampling: bool = doc("DAPO dynamic sampling: drop groups whose rewards are all equal (after REX-RAG probes join) and sample more prompts until batch_size groups carry a signal.", False)
    dynamic_sampling_max_rounds: int = doc("Bound on sampling rounds per step with dynamic_sampling (1 = no extra round); short of groups after it, the step fills up with dropped ones.", 3)
    curriculum: str = doc("Prompt order: none (epoch-wise shuffle) | pass_rate (each step draws batch_size questions "
                          "with weights from an online estimate of each question's pass rate p, ~p(1-p): questions "
                          "neither always right nor always wrong first; rexrag.curriculum). Needs more training "
                          "questions than batch_size.", "none")
    curriculum_decay: float = doc("pass_rate: weight of a question's earlier results each time it is sampled again, in "
                                  "[0, 1) (0 = only the last visit counts).", 0.8)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        _choices("data.curriculum", self.curriculum, ("none", "pass_rate"))
        if not 0.0 <= self.curriculum_decay < 1.0:
            raise ConfigError(f"data.curriculum_decay must be in [0, 1), got {self.curriculum_decay}")
        if self.dynamic_sampling and self.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"data.dynamic_sampling_max_rounds must be >= 1 with data.dynamic_sampling, "
                              f"got {self.dynamic_sampling_max_rounds}")


@dataclass
class TrainerConfig:
    """Optimisation, reward, run directory, checkpoints and logging (``trainer.*``)."""

    steps: int = doc("Optimizer steps (each = one rollout batch).", 10)
    lr: float = doc("Learning rate.", 1e-6)
    critic_lr: float = doc("Value-model learning rate for algo.adv_estimator=gae (0 = same as lr).", 0.0)
    warmup_steps: int = doc("Linear warm-up steps.", 0)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    ppo_epochs: int = doc("Passes over each rollout batch.", 1)
    mini_batch_size: int = doc("Trajectories per optimizer update.", 16)
    micro_batch_size: int = doc("Trajectories per forward/backward (gradient accumulation).", 4)
    micro_batch_tokens: int = doc("Token budget per forward/backward: rows sorted by length and packed while "
                                  "rows x longest <= budget (replaces micro_batch_size; 0 = split by rows).", 0)
    pack_sequences: bool = doc("Padding-free update, log-prob and value (gae) passes: each micro-batch's rows run as one "
                               "sequence of their real tokens (position ids restarting per row, attention within "
                               "rows: rexrag.packing), so no padding is computed; micro_batch_tokens then budgets real "
                               "tokens. Logged: update/padding_ratio (tokens computed per real token).", False)
    reuse_update_forward: bool = doc("On-policy updates (ppo_epochs 1, one mini-batch) take the old-policy "
                                     "log-probs from the update's own forward, detached, instead of a separate pass.", True)
    max_grad_norm: float = doc("Gradient clipping norm.", 1.0)
    logprob_chunk_tokens: int = doc("Tokens per slice of the LM head in the update's forward (their logits are "
                                    "recomputed in backward): smaller holds less (~18 bytes x vocabulary a token), "
                                    "slightly slower.", 512)
    optimizer_state_dtype: str = doc("AdamW moments' dtype: float32 (torch.optim.AdamW) | bfloat16 (half the state, "
                                     "stochastically rounded; rexrag.train.optim).", "float32")
    reward: str | list[dict[str, Any]] = doc(
        "Reward registered in rexrag.rewards (shipped: em | f1 | cover_em | format | em_format) or a dotted path "
        "'pkg.module:fn'; a weighted sum as 'em + 0.1*format' or a YAML list [{name: em, weight: 1.0}, ...].", "em")
    process_reward: str | list[dict[str, Any]] = doc(
        "Reward per agent turn registered in rexrag.process_rewards (shipped: evidence | answer_seen) or a dotted path, "
        "weighted like trainer.reward ('evidence*0.2'); its turn-level advantage is added to the outcome advantage "
        "of a group estimator (rexrag.algos.turn_credit). '' = off.", "")
    seed: int = doc("Random seed.", 0)
    out_dir: str = doc("Run directory (metrics, checkpoints, plots).", "runs/default")
    save_every: int = doc("Checkpoint every N steps (0 = only at the end).", 0)
    eval_every: int = doc("Evaluate data.eval_files every N steps and after the last one (greedy agent, the run's "
                          "rollout settings, the colocated engine); EM / F1 / cover-EM logged under eval/ (0 = off).", 0)
    keep_last: int = doc("Checkpoints kept.", 2)
    resume: bool = doc("Resume from the latest checkpoint in out_dir.", False)
    log_tensorboard: bool = doc("Write TensorBoard events.", True)
    wandb_project: str = doc("Log to wandb when set and installed.", "")

    def __post_init__(self):
        from rexrag.rewards import available_rewards, is_reward_path, reward_terms

        for name, _ in reward_terms(self.reward):  # raises ConfigError on a malformed spec
            if not is_reward_path(name):
                _choices("trainer.reward", name, available_rewards(), " or a dotted path 'pkg.module:fn'")
        from rexrag.process_rewards import process_terms

        process_terms(self.process_reward)  # unknown names, malformed weights
        _choices("trainer.optimizer_state_dtype", self.optimizer_state_dtype, OPTIMIZER_STATE_DTYPES)
        if self.logprob_chunk_tokens < 1:
            raise ConfigError(f"trainer.logprob_chunk_tokens must be >= 1, got {self.logprob_chunk_tokens}")
        if self.micro_batch_size > self.mini_batch_size:
            raise ConfigError("trainer.micro_batch_size must be <= trainer.mini_batch_size")


@dataclass
class Config:
    """The whole run: one section per component; build it with ``load_config`` (YAML + ``key=value``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rex: RexConfig = field(default_factory=RexConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# --------------------------------------------------------------------------- loading


class _Raw(str):
    """An override value exactly as typed; converted by the target field's type in ``_coerce``."""


def _from_raw(value: _Raw, tp: Any) -> Any:
    """Typed reading of a command-line value: strings stay verbatim, lists split on commas."""
    if tp is str:
        return str(value)  # "2026-11-22", "0.10", "yes", "null" stay text (YAML would change them)
    origin = typing.get_origin(tp)
    if origin in (list, tuple) and not value.strip().startswith("["):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin in (typing.Union, types.UnionType) and str in typing.get_args(tp):
        return None if value.strip() in ("null", "~") and type(None) in typing.get_args(tp) else str(value)
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return str(value)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one value to the annotated type, naming ``key`` on failure."""
    if isinstance(value, _Raw):
        value = _from_raw(value, tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} expects null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} expects {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and out != value:
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool) or value is None:
            # YAML 1.1 reads yes/no/on/off/null unquoted as booleans / None.
            raise ConfigError(f"{key} expects a string, got {value!r}; quote the value in YAML")
        if isinstance(value, (datetime.date, datetime.datetime)):
            return value.isoformat()
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; allowed keys here: {sorted(fields)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:  # an empty YAML section ("model:" with everything commented out)
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key} expects a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict of raw strings.

    Values are read by the type of the field they set (see ``_coerce``): a string field gets the
    text verbatim, a list field splits ``"a,b"`` on commas (or takes a YAML flow list ``[a, b]``),
    numbers and booleans are parsed ("1e-6", "true", "on", "1").
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = _Raw(raw.strip())
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Load ``cls`` from a YAML file (optional) and dotted ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections {sorted(f.name for f in dataclasses.fields(cls))}")
        data = loaded
    data = _merge(data, parse_overrides(overrides or []))
    return _build(cls, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """The inverse of ``config_to_dict``, with the same checks as ``load_config``."""
    return _build(cls, data, "")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every field, for help output."""
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, getattr(instance, f.name), f.metadata.get("doc", "")))
    return rows
