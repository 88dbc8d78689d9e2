"""The collectives' strict mode: NCCL's rules checked on a gloo group, so a collective that works on the
CPU but would crash on GPUs fails here (one process, world size 1, the distributed paths called
directly). The test suite runs with ``REXRAG_STRICT_COLLECTIVES=1`` (tests/conftest.py)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.distributed as dist

from rexrag import sharding
from rexrag.rex.comm import DistComm
from rexrag.sharding import CollectiveError


@pytest.fixture
def group(tmp_path, monkeypatch):
    """A one-process gloo group in strict mode; torch.distributed's functions restored afterwards."""
    monkeypatch.setenv(sharding.STRICT_ENV, "1")
    for name in sharding._WRAPPED:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, getattr(dist, name))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    assert sharding.install_strict_mode()
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_as(module: str, code: str, **names):
    """Run ``code`` as if it were written in the rexrag module ``module``."""
    exec(compile(textwrap.dedent(code), f"<{module}>", "exec"), {"__name__": module, "torch": torch, "dist": dist, **names})


def test_rex_rag_reductions_run_through_the_strict_path(group):
    comm = DistComm()
    assert comm.sum([1, 2.5]) == [1.0, 2.5]
    assert comm.gather([0.5, 1]) == [[0.5, 1.0]]
    assert sharding.reduce_values([3.0, -1.0], "min") == [3.0, -1.0]
    assert sharding.all_agree(True) and not sharding.all_agree(False)
    sharding.barrier()


def test_a_cpu_tensor_all_reduced_outside_sharding_fails_like_on_nccl(group):
    # what rex/comm.py did before: a tensor created on the CPU, all-reduced directly
    with pytest.raises(CollectiveError, match="rexrag.rex.comm"):
        _run_as("rexrag.rex.comm", "t = torch.tensor([1.0], dtype=torch.float64)\ndist.all_reduce(t)")
    with pytest.raises(CollectiveError, match="rexrag.sharding"):
        _run_as("rexrag.train.trainer", "out = [None]\ndist.all_gather_object(out, 1)")


def test_inside_sharding_only_tensors_made_on_the_comm_device_may_be_sent(group):
    with pytest.raises(CollectiveError, match="comm_tensor"):
        _run_as("rexrag.sharding", "dist.all_reduce(torch.zeros(2))")
    _run_as("rexrag.sharding", "dist.all_reduce(comm_tensor([1.0]))", comm_tensor=sharding.comm_tensor)
    with pytest.raises(CollectiveError, match="comm_tensor"):
        sharding.check_sendable(torch.ones(1), "test")


def test_object_collectives_carry_plain_python_only(group, monkeypatch):
    monkeypatch.setattr(sharding, "_world", lambda: (2, 0))  # the one-process shortcut off
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    assert sharding.gather_objects({"a": 1.0}) == [{"a": 1.0}, {"a": 1.0}]
    with pytest.raises(CollectiveError, match="tensor inside"):
        sharding.gather_objects({"a": [torch.zeros(1)]})


def test_other_libraries_and_tests_are_not_policed(group):
    dist.all_reduce(torch.ones(1))  # called from a test module: FSDP, DDP and accelerate call these too


def test_strict_mode_off_wraps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(sharding.STRICT_ENV, "0")
    before = dist.all_reduce
    assert not sharding.install_strict_mode() and dist.all_reduce is before


def test_a_deepspeed_launch_is_refused_with_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from rexrag.errors import UserError

    with pytest.raises(UserError, match="DeepSpeed.*configs/accelerate/fsdp.yaml"):
        sharding.check_supported(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    sharding.check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_the_gpu_nccl_check_script_runs_its_checks_over_gloo(tmp_path):
    """scripts/gpu_nccl_check.py is what a lent GPU runs; its --cpu mode keeps it working in between."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_nccl_check.py"
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, str(script), str(out), "--cpu"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MASTER_PORT": "29541"})
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    checks = {r["check"]: r["ok"] for r in json.loads(out.read_text())["results"]}
    assert checks == {"strict_refuses_cpu_tensors": True, "reductions": True, "lockstep_and_agreement": True,
                      "weight_stream": True}
