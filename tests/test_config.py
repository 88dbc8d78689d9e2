"""Tests for rexrag.config: YAML + dotted overrides, typed coercion, clear errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from rexrag.config import Config, ConfigError, config_to_dict, describe, load_config, parse_overrides
from rexrag.errors import UserError


def write(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_and_config_error_is_user_error():
    assert load_config() == Config()
    assert load_config(None, []) == Config()
    assert issubclass(ConfigError, UserError)


def test_yaml_nested_sections_and_overrides_win(tmp_path):
    p = write(tmp_path, """
model:
  name_or_path: some/dir
  lora_rank: 8
trainer:
  lr: 1e-6          # PyYAML reads this as a string; it must still become a float
  steps: 20
rex:
  enabled: true
""")
    cfg = load_config(p, ["trainer.steps=5", "rex.keep_ratio=0.1", "model.lora_alpha=16"])
    assert cfg.model.name_or_path == "some/dir" and cfg.model.lora_rank == 8 and cfg.model.lora_alpha == 16
    assert cfg.trainer.lr == 1e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.steps == 5  # override beats file
    assert cfg.rex.enabled is True and cfg.rex.keep_ratio == 0.1
    assert cfg.algo == Config().algo  # untouched sections keep defaults


def test_empty_section_means_defaults(tmp_path):
    p = write(tmp_path, "model:\n  # nothing set yet\ntrainer:\n  steps: 3\n")
    cfg = load_config(p)
    assert cfg.model == Config().model and cfg.trainer.steps == 3


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["trainer.lrr=1"], r"unknown config key 'trainer\.lrr'.*'lr'"),
        (["trainer.lrr=1"], r"did you mean 'lr'"),
        (["modle.dtype=float32"], r"unknown config key 'modle'.*'model'"),
        (["model.lora_rank.x=1"], r"model\.lora_rank"),
    ],
)
def test_unknown_keys_name_key_and_allowed(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout\.temprature'.*'temperature'"):
        load_config(write(tmp_path, "rollout:\n  temprature: 0.5\n"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["trainer.steps=abc"], r"trainer\.steps expects int, got 'abc'"),
        (["trainer.steps=3.5"], r"trainer\.steps expects an integer, got 3\.5"),
        (["trainer.steps=true"], r"trainer\.steps expects int"),
        (["trainer.lr=fast"], r"trainer\.lr expects float"),
        (["rex.enabled=maybe"], r"rex\.enabled expects true/false"),
        (["model=big"], r"model expects a mapping"),
    ],
)
def test_bad_value_types(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_types_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batch_size expects int"):
        load_config(write(tmp_path, "data:\n  batch_size: [1, 2]\n"))
    with pytest.raises(ConfigError, match=r"model\.lora_target expects a list"):
        load_config(write(tmp_path, "model:\n  lora_target: {a: 1}\n"))
    with pytest.raises(ConfigError, match=r"trainer expects a mapping"):
        load_config(write(tmp_path, "trainer: 5\n"))
    with pytest.raises(ConfigError, match=r"model\.name_or_path.*quote"):
        load_config(write(tmp_path, "model:\n  name_or_path: yes\n"))  # YAML 1.1 turns `yes` into True


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.dtype=float8"], r"model\.dtype='float8' is not allowed; choose one of \['float32', 'bfloat16', 'float16'\]"),
        (["algo.adv_estimator=ppo"], r"algo\.adv_estimator='ppo'.*'grpo'"),
        (["rex.correction=full"], r"rex\.correction.*'rex_token'"),
        (["rex.probe_prob=1.5"], r"rex\.probe_prob must be in \[0, 1\]"),
        (["trainer.micro_batch_size=32"], r"micro_batch_size must be <= trainer\.mini_batch_size"),
        (["model.lora_rank=-1"], r"model\.lora_rank must be >= 0"),
    ],
)
def test_choices_and_cross_field_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_cross_field_rule_fixed_by_override(tmp_path):
    p = write(tmp_path, "trainer:\n  micro_batch_size: 32\n")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(p)
    assert load_config(p, ["trainer.mini_batch_size=64"]).trainer.micro_batch_size == 32


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("q_proj,v_proj", ["q_proj", "v_proj"]),
        ("q_proj, v_proj ,", ["q_proj", "v_proj"]),  # spaces and trailing comma
        ("q_proj", ["q_proj"]),
        ("", []),
        ("[q_proj, k_proj]", ["q_proj", "k_proj"]),  # YAML flow list
    ],
)
def test_lists_from_strings(raw, expected):
    assert load_config(None, [f"model.lora_target={raw}"]).model.lora_target == expected


def test_lists_in_yaml_and_files_with_commas(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train_files: [a.jsonl, b.parquet]\n"))
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert load_config(None, ["data.train_files=x.jsonl,y.jsonl"]).data.train_files == ["x.jsonl", "y.jsonl"]


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("false", False), ("True", True), ("yes", True), ("no", False), ("1", True),
     ("0", False), ("on", True), ("off", False)],
)
def test_bool_parsing(raw, expected):
    assert load_config(None, [f"rex.enabled={raw}"]).rex.enabled is expected


@pytest.mark.parametrize(
    "raw",
    ["2026-11-22", "0.10", "yes", "null", "007", "runs/a=b", "1e-6", "~/models/x"],
)
def test_string_overrides_keep_the_text(raw):
    # A string field gets exactly what was typed, not YAML's reading of it (a date, a float, True, None).
    assert load_config(None, [f"model.name_or_path={raw}"]).model.name_or_path == raw


def test_numbers_from_overrides():
    cfg = load_config(None, ["trainer.lr=1e-6", "trainer.steps=1_000", "rollout.temperature=0", "trainer.steps=7"])
    assert cfg.trainer.lr == 1e-6 and cfg.rollout.temperature == 0.0 and isinstance(cfg.rollout.temperature, float)
    assert cfg.trainer.steps == 7  # later override wins
    assert load_config(None, ["trainer.steps=4.0"]).trainer.steps == 4


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["trainer.steps"])
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["model=x", "model.dtype=float32"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == Config()  # an empty file is all defaults


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.lora_rank=4", "rex.enabled=true", "data.train_files=a,b", "trainer.lr=3e-5"])
    p = write(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(p) == cfg


def test_describe_documents_every_field():
    rows = describe()
    keys = [k for k, _, _ in rows]
    n_fields = sum(len(dataclasses.fields(type(getattr(Config(), f.name)))) for f in dataclasses.fields(Config))
    assert len(keys) == len(set(keys)) == n_fields
    assert all(doc for _, _, doc in rows)
    assert ("trainer.lr", 1e-6) in [(k, d) for k, d, _ in rows]


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000/retrieve", "ftp://host/retrieve", "http://", "http://h:port/x"])
def test_malformed_retriever_url_is_a_config_error_naming_the_key(url):
    from rexrag.config import RetrievalConfig

    with pytest.raises(ConfigError, match=r"retrieval\.url=.*http://127\.0\.0\.1:8000/retrieve"):
        RetrievalConfig(url=url)
    assert RetrievalConfig(url="http://127.0.0.1:8000/retrieve").url  # a good one passes


def test_eval_cli_rejects_a_malformed_url_before_loading_a_model(tmp_path, capsys):
    from rexrag.cli import main

    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n')
    rc = main(["eval", "--backend", "hf", "--model", str(tmp_path / "no-such-model"), "--dataset", f"d={qa}",
               "--method", "rag", "--retriever-url", "localhost:8000", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "retrieval.url='localhost:8000'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
