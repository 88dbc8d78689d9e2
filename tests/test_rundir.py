"""The run directory (issue 13): the resolved config saved at start and used by --resume, conflicting
overrides refused by name, a torn metrics line tolerated, fresh runs refusing an old run's directory,
--overwrite removing only the run's entries, and examples needing unique group ids."""

from __future__ import annotations

import json

import pytest
from toy_rl import ToyRollout, early_target_reward, toy_config, toy_examples, toy_model, toy_tokenizer

from rexrag.cli import build_parser
from rexrag.commands.train import _resolve_config
from rexrag.config import load_config
from rexrag.data import QAExample
from rexrag.errors import ConfigError, DataError, UserError
from rexrag.train import rundir
from rexrag.train.logging import read_metrics
from rexrag.train.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out, *overrides, examples=None):
    cfg = toy_config(out, *overrides)
    model = toy_model()
    roll = ToyRollout(model, seed=cfg.trainer.seed)
    tr = Trainer(cfg, model, toy_tokenizer(), examples or toy_examples(), rollout_fn=roll, reward_fn=early_target_reward,
                 progress=False)
    roll.trainer = tr
    return tr


def _cli(*argv):
    return _resolve_config(build_parser().parse_args(["train", *argv]))


def test_config_saved_fresh_run_refused_and_overwrite_is_narrow(tmp_path):
    out = tmp_path / "run"
    tr = _trainer(out, "trainer.steps=1", "retrieval.api_key=s3cret", "retrieval.index=idx")
    tr.train()
    saved = rundir.load_saved_config(out)
    assert saved.retrieval.index == "idx" and saved.trainer.steps == 1 and saved.rollout.n == tr.cfg.rollout.n
    assert saved.retrieval.api_key == "" and "s3cret" not in (out / "config.yaml").read_text()
    # a fresh run in the same directory is refused, naming what is there and the ways out
    with pytest.raises(UserError, match=r"already holds a run \(config.yaml, metrics.jsonl, checkpoints/\).*--resume.*--overwrite"):
        _trainer(out, "trainer.steps=1").train()
    # --overwrite removes the run's entries only
    (out / "index").mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = _cli("--overwrite", f"trainer.out_dir={out}")
    assert cfg.trainer.out_dir == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["index", "notes.txt"]
    _trainer(out, "trainer.steps=1").train()  # now a fresh run may start
    with pytest.raises(UserError, match="exclude each other"):
        _cli("--overwrite", "--resume", f"trainer.out_dir={out}")


def test_resume_uses_the_saved_config_and_names_conflicting_keys(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  name_or_path: smollm2-135m\nretrieval:\n  index: ''\ntrainer:\n  steps: 10\n  lr: 1.0e-5\n")
    first = load_config(recipe, [f"trainer.out_dir={out}", "retrieval.index=runs/idx_bm25", "model.name_or_path=runs/warmup",
                                 "trainer.steps=20", "rollout.n=3", "retrieval.api_key=k1"])
    rundir.save_config(out, first)
    # the README's --resume line: the run's own index and model, not the demo corpus / default model
    cfg = _cli("--resume", f"trainer.out_dir={out}")
    assert (cfg.retrieval.index, cfg.model.name_or_path, cfg.rollout.n, cfg.trainer.steps) == ("runs/idx_bm25", "runs/warmup", 3, 20)
    assert cfg.trainer.resume and cfg.retrieval.api_key == ""
    # training further and re-supplying the secret are not conflicts
    cfg = _cli("--resume", f"trainer.out_dir={out}", "trainer.steps=40", "retrieval.api_key=k1")
    assert cfg.trainer.steps == 40 and cfg.retrieval.api_key == "k1" and cfg.rollout.n == 3
    # nor is evaluating during the resumed part of the run
    cfg = _cli("--resume", f"trainer.out_dir={out}", "trainer.eval_every=5", "data.eval_files=[x.jsonl]", "data.eval_limit=9")
    assert (cfg.trainer.eval_every, cfg.data.eval_files, cfg.data.eval_limit) == (5, ["x.jsonl"], 9)
    # the recipe again on resume: every key it changes is named
    with pytest.raises(ConfigError) as err:
        _cli("--config", str(recipe), "--resume", f"trainer.out_dir={out}", "rollout.n=3")
    msg = str(err.value)
    assert "changes model.name_or_path, retrieval.index (" in msg and "--allow-override" in msg
    assert "run has 'runs/idx_bm25', command line ''" in msg and "rollout.n" not in msg.split("(")[0]
    cfg = _cli("--config", str(recipe), "--resume", "--allow-override", f"trainer.out_dir={out}")
    assert (cfg.retrieval.index, cfg.model.name_or_path, cfg.trainer.steps, cfg.rollout.n) == ("", "smollm2-135m", 10, 3)
    with pytest.raises(UserError, match="--resume only"):
        _cli("--allow-override", f"trainer.out_dir={out}")


def test_torn_metrics_line_is_tolerated_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    _trainer(out, "trainer.steps=2", "trainer.save_every=1").train()
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as fh:
        fh.write('{"step": 3, "reward/mean": 0.')  # killed in the middle of writing step 3
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    resumed = _trainer(out, "trainer.steps=3", "trainer.resume=true")
    assert len(resumed.train()) == 1
    assert "dropped a torn last line" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3]
    lines = metrics.read_text().splitlines()
    lines[0] = lines[0][:10]  # a damaged line that is not the last one is an error naming it
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:1: not a JSON record"):
        read_metrics(metrics)
    json.loads(lines[1])


def test_examples_need_unique_group_ids(tmp_path):
    same = [QAExample(id=f"q{i}", question="q", golden_answers=["c"]) for i in range(16)]
    with pytest.raises(UserError, match=r"example 0 \('q0'\) has group_id=-1.*assign_group_ids"):
        _trainer(tmp_path, examples=same)
    for i, ex in enumerate(same):
        ex.group_id = i % 8
    with pytest.raises(UserError, match="group_id 0 is shared by 2 examples"):
        _trainer(tmp_path, examples=same)


def test_resume_without_a_run_stops_naming_the_directory(tmp_path, capsys):
    """A mistyped out_dir with --resume used to start a fresh run silently (defaults, demo data)."""
    from rexrag.cli import main

    missing = tmp_path / "runs" / "typo"
    assert main(["train", "--resume", f"trainer.out_dir={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} holds no run" in err and err.count("\n") == 1
    assert not missing.exists()  # nothing written there
    # a run directory whose checkpoints are gone (or were never written): the trainer refuses too
    out = tmp_path / "run"
    _trainer(out, "trainer.steps=1").train()
    for path in (out / "checkpoints").iterdir():
        import shutil

        shutil.rmtree(path)
    with pytest.raises(UserError, match=rf"{out} holds no intact checkpoint to resume from.*--overwrite"):
        _trainer(out, "trainer.steps=2", "trainer.resume=true").train()
