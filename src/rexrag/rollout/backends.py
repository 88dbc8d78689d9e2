"""The registry of generation backends: the only list of choices for ``rollout.backend`` / ``--backend``.

Every builder has one signature, ``build(model, tokenizer, cfg, *, device, seed, max_batch, distributed, load)``,
and returns a ``GenerationBackend``: ``distributed`` says the process is one of several (each owns its
backend), ``load`` False defers copying the weights to the caller (a backend that samples from the
model itself ignores both). ``auto`` picks ``vllm`` when it is installed, else ``hf`` (on a CPU only: a
CUDA machine without vLLM is told to install it or to choose ``hf``).
Registering a new builder here makes it selectable from the config and the CLI with no other edit. The
registry and its choices live in ``rexrag.rollout.backend_names`` (the config reads them without importing
the engines this module imports); the shipped builders below are registered there by dotted path.
"""

from __future__ import annotations

from rexrag.rollout.backend_names import AUTO, BACKENDS, BackendBuilder, backend_choices  # noqa: F401 (re-exported)


def resolve_backend_name(name: str) -> str:
    """``auto`` -> ``vllm`` when importable, else ``hf`` on a CPU; other names are checked against the
    registry. ``auto`` on a CUDA machine without vLLM is an error: falling back would run the HF loop,
    about 10x slower there, with nothing saying so."""
    import torch

    from rexrag.errors import UserError
    from rexrag.rollout.vllm_backend import vllm_available

    if name == AUTO:
        if vllm_available():
            return "vllm"
        if torch.cuda.is_available():
            raise UserError("rollout.backend=auto on a CUDA machine, but vLLM is not installed: `pip install "
                            "'rexrag[vllm]'`, or choose the ~10x slower HF loop explicitly with rollout.backend=hf "
                            "(--backend hf)")
        return "hf"
    BACKENDS.get(name, hint=f" (or {AUTO!r})")
    if name == "vllm" and not vllm_available():
        from rexrag.rollout.vllm_backend import install_hint

        raise UserError(install_hint())
    return name


def backend_line(requested: str, setting: str = "rollout.backend") -> str:
    """The one start-up line saying which generation backend runs and why (``requested`` as ``setting``
    gave it); raises what :func:`resolve_backend_name` raises."""
    name = resolve_backend_name(requested)
    if requested != AUTO:
        return f"generation backend: {name} ({setting}={requested})"
    why = "vLLM is installed" if name == "vllm" else "vLLM is not installed; CPU machine"
    return f"generation backend: {name} ({setting}=auto: {why})"


def build_backend(name: str, model, tokenizer, cfg, *, device=None, seed: int | None = None, max_batch: int = 64,
                  distributed: bool = False, load: bool = True):
    """The backend ``name`` (after ``auto`` resolution) for ``model``; ``cfg`` is a ``RolloutConfig``."""
    return BACKENDS.get(resolve_backend_name(name))(model, tokenizer, cfg, device=device, seed=seed, max_batch=max_batch,
                                                    distributed=distributed, load=load)


def _build_hf(model, tokenizer, cfg, *, device=None, seed=None, max_batch=64, distributed=False, load=True):
    from rexrag.hardware import default_compute_dtype
    from rexrag.rollout.engine import HFBackend

    device = device if device is not None else next(model.parameters()).device
    dtype = default_compute_dtype(device) if cfg.engine_dtype == "auto" else cfg.engine_dtype
    return HFBackend(model, tokenizer, device=device, max_batch=max_batch, seed=seed, dtype=dtype)


def _build_vllm(model, tokenizer, cfg, *, device=None, seed=None, max_batch=64, distributed=False, load=True):
    """``distributed``: one engine per process inside the running torch.distributed world; ``load``:
    False when the caller streams the weights in itself (``rexrag.rollout.colocate.start_engine``).
    ``max_batch``: the rows this process generates in one call (training: ``data.batch_size`` / processes
    x ``rollout.n``; REX-RAG's probes continue in a later call, at most one per original; evaluation:
    ``--batch-size``), the engine's ``max_num_seqs``, so a rollout runs as one batch."""
    from rexrag.models import check_lora_modules
    from rexrag.rollout.weights import engine_gpu_share
    from rexrag.rollout.vllm_backend import VLLMBackend

    check_lora_modules(model)  # an adapter the engine's merged weights cannot carry: before the engine starts
    util = engine_gpu_share(model, cfg)  # the cache emptied, then the free memory less the GPU plan's reserve
    return VLLMBackend(model, tokenizer, max_model_len=cfg.max_total_tokens, device=device, dtype=cfg.engine_dtype,
                       seed=seed, kv_cache_gb=cfg.vllm_kv_cache_gb, gpu_memory_utilization=util,
                       enforce_eager=cfg.vllm_enforce_eager, max_num_seqs=max(1, max_batch),
                       sleep_level=cfg.vllm_sleep_level, distributed=distributed, load=load)
