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
