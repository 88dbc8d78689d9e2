"""The chunked LM head and packed forwards under FSDP2, two CPU processes over gloo (slow; see tests/test_fsdp.py
for how the launch becomes real FSDP2 on a CPU). Select with ``pytest -m slow -k packing_fsdp``.

The worker (tests/packing_fsdp_worker.py) compares ``models.sequence_logprobs`` on the sharded model (the head
run inside the root unit's FSDP hooks, in 5-token slices; padded and packed rows; tied and untied heads) with the
plain head of an unsharded copy (whole logits, ``log_softmax``): log-probs and the gathered gradients (FSDP
averages them over the processes). Tolerances: fp32 1e-5 on log-probs and 1e-4 relative on gradients; with
bf16 gathers (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``) bf16 rounding: 5e-2 on log-probs
and 5 % relative on gradients.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_chunked_head_under_fsdp2_equals_the_plain_head(tmp_path):
    from test_fsdp import HERE

    res = _launch_worker(tmp_path, HERE)
    for rank in (0, 1):
        cases = json.loads((tmp_path / f"head_rank{rank}.json").read_text())
        assert len(cases) == 3
        for c in cases:
            assert c["fsdp"] and c["plain_head"] and c["method_registered"], c
            assert c["param"] == "DTensor:torch.float32" and c["grad_dtype"] == "torch.float32", c  # fp32 master weights
            assert c["head_weight"].startswith("Parameter:"), c  # the head ran on gathered weights, not on a shard
            if c["mp"] == "bfloat16":
                assert c["policy"] == ["torch.bfloat16", "torch.float32"] and c["layer_weight"] == "Parameter:torch.bfloat16", c
                assert c["head_weight"] == "Parameter:torch.bfloat16", c
                assert c["lp_max_abs_diff"] < 5e-2 and c["grad_max_rel_diff"] < 5e-2, c
            else:
                assert c["policy"] is None and c["layer_weight"] == "Parameter:torch.float32", c
                assert c["lp_max_abs_diff"] < 1e-5 and c["grad_max_rel_diff"] < 1e-4, c
    assert res.returncode == 0


def _launch_worker(tmp_path, here):
    import os
    import subprocess
    import sys

    from test_fsdp import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(here), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    config = REPO / "configs" / "accelerate" / "cpu_fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(here / "packing_fsdp_worker.py"),
           str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_fsdp_training_with_packing_matches_padding(tmp_path):
    """The toy RL run (tests/fsdp_worker.py ``train``: two FSDP2 processes, a sharded KL reference, 2 steps):
    packed micro-batches train the weights the padded ones do (fp32), with no padding computed."""
    from test_fsdp import _fsdp, _final_params

    common = ["trainer.steps=2", "trainer.warmup_steps=1"]
    _fsdp("train", str(tmp_path / "padded"), *common)
    _fsdp("train", str(tmp_path / "packed"), *common, "trainer.pack_sequences=true")
    a, b = _final_params(tmp_path / "padded", 2), _final_params(tmp_path / "packed", 2)
    assert a.keys() == b.keys()
    for n in a:
        assert (a[n] - b[n]).abs().max() <= 1e-5 + 1e-4 * a[n].abs().max(), n
    hist = json.loads((tmp_path / "packed" / "info_rank0.json").read_text())["history"]
    padded = json.loads((tmp_path / "padded" / "info_rank0.json").read_text())["history"]
    assert all(m["update/padding_ratio"] == 1.0 for m in hist) and all(m["update/padding_ratio"] >= 1.0 for m in padded)
