"""Host memory: what this process (and the processes it started) hold, and handing freed memory back.

``peak_rss_mb`` is the kernel's high-water mark of this process's resident set (``ru_maxrss``): it
covers the in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the CPU default) but not a
child process. Children are counted two ways, because the kernel only reports the peak of a child
once it has exited and been waited for: ``children_rss_mb`` sums the *current* RSS of every live
descendant (e.g. a multiprocess vLLM engine core) and ``peak_rss_children_mb`` is the largest peak
among waited-for children. Linux reads ``/proc``; elsewhere the live-children figure is 0.

``release`` runs the garbage collector and asks glibc to return free heap pages to the kernel
(``malloc_trim``): after a phase drops a model, an optimizer or an engine, glibc otherwise keeps
the freed arenas mapped and the RSS stays at the phase's peak.

``bound_heap_caching`` stops glibc from keeping freed activations at all: by default glibc raises its
mmap threshold each time a large block is freed (up to 32 MiB), so the next step's activations come
from the heap, whose freed pages stay resident; measured on the demo's update (BENCHMARKS.md, "Demo
memory"), RSS after a backward stayed at the forward's peak (5.9 GB) instead of falling back (3.4 GB). It costs
page faults, so the demo calls it under a memory cap only. ``bound_kernel_caches`` bounds the other
thing that grows step after step: compiled matmul kernels kept for every new shape.

``release_pages`` hands the pages of tensors whose contents will be rewritten before they are read
back to the OS without freeing the tensors: the CPU analogue of vLLM's sleep mode
(``rexrag.rollout.vllm_backend``) releases the engine's KV cache and weights with it for the update.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import resource
import sys

_KIB = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """Highest RSS this process has had (MiB): the kernel's high-water mark, never reset here (so
    ``/usr/bin/time`` and ``ru_maxrss`` report the true peak of a job)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB / 2**20


class PhasePeaks:
    """Peak RSS per phase of a job, from a daemon thread sampling ``rss_mb`` every ``interval_s``.

    Sampled rather than read from the kernel: the kernel's per-process high-water mark can only be
    reset (``/proc/self/clear_refs``), and a reset also hides the job's true peak from ``ru_maxrss`` and
    ``/usr/bin/time``. Peaks of the phases that matter (a backward, an engine's start) last seconds;
    a spike shorter than the interval can be missed, so ``peak_rss_mb`` stays the job's reference.
    """

    def __init__(self, interval_s: float = 0.005):
        import threading

        self._peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True, name="rss-sampler")
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._peak = max(self._peak, rss_mb())

    def lap(self) -> float:
        """Peak RSS (MiB) since the previous lap (or the start); the next phase starts from the RSS now."""
        peak, now = max(self._peak, rss_mb()), rss_mb()
        self._peak = now
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def peak_rss_children_mb() -> float:
    """Largest peak RSS among this process's exited, waited-for descendants (MiB; 0 if none)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _KIB / 2**20


def _statm_rss_mb(pid: int | str) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_mb() -> float:
    """This process's RSS now (MiB; Linux only, else the peak)."""
    return _statm_rss_mb("self") if os.path.exists("/proc/self/statm") else peak_rss_mb()


def children_rss_mb() -> float:
    """Summed current RSS of this process's live descendants (MiB; Linux, else 0)."""
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            continue
        for kid in kids:
            if kid not in seen:
                seen.add(kid)
                total += _statm_rss_mb(kid)
                todo.append(kid)
    return total


@functools.cache
def _glibc(symbol: str):
    """``symbol`` of the C library, None where it is not there (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)


def bound_heap_caching(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more with its own mmap (returned to the OS when
    freed) and trim the heap above that much free space: a fixed threshold also turns off glibc's
    dynamic raise. Costs a page fault per fresh page of a large tensor (zero-filled by the kernel).
    False where it does not apply (not glibc)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))


_MADV_DONTNEED = 4  # Linux: the pages are dropped; the next touch maps fresh zero-filled ones
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_pages(tensors) -> int:
    """Give the resident pages of each CPU tensor's storage back to the OS now; returns the bytes released.

    The tensors stay valid and keep their addresses, but read as zeros afterwards (Linux ``madvise``
    ``MADV_DONTNEED`` on private anonymous memory): only for memory that is rewritten before it is read
    again. Only whole pages inside a storage are released (an allocator's bookkeeping next to it is left
    alone); a storage shared by several views counts once. 0 and nothing changed off Linux or off glibc."""
    madvise = _glibc("madvise") if sys.platform.startswith("linux") else None
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    seen: set[int] = set()
    released = 0
    for t in tensors:
        storage = t.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
        if t.device.type != "cpu" or start in seen:
            continue
        seen.add(start)
        first, end = -(-start // _PAGE) * _PAGE, (start + nbytes) // _PAGE * _PAGE
        if end > first and madvise(first, end - first, _MADV_DONTNEED) == 0:
            released += end - first
    return released


KERNEL_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's cache; ideep's, in torch
KERNEL_CACHE_ENTRIES = 128


def kernel_cache_env(entries: int = KERNEL_CACHE_ENTRIES) -> dict[str, str]:
    """The environment ``bound_kernel_caches`` sets (a user's own values kept), e.g. for a child process."""
    return {name: os.environ.get(name, str(entries)) for name in KERNEL_CACHE_ENV}


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Keep at most ``entries`` compiled CPU matmul kernels in each of oneDNN's and torch's (ideep)
    caches (default 1,024 each); a user's own setting wins. Each new matmul shape (an update's micro-batch
    of a new length) compiles and keeps kernels of about 2 MiB: measured 673 MiB for one bf16 linear over
    300 lengths, 50 MiB with both caches at 16; on the demo's RL steps, +60-75 MiB of RSS a step
    (BENCHMARKS.md, "Demo memory"). A step cycles through far fewer kernels than 128 (update time unchanged).
    Read when torch first builds a kernel: call before any bf16 matmul runs."""
    os.environ.update(kernel_cache_env(entries))


def trim_heap() -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``, which also releases free pages in
    the middle of every arena; no-op elsewhere). After an update the small blocks it freed otherwise stay
    resident as fragments: measured on the demo's RL steps, 3.25 -> 2.86 GB left after a step, and the
    next step's peak 4.26 -> 3.82 GB. A few milliseconds."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def release() -> None:
    """Collect garbage and return free heap memory to the OS (``trim_heap``)."""
    gc.collect()
    trim_heap()
