"""rexrag.memory: the figures behind memory/* metrics, and release()."""

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
