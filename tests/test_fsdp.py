"""The sharded (FSDP) path with two CPU processes over gloo (slow: each launch starts two Python
processes). Select with ``pytest -m slow -k "fsdp or sharded"``.

torch 2.13's FSDP2 (``fully_shard``) runs on CPU tensors; accelerate 1.15 would silently run DDP for
an FSDP launch without CUDA, and ``rexrag.sharding.make_accelerator`` makes it real FSDP2 (each test
asserts that the parameters really are sharded DTensors).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

pytestmark = pytest.mark.slow


def _launch(config: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config.split(), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _fsdp(*args: str, timeout: int = 240):
    return _launch(f"--config_file {REPO / 'configs' / 'accelerate' / 'cpu_fsdp.yaml'}", str(HERE / "fsdp_worker.py"),
                   *args, timeout=timeout)


def test_sharded_hf_generation_runs_in_lockstep_and_matches_unsharded(tmp_path):
    """Rank 0 makes two generate() calls (3 rows x 7 tokens, then 1 row x 4), rank 1 one call (1 row x 2):
    without lockstep the sharded forwards would deadlock; with it the greedy tokens and log-probs
    equal the unsharded model's, and rank 1 served rank 0's extra forwards with dummy ones."""
    _fsdp("gen", str(tmp_path))
    ranks = [json.loads((tmp_path / f"gen_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["fsdp_module"] and r["param_type"] == "DTensor" and r["local_numel"] * 2 == r["numel"], r
        assert "FSDP" in r["distributed_type"]
        assert [[row["ids"] for row in call] for call in r["sharded"]] == [[row["ids"] for row in call] for call in r["full"]]
        for call_s, call_f in zip(r["sharded"], r["full"]):
            for a, b in zip(call_s, call_f):
                assert a["finish"] == b["finish"] and torch.allclose(torch.tensor(a["lp"]), torch.tensor(b["lp"]), atol=1e-5)
    assert [len(c) for c in ranks[0]["sharded"]] == [3, 1] and [len(c[0]["ids"]) for c in ranks[0]["sharded"]] == [7, 4]
    assert ranks[1]["dummy_forwards"] >= 7 + 4 - 2 and ranks[0]["dummy_forwards"] == 0


def _final_params(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


def test_fsdp_kill_and_resume_matches_uninterrupted_and_one_process(tmp_path):
    """Two FSDP processes: 3 steps straight == 2 steps, a new launch resuming from the sharded
    checkpoint (torch DCP shards, RNG, sampler, scheduler), 1 more step. The
    consolidated export loads as a plain model and matches one process training the same batch."""
    common = ["trainer.steps=3", "trainer.warmup_steps=2", "trainer.save_every=1"]
    _fsdp("train", str(tmp_path / "full"), *common)
    _fsdp("train", str(tmp_path / "part"), *common[1:], "trainer.steps=2")
    _fsdp("train", str(tmp_path / "part"), *common, "trainer.resume=true")
    full_info = [json.loads((tmp_path / "full" / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    res_info = [json.loads((tmp_path / "part" / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    for info in full_info + res_info:
        assert info["sharded"] and info["fsdp_module"] and info["reference_fsdp"] and info["param_type"] == "DTensor"
    assert [i["steps"] for i in res_info] == [1, 1] and res_info[0]["step_idx"] == 3
    state = tmp_path / "part" / "checkpoints" / "step_000002" / "state"
    assert sorted(p.name for p in (state / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    a, b = _final_params(tmp_path / "full", 3), _final_params(tmp_path / "part", 3)
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    fa, fb = full_info[0]["history"][-1], res_info[0]["history"][-1]
    for k in fa:
        if not k.startswith(("timing/", "memory/")):
            assert math.isclose(fa[k], fb[k], rel_tol=1e-5, abs_tol=1e-7), k
    assert fa["memory/reference_gib"] > 0
    # the export is a plain checkpoint: it loads without FSDP and equals one process on the same global batch
    from test_trainer import make_trainer

    from rexrag.config import ModelConfig
    from rexrag.models import load_model

    loaded = load_model(ModelConfig(name_or_path=str(tmp_path / "full" / "checkpoints" / "step_000003" / "model")))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.set_num_threads(1)
    one = make_trainer(tmp_path / "one", "algo.kl_coef=0.01", "trainer.mini_batch_size=16", "trainer.micro_batch_size=4",
                       *common, per_group_seed=True)
    one.train()
    single = {n: p.detach() for n, p in one.acc.unwrap_model(one.model).state_dict().items()}
    for n in a:
        assert torch.allclose(a[n], single[n], atol=2e-5, rtol=1e-4), n


def test_eval_data_parallel_sharded_questions_match_one_process(tmp_path, smol_tokenizer, tiny_model):
    """`accelerate launch` with two CPU processes: each evaluates every other question, the main
    process merges; predictions.jsonl and the scores equal a one-process run (batch size 1, so no row
    is padded with different neighbours)."""
    from rexrag.cli import main
    from rexrag.retrieval import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\nParis fact number {i}.'}) + "\n" for i in range(8)))
    build_index(corpus, "bm25", tmp_path / "idx")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Where is fact {i}?", "golden_answers": ["Paris"]}) + "\n"
                          for i in range(5)))
    tiny_model.save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    args = ["--backend", "hf", "--model", str(tmp_path / "model"), "--dataset", f"a={qa}", "--dataset", f"b={qa}",
            "--index", str(tmp_path / "idx"), "--method", "agent", "--max-turns", "1", "--max-new-tokens", "6",
            "--batch-size", "1"]
    torch.set_num_threads(1)
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    _launch("--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no",
            "-m", "rexrag.cli", "eval", *args, "--out", str(tmp_path / "two"))
    one = [json.loads(x) for x in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["id"]) for r in two] == [(d, f"q{i}") for d in "ab" for i in range(5)]
    assert one == two
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["datasets"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["datasets"]
    assert m1 == m2
