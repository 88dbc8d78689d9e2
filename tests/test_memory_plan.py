"""rexrag.memory_plan: the estimate per part, the ladder of settings, the cap's errors, and the
commands' --max-memory-gb refusing before anything is loaded."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rexrag import cli
from rexrag.config import Config
from rexrag.memory_plan import (GIB, MemoryBudgetError, ModelShape, Workload, apply_plan, estimate, floor_bytes,
                                ladder, parse_cap_gb, plan, total, workload_from_config)
from rexrag.models import tiny_llama

from conftest import REPO_ROOT

SMOL = ModelShape(params=134_515_008, layers=30, hidden=576, kv_elements_per_token=11_520, vocab=49_152)
DEMO = Workload(SMOL, engine=True, engine_bytes=2, full_finetune=True, reference=False, critic=False,
                max_tokens=1024, micro_tokens=4096, kv_tokens=17 * 1024, step_rows=8)


def test_shape_counts_parameters_without_weights():
    model = tiny_llama(500)
    shape = ModelShape.from_config(model.config)
    c = model.config
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.kv_elements_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)


def test_estimate_of_the_demo_matches_the_measured_parts():
    parts = estimate(DEMO, ladder(DEMO)[0])
    mb = {k: v / 2**20 for k, v in parts.items()}
    assert mb["policy"] == pytest.approx(513, abs=1) and mb["optimizer"] == pytest.approx(1026, abs=1)  # 540 / 1,080 MB
    # 4 x 1024 tokens measured on random tokens: 4,205 MB
    assert mb["activations"] == pytest.approx(300 + 0.85 * 4096 + 18 * 49_152 * 512 / 2**20, rel=1e-3)
    assert mb["engine"] == pytest.approx(257 + 17 * 1024 * 11_520 * 2 / 2**20 + 436, rel=1e-3)


def test_ladder_saves_memory_at_every_rung_and_plan_takes_the_first_that_fits():
    rungs = ladder(DEMO)
    totals = [total(estimate(DEMO, s)) for s in rungs]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals) == 5
    assert plan(DEMO, 100 * GIB, "x").settings == rungs[0]
    assert plan(DEMO, totals[1], "x").settings == rungs[1]  # exactly the estimate fits
    assert plan(DEMO, totals[1] - 1, "x").settings == rungs[2]
    chosen = plan(DEMO, totals[3], "x")
    assert chosen.settings.gradient_checkpointing and chosen.settings.micro_tokens == 1024
    assert chosen.settings.kv_tokens == (8 + 1) * 1024 and chosen.settings.optimizer_state_dtype == "float32"
    assert plan(DEMO, totals[4], "x").settings.optimizer_state_dtype == "bfloat16"
    assert floor_bytes(DEMO) == totals[4] == totals[3] - 4 * SMOL.params


def test_below_the_floor_is_one_line_naming_it():
    floor = floor_bytes(DEMO)
    with pytest.raises(MemoryBudgetError) as err:
        plan(DEMO, floor - 1, "the demo")
    text = str(err.value)
    assert "\n" not in text and "below the floor for the demo" in text and f"at least {floor / GIB:.2f} GiB" in text


@pytest.mark.parametrize("value", ["abc", "", "-1", "0", "nan", "inf"])
def test_a_cap_that_is_not_a_positive_number_names_the_floor(value):
    with pytest.raises(MemoryBudgetError, match=f"at least {floor_bytes(DEMO) / GIB:.2f} GiB"):
        parse_cap_gb(value, DEMO, "the demo")
    assert parse_cap_gb("2.5", DEMO, "x") == int(2.5 * GIB)


def test_lora_and_no_engine_need_less_and_a_critic_more():
    base = total(estimate(DEMO, ladder(DEMO)[0]))
    assert total(estimate(replace(DEMO, full_finetune=False), ladder(DEMO)[0])) == base - 12 * SMOL.params
    hf = replace(DEMO, engine=False, kv_tokens=0)
    assert "engine" not in estimate(hf, ladder(hf)[0]) and len(ladder(hf)) == 4
    assert len(ladder(replace(DEMO, full_finetune=False))) == 4  # no AdamW state worth halving under LoRA
    assert total(estimate(replace(DEMO, critic=True), ladder(DEMO)[0])) > base + 16 * SMOL.params


def test_an_engine_asleep_through_the_update_counts_at_the_larger_phase():
    """Level 2: the update holds no engine weights or KV cache, the rollout no gradients or activations."""
    awake_parts = estimate(DEMO, ladder(DEMO)[3])
    asleep = replace(DEMO, engine_sleep_level=2)
    parts = estimate(asleep, ladder(asleep)[3])
    kv = 9 * 1024 * SMOL.kv_elements_per_token * 2
    assert "engine" not in parts and parts["engine asleep"] == awake_parts["engine"] - 2 * SMOL.params - kv
    assert total(parts) == total(awake_parts) - 2 * SMOL.params - kv
    kv_only = estimate(replace(DEMO, engine_sleep_level=1), ladder(asleep)[3])
    assert total(kv_only) == total(awake_parts) - kv
    # LoRA (no gradients to speak of) with a large KV cache: the rollout is the larger phase, engine awake
    lora = replace(asleep, full_finetune=False, kv_tokens=200 * 1024, micro_tokens=1024)
    rollout = estimate(lora, ladder(lora)[0])
    assert "engine" in rollout and "activations" not in rollout and "gradients" not in rollout


def test_apply_plan_changes_only_what_the_cap_needs():
    cfg = Config()
    cfg.rollout.backend, cfg.rollout.max_total_tokens, cfg.trainer.micro_batch_size = "vllm", 1024, 4
    w = workload_from_config(cfg)
    assert w.model.params == SMOL.params and w.micro_tokens == 4096 and w.reference  # kl_coef > 0 by default
    roomy = plan(w, 100 * GIB, "x")
    apply_plan(cfg, roomy)
    assert not cfg.model.gradient_checkpointing and cfg.trainer.micro_batch_tokens == 0 and cfg.rollout.vllm_kv_cache_gb == 1.0
    tight = plan(w, floor_bytes(w), "x")
    apply_plan(cfg, tight)
    assert cfg.model.gradient_checkpointing and cfg.trainer.micro_batch_tokens == 1024 and cfg.trainer.logprob_chunk_tokens == 128
    assert cfg.rollout.vllm_kv_cache_gb < 1.0 and cfg.trainer.optimizer_state_dtype == "bfloat16"
    assert workload_from_config(cfg).kv_tokens == pytest.approx(tight.settings.kv_tokens, abs=1)


def _nothing_may_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model, an index or an engine was loaded before the memory cap was checked")

    import rexrag.models
    import rexrag.retrieval
    import rexrag.train.build

    for mod, name in [(rexrag.models, "load_model"), (rexrag.models, "resolve_model_path"),
                      (rexrag.retrieval, "build_index"), (rexrag.train.build, "build_trainer")]:
        monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("value", ["1", "lots"])
def test_demo_refuses_a_cap_below_its_floor_before_loading(monkeypatch, capsys, tmp_path, value):
    _nothing_may_load(monkeypatch)
    rc = cli.main(["demo", "--quick", "--backend", "hf", "--out", str(tmp_path / "d"), "--max-memory-gb", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "at least" in err and "GiB" in err and "--max-memory-gb" in err
    assert not (tmp_path / "d").exists()


def test_the_default_cap_plans_the_floor_where_it_is_below_it_an_explicit_one_refuses():
    """A default cap below a run's floor (it was, before the engine slept through the update, for the fp32 engine
    of a CPU without bf16 units) must still run at its smallest settings, and say so; a cap the user typed is kept
    or refused. 3 GiB stands in for a default below the floor."""
    from rexrag.demo import DEFAULT_MAX_MEMORY_GB, PROFILES, memory_plan

    p = PROFILES["default"]
    with pytest.raises(MemoryBudgetError):
        memory_plan(p, "vllm", 3.0, bf16=False)
    floor = memory_plan(p, "vllm", 3.0, bf16=False, cap_is_default=True)
    assert floor.settings == ladder(floor.workload)[-1]
    assert "below this run's floor" in floor.summary() and "--max-memory-gb" in floor.summary()
    for bf16 in (True, False):  # the default cap fits either engine
        fits = memory_plan(p, "vllm", DEFAULT_MAX_MEMORY_GB, bf16=bf16, cap_is_default=True)
        assert fits.summary().startswith("memory plan for a 4 GiB cap")


@pytest.mark.parametrize("argv, default", [([], True), (["--max-memory-gb", "4"], False)])
def test_the_demo_command_says_whether_the_cap_was_typed(monkeypatch, tmp_path, argv, default):
    import rexrag.demo

    seen = {}
    monkeypatch.setattr(rexrag.demo, "run_demo", lambda out, **kw: seen.update(kw) or tmp_path / "report.md")
    assert cli.main(["demo", "--out", str(tmp_path / "d"), *argv]) == 0
    assert seen["cap_is_default"] is default and float(seen["max_memory_gb"]) == 4.0


def test_train_refuses_a_cap_below_its_floor_before_loading(monkeypatch, capsys, tmp_path):
    _nothing_may_load(monkeypatch)
    import rexrag.commands.train as train_cmd

    monkeypatch.setattr(train_cmd, "build_trainer", lambda *a, **k: pytest.fail("build_trainer ran"))
    rc = cli.main(["train", "--config", str(REPO_ROOT / "configs" / "demo_cpu.yaml"), f"trainer.out_dir={tmp_path / 'run'}",
                   "--max-memory-gb", "0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "below the floor for model" in err


def test_train_with_a_cap_that_fits_plans_and_bounds_the_heap_as_its_estimate_assumes(monkeypatch, capsys, tmp_path):
    import rexrag.memory
    from rexrag.commands.train import _plan_memory

    bounded = []
    monkeypatch.setattr(rexrag.memory, "bound_heap_caching", lambda *a: bounded.append(a) or True)
    cfg = Config()
    _plan_memory(cfg, "8")
    assert bounded and cfg.model.gradient_checkpointing
    assert capsys.readouterr().out.startswith("memory plan for a 8 GiB cap")


def test_a_local_index_counts_its_size(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "part.bin").write_bytes(b"\0" * 3_000_000)
    cfg = Config()
    cfg.retrieval.index = str(tmp_path / "idx")
    w = workload_from_config(cfg)
    assert w.index_bytes == 3_000_000 and estimate(w, ladder(w)[0])["job"] == 420 * 2**20 + 3_000_000


def test_the_demo_trains_with_its_plan(tmp_path):
    from rexrag.demo import PROFILES, _rl_config, memory_plan

    p = PROFILES["default"]
    mplan = memory_plan(p, "vllm", 4.0, bf16=True)
    cfg = _rl_config(p, "m", "idx", tmp_path, 0, "vllm", mplan=mplan, bf16=True)
    s = mplan.settings
    assert (cfg.model.gradient_checkpointing, cfg.trainer.micro_batch_tokens, cfg.trainer.optimizer_state_dtype,
            cfg.trainer.logprob_chunk_tokens) == (True, s.micro_tokens, s.optimizer_state_dtype, s.logprob_chunk_tokens)
    plain = _rl_config(p, "m", "idx", tmp_path, 0, "vllm", bf16=True)
    assert not plain.model.gradient_checkpointing and plain.trainer.optimizer_state_dtype == "float32"
