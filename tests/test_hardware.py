"""bf16 is chosen only where the hardware computes it on matrix units."""

from __future__ import annotations

import torch

from rexrag import hardware
from rexrag.rollout.vllm_backend import default_engine_dtype


def test_bf16_only_with_matrix_units(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not hardware.has_fast_bf16("cpu") and default_engine_dtype(torch.device("cpu")) == "float32"
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(hardware, "_cpu_flags", lambda flag=flag: frozenset({"avx512f", flag}))
        assert hardware.has_fast_bf16("cpu") and default_engine_dtype(torch.device("cpu")) == "bfloat16"


def test_reads_this_machines_flags():
    flags = hardware._cpu_flags()
    assert hardware.has_fast_bf16("cpu") == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert not flags or "fpu" in flags  # the flags line was parsed, not an empty or wrong field
