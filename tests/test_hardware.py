"""bf16 is chosen only where the hardware computes it on matrix units."""

from __future__ import annotations

import torch

from rexrag import hardware
from rexrag.hardware import default_compute_dtype


def test_bf16_only_with_matrix_units(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not hardware.has_fast_bf16("cpu") and default_compute_dtype(torch.device("cpu")) == "float32"
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flag=flag: frozenset({"avx512f", flag}))
        assert hardware.has_fast_bf16("cpu") and default_compute_dtype(torch.device("cpu")) == "bfloat16"


def test_reads_this_machines_flags():
    """The parsed flags agree with what torch detected on this CPU (a wrong field would not)."""
    flags, capability = hardware._cpu_flags(), torch.backends.cpu.get_cpu_capability()
    assert "fpu" in flags
    if capability.startswith("AVX512"):
        assert "avx512f" in flags
    if capability.startswith("AVX2") or capability.startswith("AVX512"):
        assert "avx2" in flags


def test_run_record_names_the_machine_and_the_load_around_a_benchmark():
    from rexrag.hardware import cpu_description, finish_record, run_record

    rec = run_record("python bench/x.py --n 1")
    assert rec["cpu"] == cpu_description() and "cores" in rec["cpu"] and rec["command"] == "python bench/x.py --n 1"
    assert rec["load_before"] >= 0 and "load_after" not in rec
    assert finish_record(rec)["load_after"] >= 0
