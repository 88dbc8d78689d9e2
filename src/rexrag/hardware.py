"""What the hardware is fast at: the one place that decides whether bf16 pays off.

bf16 only speeds things up where matrix units compute in it: CUDA GPUs with bf16 support, and CPUs
with AMX or AVX512-BF16. Elsewhere (e.g. an AVX-512 CPU without the BF16 extension) PyTorch emulates
bf16 matmuls and they run several times *slower* than fp32 (measured on such a 2-core machine:
30 GFLOP/s bf16 against 151 fp32), so bf16 must not be a blind default.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_fast_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bf16 matmuls run on matrix units (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def default_compute_dtype(device: str | torch.device) -> str:
    """The rollout engines' ``auto`` dtype: bf16 where matmuls are fast in bf16, fp32 elsewhere."""
    return "bfloat16" if has_fast_bf16(device) else "float32"


def cpu_description() -> str:
    """The CPU model, core count and the flags that decide matmul speed, for benchmark records."""
    import os

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512f"} & _cpu_flags())
    return f"{model} ({os.cpu_count()} cores; flags: {', '.join(flags) or 'no AVX-512'})"


def run_record(command: str) -> dict:
    """The header of a benchmark record: machine, date, the command and the load average before it
    (``finish_record`` adds the load after), so every figure says how quiet the machine was."""
    import os
    import time

    return {"cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"), "load_before": round(os.getloadavg()[0], 2),
            "command": command}


def finish_record(record: dict) -> dict:
    import os

    record["load_after"] = round(os.getloadavg()[0], 2)
    return record
