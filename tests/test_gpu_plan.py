"""rexrag.gpu_plan: closed-form phases on a hand-built shape, the derived engine share, the one-line errors,
`rexrag train --plan` offline on the recipes, the check before any model loads, the engine's share at start
(cache emptied first, the plan's reserve kept back) and probe scoring in micro-batches of its own size."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rexrag import cli, gpu_plan
from rexrag.config import load_config
from rexrag.errors import ConfigError, UserError
from rexrag.gpu_plan import (ALLOCATOR_SLACK, CUDA_CONTEXT, ENGINE_GRAPHS, GIB, KNOWN_SHAPES, NCCL_BUFFERS, SHARE_MARGIN, SHARE_STEP,
                             GpuPlanError, Layout, Run, Shape, engine_minimum, engine_parts, find_shape, phases, plan_gpu,
                             planned_gpu_memory, score_rows, total)

from conftest import REPO_ROOT

SHAPE = Shape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1000, tie_word_embeddings=True)
CONFIGS = REPO_ROOT / "configs"


def test_known_shapes_give_the_published_parameter_counts():
    published = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688,
                 "qwen2.5-7b": 7_615_616_512}
    assert {k: KNOWN_SHAPES[k].params for k in published} == published
    assert find_shape("Qwen/Qwen2.5-7B-Instruct")[0] is KNOWN_SHAPES["qwen2.5-7b"]


def test_shape_from_a_config_json_counts_what_transformers_builds(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    shape, source = find_shape(str(tmp_path))
    assert shape.params == n and shape.attention_bias and source.endswith("config.json")


def test_unknown_model_offline_is_one_line_naming_the_known_shapes():
    with pytest.raises(UserError, match=r"no config.json at hand .*qwen2.5-3b"):
        find_shape("nobody/not-a-model-xyz")


def test_phases_in_closed_form_on_a_hand_built_shape():
    s, pb, w, t = SHAPE, 4, 2, 4 * 100
    run = Run(SHAPE, micro_tokens=t, max_tokens=100, head_chunk=32, score_tokens=200, sleep_level=2, cuda_graphs=True,
              gather_bytes=2)  # FSDP2 gathers and computes in bf16, master weights fp32
    lay = Layout(gpus=w, gpu_bytes=4 * GIB, sharding="fsdp")
    p = phases(run, lay, share_bytes=GIB)
    P = s.params
    assert P == 1000 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64  # tied head, no bias
    upd = p["update"]
    assert upd["policy weights"] == P * pb // w and upd["reference (bf16)"] == P * 2 // w
    assert upd["optimizer moments"] == P * 8 // w and upd["gradients"] == P * pb // w
    # gradient checkpointing: one bf16 residual row a layer a token, plus one layer's (24h + 8i) bytes a token
    assert upd["activations"] == s.layers * t * 64 * 2 + t * (24 * 64 + 8 * 128)
    assert upd["LM-head logits"] == (18 * 1000 * 32 if gpu_plan.FSDP_HEAD_CHUNKED else 12 * 1000 * t)
    root, layer = s.root_params, s.layer_params
    assert upd["FSDP gathered weights"] == (root + 2 * layer) * 2 + (root + layer) * 4  # bf16 gathers, fp32 gradients
    transient = sum(upd[k] for k in ("activations", "LM-head logits", "FSDP gathered weights", "gradients"))
    assert upd["allocator slack"] == ALLOCATOR_SLACK + int(0.1 * transient)
    assert "engine share (awake)" not in upd and upd["engine CUDA graphs"] == ENGINE_GRAPHS  # asleep: graphs only
    assert p["rollout"]["engine share (awake)"] == GIB and p["probe scoring"]["engine share (awake)"] == GIB
    score = p["probe scoring"]
    assert score["activations"] == 200 * (16 * 64 + 6 * 128) + 200 * 64 * 2  # one layer live + the decoder output
    assert score["LM-head logits"] == 10 * 1000 * (32 if gpu_plan.FSDP_HEAD_CHUNKED else 200)
    assert p["load"] == {"CUDA context": CUDA_CONTEXT, "policy (whole)": P * pb, "reference copy": P * pb}
    assert p["rollout"]["NCCL buffers"] == NCCL_BUFFERS


def test_derived_share_fits_the_largest_awake_phase_and_sizes_the_kv_cache():
    run = Run(SHAPE, micro_tokens=400, max_tokens=100, score_tokens=200)
    lay = Layout(2, 8 * GIB)
    plan = plan_gpu(run, lay)
    bare = phases(run, lay, 0)
    other = max(total(bare["rollout"]), total(bare["probe scoring"]))
    room = 8 * GIB * (1 - SHARE_MARGIN) - other
    assert plan.share == pytest.approx(math.floor(room / (8 * GIB) / SHARE_STEP) * SHARE_STEP)
    assert plan.kv_tokens == (int(plan.share * 8 * GIB) - total(engine_parts(run))) // SHAPE.kv_bytes_per_token()
    start = sum(v for k, v in gpu_plan._residents(run, lay).items() if k != "optimizer moments")
    assert plan.reserve_after_start == other - start  # the moments and the probe-scoring forward, still to come
    assert plan.problem is None and all(total(p) <= 8 * GIB for p in plan.phases.values())


def test_critic_moments_and_probe_scoring_shrink_the_share():
    lay = Layout(8, 80 * GIB)
    base = Run(KNOWN_SHAPES["qwen2.5-3b"], micro_tokens=4608, score_tokens=0)
    critic, rex = plan_gpu(replace(base, critic=True), lay), plan_gpu(replace(base, score_tokens=4608), lay)
    plain = plan_gpu(base, lay)
    P, dec = base.shape.params, base.shape.decoder_params + base.shape.hidden + 1
    assert critic.phases["rollout"]["optimizer moments"] == (P + dec) * 8 // 8  # the critic's moments are planned
    assert critic.share < plain.share and rex.share < plain.share
    assert "probe scoring" in rex.phases and "probe scoring" not in plain.phases


def test_explicit_share_that_cannot_fit_names_the_setting_the_phase_and_the_numbers():
    plan = plan_gpu(Run(KNOWN_SHAPES["qwen2.5-3b"], micro_tokens=4608, score_tokens=4608, share=0.95), Layout(8, 80 * GIB))
    with pytest.raises(GpuPlanError, match=r"^rollout.vllm_gpu_memory_utilization=0.95 does not fit the probe scoring "
                                           r"phase: .* = \d+\.\d GiB > 80.0 GiB of the GPU"):
        plan.check()


def test_a_probe_scoring_forward_that_leaves_no_engine_names_its_micro_batch():
    run = Run(KNOWN_SHAPES["qwen2.5-7b"], micro_tokens=4608, score_tokens=64 * 4608)
    plan = plan_gpu(run, Layout(8, 80 * GIB))
    assert plan.share * 80 * GIB < engine_minimum(run)
    assert plan.problem.startswith("rex.score_micro_batch_size: the probe scoring phase leaves the vLLM engine ")
    n = int(plan.problem.split("fits at rex.score_micro_batch_size=")[1].split(")")[0])
    assert plan_gpu(replace(run, score_tokens=n * 4608), Layout(8, 80 * GIB)).problem is None


def test_an_update_that_cannot_fit_names_the_micro_batch():
    run = Run(KNOWN_SHAPES["qwen2.5-3b"], micro_tokens=8 * 4608, gradient_checkpointing=False)
    plan = plan_gpu(run, Layout(8, 40 * GIB))
    phase = plan.problem.split(" phase does not fit (trainer.micro_batch_size: 36864 tokens a forward)")[0].removeprefix("the ")
    assert phase in ("log-probs", "update") and "> 40.0 GiB of the GPU" in plan.problem and "\n" not in plan.problem
    assert "model.gradient_checkpointing=true" in plan.problem
    n = int(plan.problem.split("fits at trainer.micro_batch_size=")[1].split(")")[0])
    assert total(plan_gpu(replace(run, micro_tokens=n * 4608), Layout(8, 40 * GIB)).phases[phase]) <= 40 * GIB
    load = plan_gpu(replace(run, micro_tokens=4608), Layout(8, 20 * GIB)).problem
    assert load.startswith("the load phase does not fit: CUDA context 0.6 + policy (whole) 11.5 + reference copy 11.5")


def test_ddp_holds_everything_and_buckets_on_every_gpu():
    run = Run(KNOWN_SHAPES["qwen2.5-7b"], micro_tokens=4608)
    plan = plan_gpu(run, Layout(8, 80 * GIB, "ddp"))
    P = run.shape.params
    assert plan.phases["update"]["DDP gradient buckets"] == 4 * P and plan.phases["update"]["optimizer moments"] == 8 * P
    assert plan.problem.startswith("the trainer's state alone does not fit one GPU: ") and "shard it (FSDP2" in plan.problem


def test_plan_command_prints_the_table_for_a_recipe_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["train", "--config", str(CONFIGS / "rexrag_grpo_7b.yaml"), "--plan", "--gpus", "8", "--gpu-memory-gb", "80",
                   "trainer.micro_batch_size=1", "rex.score_micro_batch_size=1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "7.62B parameters" in out and "8 x 80 GiB, FSDP" in out and "published config.json" in out
    header = next(line for line in out.splitlines() if line.startswith("| part"))
    for phase in ("load", "weight sync", "rollout", "probe scoring", "log-probs", "update", "optimizer step"):
        assert phase in header
    assert "engine share (rollout.vllm_gpu_memory_utilization): 0." in out and "fits: every phase" in out


def test_plan_command_that_cannot_fit_prints_then_stops_with_one_line(capsys):
    rc = cli.main(["train", "--config", str(CONFIGS / "search_r1_ppo_3b.yaml"), "--plan", "--gpus", "8",
                   "--gpu-memory-gb", "24"])
    cap = capsys.readouterr()
    assert rc == 2 and "| part" in cap.out
    err = cap.err.strip()
    assert "\n" not in err and err.startswith("rexrag train: error: the ") and "> 24.0 GiB of the GPU" in err


def _fake_cuda(monkeypatch, gib: float, world: int = 8):
    class Props:
        total_memory = int(gib * GIB)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: Props())
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")


def test_train_on_cuda_refuses_before_any_model_loads(monkeypatch, capsys, tmp_path):
    from rexrag.commands import train

    _fake_cuda(monkeypatch, 20)
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = cli.main(["train", "--config", str(CONFIGS / "rexrag_grpo_3b.yaml"), "rollout.backend=hf",
                   f"trainer.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "phase does not fit" in err and "> 20.0 GiB of the GPU" in err


def test_the_engine_gets_the_plans_reserve_only_while_it_starts(monkeypatch):
    _fake_cuda(monkeypatch, 80)
    cfg = load_config(CONFIGS / "rexrag_grpo_7b.yaml", ["trainer.micro_batch_size=1", "rex.score_micro_batch_size=1"])
    with planned_gpu_memory(cfg) as plan:
        assert cfg.rollout.vllm_gpu_reserve_gb == pytest.approx(plan.reserve_after_start / GIB)
        assert plan.reserve_after_start > plan.phases["rollout"]["optimizer moments"]  # + the scoring forward
    assert cfg.rollout.vllm_gpu_reserve_gb == -1  # the saved config keeps "from the plan"


def test_engine_share_at_start_empties_the_cache_then_keeps_the_reserve_back(monkeypatch, tiny_model):
    from rexrag.rollout import weights

    calls = []
    monkeypatch.setattr(weights.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(weights.torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(weights.torch.cuda, "mem_get_info", lambda: calls.append("mem_get_info") or (60 * GIB, 80 * GIB))
    cfg = load_config(None, ["rollout.vllm_gpu_reserve_gb=10", "rollout.max_total_tokens=64"]).rollout
    assert weights.engine_gpu_share(tiny_model, cfg) == pytest.approx(50 / 80)
    assert calls == ["empty_cache", "mem_get_info"]
    cfg.vllm_gpu_reserve_gb = 59.9999
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UserError, match=r"^rank 5: the engine-start phase leaves the vLLM engine 0.0 GiB \(60.0 GiB free of "
                                        r"80.0, 60.0 GiB kept back"):
        weights.engine_gpu_share(tiny_model, cfg)
    cfg.vllm_gpu_memory_utilization = 0.8
    with pytest.raises(UserError, match=r"rollout.vllm_gpu_memory_utilization=0.8 asks the engine-start phase for 64.0 GiB, "
                                        r"but 60.0 GiB of 80.0 are free"):
        weights.engine_gpu_share(tiny_model, cfg)
    cfg.vllm_gpu_memory_utilization = 0.5
    assert weights.engine_gpu_share(tiny_model, cfg) == 0.5


def test_fsdp_head_flag_says_what_rexrag_models_does(monkeypatch, tiny_model):
    import rexrag.sharding
    from rexrag.logprobs import _has_plain_head

    monkeypatch.setattr(rexrag.sharding, "is_fsdp_module", lambda m: True)
    assert _has_plain_head(tiny_model) == gpu_plan.FSDP_HEAD_CHUNKED, (
        "rexrag.models changed how the LM head runs under FSDP2: flip rexrag.gpu_plan.FSDP_HEAD_CHUNKED")


def test_score_rows_default_and_bad_value():
    cfg = load_config(None, ["trainer.micro_batch_size=4"])
    assert score_rows(cfg) == 4
    cfg.rex.score_micro_batch_size = 2
    assert score_rows(cfg) == 2
    cfg.rex.score_micro_batch_size = -1
    with pytest.raises(ConfigError, match="rex.score_micro_batch_size must be >= 0"):
        score_rows(cfg)


@pytest.mark.usefixtures("one_thread")
def test_probe_scoring_runs_micro_batches_of_its_own_size(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_rl import ToyRollout, toy_config, toy_examples, toy_model, toy_tokenizer

    from rexrag.train.trainer import Trainer

    def trainer(*overrides):
        cfg = toy_config(tmp_path, "rex.enabled=true", *overrides)
        model = toy_model()
        tr = Trainer(cfg, model, toy_tokenizer(), toy_examples(), rollout_fn=ToyRollout(model), progress=False)
        return tr, model

    tr, model = trainer("rex.score_micro_batch_size=1")
    trajs = ToyRollout(model)(toy_examples()[:3], 1)
    rows = []
    model.get_decoder().register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    scores = tr.score_fn(trajs)
    assert rows == [1, 1, 1] and tr.tc.micro_batch_size == 8  # the trainer's own split is back
    rows.clear()
    tr.cfg.rex.score_micro_batch_size = 0  # trainer.micro_batch_size (8): one forward
    again = tr.score_fn(trajs)
    assert rows == [3]
    for a, b in zip(scores, again):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
