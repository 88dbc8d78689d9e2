"""The weight stream across two FSDP2 processes (gloo), with failures injected into rank 1's stream part-way
(tests/stream_worker.py). Slow: one launch of two Python processes (~20 s); ``pytest -m slow -k stream``.

What must hold: a failure on one rank (its preparation of a tensor, or its LoRA merge after the gathers)
ends the sync on *both* ranks with one error naming rank 1, quickly, and the processes are still in step
afterwards (the next sync succeeds and delivers the exact weights). Before the fix rank 1 left the stream
for the agreement's object gather while rank 0 waited in the next tensor's all-gather: gloo aborts on the
size mismatch, NCCL hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

pytestmark = pytest.mark.slow


def _launch_bounded(out: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """torchrun with two workers in a session of their own, killed as a group if it runs past ``timeout``
    (a desynchronised stream must fail this test, not hang it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "REXRAG_STRICT_COLLECTIVES": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "stream_worker.py"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the two-process weight stream did not finish in {timeout} s (a hang)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_a_failure_in_one_ranks_stream_fails_every_rank_naming_it_and_keeps_them_in_step(tmp_path):
    res = _launch_bounded(tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        for kind, where in (("tied", "RuntimeError: CUDA out of memory (injected on rank 1)"),
                            ("lora", "RuntimeError: LoRA merge failed (injected on rank 1)")):
            ok, fail, after = info[f"{kind}_ok"], info[f"{kind}_fail"], info[f"{kind}_ok_after"]
            assert ok["error"] is None and ok["equal"], (kind, ok)
            err = fail["error"]
            assert err and err.startswith("EngineError: the weight sync into the vLLM engine failed on 1 of 2 processes"), err
            assert "(rank 1: WeightStreamError: the weight stream failed at " in err and where in err and "rank 0" not in err
            assert "\n" not in err and fail["seconds"] < 30
            assert after["error"] is None and after["equal"], (kind, after)  # still in step: the next sync is exact
    # the tied head is sent under its own name with the embedding's gathered tensor (21 names)
    ok = ranks[0]["tied_ok"]
    assert ranks[0]["tied_state_keys"] == 21 and len(ok["names"]) == 21 and "lm_head.weight" in ok["names"]
    assert "model.embed_tokens.weight" in ok["names"]
