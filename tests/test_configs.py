"""Every shipped recipe loads through load_config, and the paper recipes carry the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rexrag.config import config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo_cpu.yaml", "search_r1_grpo_3b.yaml", "search_r1_ppo_3b.yaml", "rexrag_grpo_3b.yaml", "rexrag_grpo_7b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    # REX-RAG's kept probes join the batch: room for them keeps a step's update in one on-policy mini-batch
    room = 2 if cfg.rex.enabled and cfg.data.batch_size * cfg.rollout.n < 64 else 1
    assert cfg.data.batch_size * cfg.rollout.n * room >= cfg.trainer.mini_batch_size
    # every value the recipe writes is the value the run gets (none dropped, defaulted or mangled)
    loaded = config_to_dict(cfg)
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, written in (values or {}).items():
            got = loaded[section][key]
            if isinstance(written, str) and isinstance(got, float):
                written = float(written)  # YAML 1.1 reads 1e-6 as a string; the float field converts it
            assert got == written, f"{path.name}: {section}.{key} is {got!r}, the recipe says {written!r}"


@pytest.mark.parametrize("name", ["search_r1_grpo_3b", "search_r1_ppo_3b", "rexrag_grpo_3b", "rexrag_grpo_7b"])
def test_paper_values(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.data.batch_size, cfg.trainer.steps, cfg.trainer.lr) == (512, 1005, 1e-6)
    assert cfg.trainer.warmup_steps > 0 and cfg.trainer.ppo_epochs == 1
    assert (cfg.algo.kl_coef, cfg.algo.kl_type, cfg.rollout.temperature, cfg.retrieval.topk) == (0.001, "k3", 1.0, 3)
    # 256 trajectories per optimizer step (verl ppo_mini_batch_size=256 with rollout.n=1, n_agent=5)
    assert cfg.trainer.mini_batch_size == 256
    assert cfg.rollout.max_turns == 5 and cfg.model.name_or_path in ("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-7B")
    assert cfg.rollout.template == "search-r1"  # REX-RAG and its GRPO baseline share one template
    if name.startswith("rexrag"):
        assert cfg.rex.enabled and (cfg.rex.probe_prob, cfg.rex.keep_ratio) == (0.2, 0.08)
        assert cfg.algo.adv_estimator == "grpo" and cfg.rollout.n == 5
    else:
        assert not cfg.rex.enabled
    assert cfg.algo.adv_estimator == ("gae" if "ppo" in name else "grpo")


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_CPU", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert data["num_processes"] >= 2


def test_override_beats_recipe():
    cfg = load_config(CONFIGS / "demo_cpu.yaml", ["trainer.steps=3", "algo.adv_estimator=rloo"])
    assert cfg.trainer.steps == 3 and cfg.algo.adv_estimator == "rloo"


@pytest.mark.parametrize("name", ["fsdp.yaml", "cpu_fsdp.yaml"])
def test_fsdp_configs_resolve_to_full_shard_fsdp2_with_sharded_state(name, monkeypatch):
    """What `accelerate launch --config_file <name>` hands the FSDP plugin (accelerate's own parsing)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "accelerate" / name), "x.py"])
    args, _, _ = _validate_launch_command(args)
    for k, v in prepare_multi_gpu_env(args).items():
        if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.auto_wrap_policy is not None
    if name == "fsdp.yaml":  # the 3B/7B recipes' models
        assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"] and args.num_processes == 8
    for recipe in ("rexrag_grpo_3b.yaml", "rexrag_grpo_7b.yaml", "search_r1_grpo_3b.yaml", "search_r1_ppo_3b.yaml"):
        named = [w for w in (CONFIGS / recipe).read_text().split() if w.startswith("configs/accelerate/")]
        assert named and all((CONFIGS.parent / w).is_file() for w in named), recipe


@pytest.mark.parametrize("name", ["gpu_smoke_qwen05b", "search_r1_grpo_3b", "search_r1_ppo_3b", "rexrag_grpo_3b",
                                  "rexrag_grpo_7b"])
def test_gpu_recipes_ask_for_vllm(name):
    """A GPU recipe names its backend: a missing vLLM stops the run instead of falling back to the HF loop."""
    assert load_config(CONFIGS / f"{name}.yaml").rollout.backend == "vllm"
