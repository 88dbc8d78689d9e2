"""rexrag.memory: the figures behind memory/* metrics, and release()."""

import os
import subprocess
import sys
import time

import pytest

from rexrag import memory
from rexrag.train.logging import memory_metrics


def test_rss_figures_are_consistent():
    assert 0 < memory.rss_mb() <= memory.peak_rss_mb() + 1  # statm and ru_maxrss round differently
    assert memory.peak_rss_children_mb() >= 0
    m = memory_metrics()
    assert {"memory/peak_rss_mb", "memory/rss_mb", "memory/children_rss_mb", "memory/peak_rss_children_mb"} <= set(m)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="live-children RSS is read from /proc")
def test_live_child_is_counted_then_its_peak():
    before = memory.children_rss_mb()
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 * 2**20); import time; time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while memory.children_rss_mb() - before < 50 and time.time() < deadline:
            time.sleep(0.1)
        assert memory.children_rss_mb() - before >= 50  # the 64 MiB buffer is resident in the child
    finally:
        child.kill()
        child.wait()
    assert memory.peak_rss_children_mb() >= 50  # reported by the kernel once the child was waited for


def test_release_returns_freed_heap():
    memory.release()
    base = memory.rss_mb()
    chunks = [bytearray(64 * 1024) for _ in range(2000)]  # ~128 MiB of small (non-mmap) allocations
    del chunks
    memory.release()
    assert memory.rss_mb() - base < 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) zero-fill is Linux's")
def test_released_pages_leave_the_resident_set_and_read_back_as_zeros():
    import torch

    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, resident once written
    views = [t[: t.numel() // 2], t[t.numel() // 2 :], t]  # one storage: counted once
    memory.release()
    before = memory.rss_mb()
    released = memory.release_pages(views)
    assert 63 * 2**20 <= released <= 64 * 2**20
    assert before - memory.rss_mb() > 56, "the released pages are still resident"
    # still valid: its whole pages come back zero-filled, the partial ones at its ends keep their values
    assert float(t.sum()) <= 2 * 4096 / 4
    t.fill_(2.0)  # and writable where it was
    assert float(t[-1]) == 2.0 and memory.release_pages([torch.ones(8)]) == 0  # less than a page: nothing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is read from /proc")
def test_phase_peaks_are_per_phase_and_leave_the_kernel_peak_alone():
    """Run in a fresh interpreter: the test process's own peak (models loaded by other tests) would hide it."""
    code = (
        "import time\n"
        "from rexrag import memory as m\n"
        "peaks = m.PhasePeaks()\n"
        "big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096]); time.sleep(0.05)\n"
        "del big; m.release()\n"
        "first = peaks.lap()\n"
        "small = bytearray(50 * 2**20); small[::4096] = b'x' * len(small[::4096]); time.sleep(0.05)\n"
        "second = peaks.lap(); peaks.close()\n"
        "print(first, second, m.peak_rss_mb())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    first, second, overall = map(float, out.stdout.split())
    assert first - second > 300  # the second phase does not report the first one's 400 MiB
    assert overall >= first - 5  # the kernel's peak (what /usr/bin/time reports) still holds the first phase


HEAP_PROBE = """
import sys, torch
from rexrag.memory import bound_heap_caching
if sys.argv[1] == "bound":
    assert bound_heap_caching()
x = torch.ones(16 << 20, dtype=torch.uint8); del x  # freed: by default glibc raises its mmap threshold to 16 MiB
y = torch.ones(16 << 20, dtype=torch.uint8)
heap = next(ln.split()[0] for ln in open("/proc/self/maps") if ln.rstrip().endswith("[heap]"))
lo, hi = (int(v, 16) for v in heap.split("-"))
print(lo <= y.data_ptr() < hi)
"""


@pytest.mark.parametrize("mode, on_heap", [("default", "True"), ("bound", "False")])
def test_bounded_heap_serves_large_tensors_from_their_own_mapping(mode, on_heap):
    # A subprocess: mallopt changes this process's allocator for good. By default the second 16 MiB tensor
    # comes from the heap (its pages stay resident when freed); bounded, from its own mmap.
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == on_heap


KERNEL_PROBE = """
import sys
from rexrag.memory import bound_kernel_caches
if sys.argv[1] == "bound":
    bound_kernel_caches(16)
import torch
torch.set_num_threads(1)
def anon():
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("RssAnon")) / 1024
lin, x = torch.nn.Linear(256, 512), torch.randn(400, 256, requires_grad=True)
def run(lengths):
    for n in lengths:  # every length a new matmul shape: new kernels
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x[:n])
        y.float().sum().backward()
run(range(8, 40))  # the allocator's and torch's one-off growth
base = anon()
run(range(40, 240))
print(anon() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS is read from /proc")
def test_bounded_kernel_caches_stop_rss_growing_with_new_shapes():
    # A subprocess: the caches' size is read once, when torch builds its first kernel.
    env = {k: v for k, v in os.environ.items() if k not in memory.KERNEL_CACHE_ENV}
    growth = {}
    for mode in ("default", "bound"):
        out = subprocess.run([sys.executable, "-c", KERNEL_PROBE, mode], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[mode] = float(out.stdout.split()[-1])
    # (On a CPU whose bf16 matmuls do not go through oneDNN nothing grows either way: the 16 MiB floor.)
    assert growth["bound"] < max(0.3 * growth["default"], 16), growth


def test_the_cli_bounds_kernel_caches_unless_the_user_chose(monkeypatch):
    from rexrag.cli import main

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    assert main(["demo", "--max-memory-gb", "lots"]) == 2  # refused before loading anything
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128" and os.environ["LRU_CACHE_CAPACITY"] == "512"


def test_a_loaded_model_is_not_backed_by_its_checkpoint_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rexrag.config import ModelConfig
    from rexrag.models import load_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    model = load_model(ModelConfig(name_or_path=str(tmp_path / "m")))
    with open("/proc/self/maps") as f:
        mapped = [ln for ln in f if str(tmp_path / "m") in ln]
    assert mapped == []  # read, not memory-mapped: freeing the model frees its pages
    assert sum(p.numel() for p in model.parameters()) > 0
