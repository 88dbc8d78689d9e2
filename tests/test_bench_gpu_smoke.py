"""bench/gpu_smoke.py imports without a GPU; its per-phase memory log (free memory after empty_cache at a phase's
start, the peak in use, nested phases folded outwards) on a faked CUDA allocator; its memory table."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO_ROOT

GIB = 2**30


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO_ROOT / "bench" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_phase_memory_measures_free_memory_and_peaks_of_nested_phases(monkeypatch, smoke):
    cuda = torch.cuda
    state = {"free": [50 * GIB, 45 * GIB], "reserved": 2 * GIB, "peak": 2 * GIB, "calls": []}
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda: state["calls"].append("empty_cache"))
    monkeypatch.setattr(cuda, "mem_get_info", lambda: (state["calls"].append("mem_get_info"), (state["free"].pop(0), 80 * GIB))[1])
    monkeypatch.setattr(cuda, "memory_reserved", lambda: state["reserved"])
    monkeypatch.setattr(cuda, "max_memory_reserved", lambda: state["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["reserved"]))
    mem = smoke.PhaseMemory()
    mem.enter("update")  # 50 GiB free, the allocator holds 2
    state["peak"] = 10 * GIB  # the backward's peak
    state["reserved"] = 4 * GIB
    mem.enter("optimizer step")  # the outer peak is kept before the inner reset
    state["peak"] = 6 * GIB
    mem.exit()
    mem.exit()
    assert state["calls"][:2] == ["empty_cache", "mem_get_info"]
    assert mem.records["optimizer step"]["peak_used_gib"] == pytest.approx(80 - 45 + 6 - 4)
    assert mem.records["update"]["peak_used_gib"] == pytest.approx(80 - 50 + 10 - 2)
    assert mem.records["update"]["free_at_start_gib"] == pytest.approx(50)


def test_wrap_measures_each_call_and_leaves_missing_attributes(smoke):
    mem, seen = smoke.PhaseMemory(), []

    class Obj:
        def f(self, x):
            seen.append(x)
            return x + 1

    o = Obj()
    mem.wrap(o, "f", "update")
    mem.wrap(o, "missing", "rollout")
    assert o.f(1) == 2 and seen == [1] and not hasattr(o, "missing")


def test_memory_table_puts_the_prediction_beside_the_measurement(smoke):
    result = {"label": "critic", "overrides": ["algo.adv_estimator=gae"], "cuda": True,
              "phases": [{"phase": "update", "predicted_gib": 12.5, "peak_used_gib": 11.25, "free_at_start_gib": 60.0},
                         {"phase": "load", "predicted_gib": 3.0}]}
    md = smoke.memory_markdown(result)
    assert "| update | 12.50 | 11.25 | 60.00 |" in md and "| load | 3.00 | n/a | n/a |" in md
    assert set(smoke.MEMORY_PROBES) == {"rex", "rex_packed", "critic"}
    assert "algo.adv_estimator=gae" in smoke.MEMORY_PROBES["critic"]
    assert "trainer.pack_sequences=true" in smoke.MEMORY_PROBES["rex_packed"]


def test_packing_line_compares_the_packed_update_with_the_padded_one(smoke):
    memory = [{"label": "rex", "update_s": 3.0, "padding_ratio": 1.6}, {"label": "rex_packed", "update_s": 2.0,
                                                                         "padding_ratio": 1.0}]
    line = smoke.packing_markdown(memory)
    assert "3 s -> 2 s (1.50x)" in line and "1.600 -> 1.000" in line
    assert smoke.packing_markdown(memory[:1]) == ""  # no packed probe: no claim
