"""One generation engine per process, colocated with the trainer, and its choreography around the update.

Per RL step the trainer (``Trainer.sample`` / ``Trainer.step``) calls, on every process, in this order:

1. :meth:`Colocation.before_rollout` -- an engine that holds its own copy of the weights (vLLM) gets the
   new ones: weights woken (sleep mode), the policy streamed in (:func:`stream_weights`), then the
   KV cache woken. Whether to sync is decided by the step counter (the same on every process; a level-2
   sleep discarded the weights, so a sync always follows one), never by a per-process "unchanged" test
   that could send processes into different collectives.
2. :meth:`Colocation.rollout` (a context) -- the HF backend under FSDP gathers the sharded policy once
   for the whole rollout (``fsdp_gather_for_rollout``): its decode steps then run no collective and
   need no lockstep, instead of all-gathering every layer for every generated token.
3. :meth:`Colocation.after_rollout` -- the engine sleeps (level 2 by default; vLLM's sleep mode on GPUs, its
   pages handed back to the OS on the CPU) so the update has its memory.
4. :func:`mismatch_metrics` -- how far the engine's sampling log-probs are from the trainer's own
   recomputation on the same tokens (measured here; corrected for by the off-policy rule, not here).

How it matches the peers: TRL's colocate mode (one engine per rank with vLLM's ``external_launcher``
executor inside the trainer's torch.distributed world; ``empty_cache`` before every ``wake_up``), verl's
FSDP workers' rollout mode (sleep level 2, staged wake-up: weights, sync, KV cache; parameters gathered
per tensor from the FSDP shards). Failures: a step that can fail on one process (engine start-up, a
weight sync) runs under :func:`on_all_ranks`, which gathers every process's outcome and raises the same
error, naming the failing ranks, everywhere, so no process is left waiting in a collective.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from rexrag.errors import UserError
from rexrag.rollout.trajectory import Seg
from rexrag.rollout.weights import stream_weights
from rexrag.sharding import on_all_ranks

# --------------------------------------------------------------------------- the choreography


def check_layout(cfg, world: int) -> None:
    """Engines per process that this build supports (before any model loads): one per process."""
    tp = cfg.vllm_tensor_parallel_size
    if world % tp:
        raise UserError(f"rollout.vllm_tensor_parallel_size={tp} must divide the number of processes ({world})")
    if tp > 1:
        raise UserError(f"rollout.vllm_tensor_parallel_size={tp}: engines shared by several processes are not built "
                        "yet (each process owns one engine); use 1")


def start_engine(name: str, model, tokenizer, cfg, *, world: int, device, seed: int, max_batch: int = 64):
    """Build this process's generation backend for ``model`` (already prepared / sharded), every
    process at once: the engines start, all processes agree that they did, then the weights are
    streamed in (a collective under FSDP) and agreed on. ``cfg`` is the ``RolloutConfig``."""
    from rexrag.models import check_lora_modules
    from rexrag.rollout.backends import build_backend

    check_layout(cfg, world)
    check_lora_modules(model)  # an adapter the engine cannot receive: refused before any engine starts
    # (each phase of an engine's start-up is agreed by every process inside VLLMBackend)
    backend = build_backend(name, model, tokenizer, cfg, device=device, seed=seed, max_batch=max_batch,
                            distributed=world > 1, load=False)
    Colocation(backend).sync(model)
    on_all_ranks(getattr(backend, "smoke_test", lambda: None), f"the first generation of the engine (rollout.backend={name})")
    return backend


class Colocation:
    """Drives one process's generation backend around the update (see the module docstring).

    ``backend``: a ``GenerationBackend``; one with ``load_weights`` (vLLM) holds its own weights and is
    synced, one without (HF) samples from the model itself."""

    def __init__(self, backend, *, gather: bool = False, synced_step: int | None = None):
        self.backend, self.gather = backend, gather
        self.holds_weights = hasattr(backend, "load_weights")
        self.synced_step = synced_step  # the step whose weights the engine holds (None: unknown, sync first)
        self.last: dict[str, float] = {}

    def reseed(self, seed: int) -> None:
        """Seed the backend's sampling for this step / round (not part of the global RNG state a checkpoint
        restores): its ``reseed`` (vLLM: one seed per generate call drawn from it, no per-request seeds),
        else its ``generator``."""
        fn = getattr(self.backend, "reseed", None)
        if callable(fn):
            fn(seed)
            return
        gen = getattr(self.backend, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)

    def sync(self, model) -> None:
        """Stream ``model`` (unwrapped) into the engine on every process, then agree. A process whose
        engine fails part-way still gathers the rest of the stream (under FSDP each tensor is an
        all-gather the others are waiting in) before the failure is raised everywhere; a failure inside
        the stream itself is kept in step by the stream (``rexrag.rollout.weights``) and raised at its end,
        so the agreement names the rank it happened on."""
        from rexrag.errors import EngineError

        stream = stream_weights(model, getattr(torch, self.backend.dtype))
        before = self.backend.stats.get("weight_sync_bytes", 0)

        def load():
            try:
                self.backend.load_weights(stream)
            finally:
                for _ in stream:  # keep this process's gathers in step with the others'
                    pass

        on_all_ranks(load, "the weight sync into the vLLM engine", EngineError)
        self.last = {"rollout/weight_sync_gib": (self.backend.stats["weight_sync_bytes"] - before) / 2**30}

    def before_rollout(self, model, step: int) -> None:
        """Wake the engine (staged) and sync it when ``step`` moved on or a level-2 sleep discarded
        its weights; the sync's metrics are in ``last`` (empty when none ran)."""
        self.last = {}
        if not self.holds_weights:
            return
        if step != self.synced_step or not self.backend.weights_valid:
            self.sync(model)  # wakes the weights first (VLLMBackend.load_weights)
            self.synced_step = step
        self.backend.wake_up()  # then the KV cache

    @contextlib.contextmanager
    def rollout(self, model):
        """The HF backend under FSDP with ``gather``: every FSDP unit unsharded once for the block and
        resharded after it (decode steps run no collective, so the lockstep is off meanwhile)."""
        from rexrag.sharding import gathered

        if self.holds_weights or not self.gather:
            yield
            return
        lockstep, self.backend.lockstep = getattr(self.backend, "lockstep", None), None
        try:
            with gathered(model):
                yield
        finally:
            self.backend.lockstep = lockstep

    def after_rollout(self) -> None:
        """Release the engine's memory for the update (sleep mode), then wait for every process's
        rollouts (their lengths differ: ``rexrag.train.dynamic.sample_step`` times the wait)."""
        fn = getattr(self.backend, "sleep", None)
        if fn is not None:
            fn()
        from rexrag.sharding import barrier

        barrier()


# --------------------------------------------------------------------------- mismatch


def mismatch_metrics(segments: Tensor, is_probe: Tensor, engine_logp: Tensor, trainer_logp: Tensor) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the trainer's, on the sampled tokens.

    ``segments`` [B, T] segment kinds, ``is_probe`` [B] bool, ``engine_logp`` / ``trainer_logp`` [B, T]
    (the rollout's recorded log-probs and the trainer's recomputation at the same temperature). Only
    POLICY tokens were sampled (PROBE tokens are inserted from the pool, INFO / NOTICE / PROMPT are not
    the model's), so the kinds reported are the originals' POLICY tokens and the probes' continuation
    POLICY tokens: ``mismatch/<kind>/abs_mean``, ``abs_max`` and ``kl_k3`` (k3 estimate of
    KL(engine || trainer) from the engine's own samples: mean of e^d - 1 - d, d = log p_trainer - log p_engine)."""
    sampled = segments == Seg.POLICY
    out: dict[str, float] = {}
    for kind, rows in (("policy", ~is_probe), ("probe_policy", is_probe)):
        mask = sampled & rows[:, None]
        if not bool(mask.any()):
            continue
        d = (trainer_logp.float() - engine_logp.float())[mask]
        out[f"mismatch/{kind}/abs_mean"] = float(d.abs().mean())
        out[f"mismatch/{kind}/abs_max"] = float(d.abs().max())
        out[f"mismatch/{kind}/kl_k3"] = float((torch.expm1(d) - d).mean())
    return out
