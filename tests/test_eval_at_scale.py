"""Evaluation at scale (issue 32): ``rexrag eval --from-run``, every token limit a setting, ``trainer.eval_every``
on the toy trainer, and (slow) a two-process ``accelerate launch`` eval with one vLLM engine per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _rollout_fakes import FakeRetriever, ScriptedBackend
from test_trainer import make_trainer
from toy_rl import toy_config, toy_tokenizer

from rexrag.cli import main
from rexrag.config import Config, DataConfig, RetrievalConfig, RolloutConfig, TrainerConfig
from rexrag.eval.evaluate import EvalOptions, rollout_config
from rexrag.rollout.agent import SearchAgent
from rexrag.train import rundir
from rexrag.train.checkpoint import write_manifest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _corpus_and_questions(tmp_path: Path, n: int = 5) -> tuple[Path, Path]:
    from rexrag.retrieval import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"T{i}"\nParis fact number {i}.'}) + "\n" for i in range(8)))
    build_index(corpus, "bm25", tmp_path / "idx")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Where is fact {i}?", "golden_answers": ["Paris"]}) + "\n"
                          for i in range(n)))
    return tmp_path / "idx", qa


def _run_dir(tmp_path: Path, idx: Path, qa: Path, **rollout) -> Path:
    """A run directory as `rexrag train` leaves it: config.yaml (settings unlike eval's defaults)."""
    run = tmp_path / "run"
    ro = dict(template="search-r1", max_turns=1, max_new_tokens_per_turn=5, max_obs_tokens=40, max_total_tokens=700,
              max_query_chars=99, backend="hf", engine_dtype="float32", vllm_kv_cache_gb=0.125)
    cfg = Config(rollout=RolloutConfig(**{**ro, **rollout}), retrieval=RetrievalConfig(index=str(idx), topk=2),
                 data=DataConfig(eval_files=[str(qa)], eval_limit=2), trainer=TrainerConfig(out_dir=str(run)))
    run.mkdir()
    rundir.save_config(run, cfg)
    return run


def _checkpoint(run: Path, step: int, model, tokenizer) -> Path:
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    model.save_pretrained(ckpt / "model")
    tokenizer.save_pretrained(ckpt / "model")
    write_manifest(ckpt, step)
    return ckpt


def _meta(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())["meta"]


def test_from_run_evaluates_the_latest_checkpoint_with_the_runs_settings(tmp_path, tiny_model, smol_tokenizer, capsys):
    idx, qa = _corpus_and_questions(tmp_path)
    run = _run_dir(tmp_path, idx, qa)
    _checkpoint(run, 1, tiny_model, smol_tokenizer)
    _checkpoint(run, 3, tiny_model, smol_tokenizer)  # the newest
    assert main(["eval", "--from-run", str(run), "--out", str(tmp_path / "e1")]) == 0
    assert f"from run {run}" in capsys.readouterr().out
    meta = _meta(tmp_path / "e1")
    opts = meta["options"]
    assert meta["model"] == str(run / "checkpoints" / "step_000003" / "model") and meta["label"] == "run/step_000003"
    assert (opts["template"], opts["max_turns"], opts["max_new_tokens"], opts["max_obs_tokens"], opts["max_total_tokens"],
            opts["max_query_chars"], opts["topk"], opts["limit"], opts["backend"], opts["engine_dtype"],
            opts["kv_cache_gb"]) == ("search-r1", 1, 5, 40, 700, 99, 2, 2, "hf", "float32", 0.125)
    assert meta["retriever"] == str(idx) and meta["files"] == {"qa": str(qa)}  # data.eval_files: no dataset given
    rows = (tmp_path / "e1" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 2  # data.eval_limit
    # a flag given on the command line wins over the run's setting; the rest still come from the run
    assert main(["eval", "--from-run", str(run), "--max-turns", "0", "--topk", "1", "--max-total-tokens", "600",
                 "--dataset", f"other={qa}", "--out", str(tmp_path / "e2")]) == 0
    opts = _meta(tmp_path / "e2")["options"]
    assert (opts["max_turns"], opts["topk"], opts["max_total_tokens"], opts["template"], opts["max_obs_tokens"]) == (
        0, 1, 600, "search-r1", 40)
    assert _meta(tmp_path / "e2")["files"] == {"other": str(qa)}


@pytest.mark.parametrize("case", ["no_config", "no_dir", "no_checkpoint"])
def test_from_run_without_a_run_is_one_line_and_exit_2_before_any_model_loads(tmp_path, monkeypatch, capsys, case):
    import rexrag.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rexrag.models, "load_model", no_load)
    monkeypatch.setattr(rexrag.models, "load_tokenizer", no_load)
    target = tmp_path / "somewhere"
    if case != "no_dir":
        target.mkdir()
    if case == "no_checkpoint":
        rundir.save_config(target, Config(trainer=TrainerConfig(out_dir=str(target))))
    rc = main(["eval", "--from-run", str(target), "--dataset", f"d={tmp_path / 'none.jsonl'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(target) in err, err
    assert {"no_config": "config.yaml", "no_dir": "no such directory", "no_checkpoint": "checkpoint"}[case] in err
    assert not (tmp_path / "out").exists()


def test_every_token_limit_of_eval_is_a_setting():
    cfg = rollout_config(EvalOptions(max_total_tokens=777, max_obs_tokens=33, max_new_tokens=11, max_query_chars=55))
    assert (cfg.max_total_tokens, cfg.max_obs_tokens, cfg.max_new_tokens_per_turn, cfg.max_query_chars) == (777, 33, 11, 55)
    from rexrag.errors import UserError

    with pytest.raises(UserError, match="max-total-tokens"):
        EvalOptions(max_total_tokens=0)


# --------------------------------------------------------------------------- trainer.eval_every

EVAL_QUESTIONS = {"Who wrote Hamlet?": "Shakespeare", "Capital of Peru?": "Lima", "Largest ocean?": "Pacific"}


class AnswerBackend(ScriptedBackend):
    """Answers each question in one turn, whatever was asked before (the scripted backend counts turns
    across calls; evaluation asks the same prompts every time)."""

    def _turn_text(self, prompt):
        text = self.tok.decode(prompt)
        (q,) = [q for q in self.script if q in text]
        return self.script[q][0]


def _eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "question": q, "golden_answers": [a]}) + "\n"
                            for i, (q, a) in enumerate(EVAL_QUESTIONS.items())))
    return path


def _eval_trainer(tmp_path: Path, *overrides: str):
    tok = toy_tokenizer()
    script = {q: [f"<answer> {a if q != 'Largest ocean?' else 'Atlantic'} </answer>"] for q, a in EVAL_QUESTIONS.items()}
    cfg = toy_config(tmp_path, *overrides)
    agent = SearchAgent(AnswerBackend(tok, script), tok, FakeRetriever(), cfg.rollout, topk=2)
    return make_trainer(tmp_path, *overrides, agent=agent)


def test_eval_every_logs_eval_scores_and_leaves_training_as_it_was(tmp_path):
    heldout = _eval_file(tmp_path)
    common = ("trainer.steps=3", "rollout.max_total_tokens=2048")
    tr = _eval_trainer(tmp_path / "with", *common, "trainer.eval_every=2", f"data.eval_files=[{heldout}]")
    hist = tr.train()
    evaluated = [i + 1 for i, m in enumerate(hist) if any(k.startswith("eval/") for k in m)]
    assert evaluated == [2, 3]  # every 2 steps, and after the last
    m = hist[1]
    assert m["eval/em"] == pytest.approx(2 / 3) and m["eval/cover_em"] == pytest.approx(2 / 3) and m["eval/n"] == 3
    assert 0 < m["eval/f1"] < 1 and m["timing/eval_s"] > 0
    logged = [json.loads(x) for x in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval/em" in r] == [2, 3]
    # the evaluation does not change the training: same rewards and weights as a run without it
    plain = _eval_trainer(tmp_path / "without", *common)
    plain_hist = plain.train()
    assert [h["reward/mean"] for h in hist] == [h["reward/mean"] for h in plain_hist]
    for a, b in zip(tr.acc.unwrap_model(tr.model).parameters(), plain.acc.unwrap_model(plain.model).parameters()):
        assert torch.equal(a, b)


def test_eval_every_needs_eval_files_and_an_agent(tmp_path):
    from rexrag.errors import UserError

    with pytest.raises(UserError, match="data.eval_files"):
        _eval_trainer(tmp_path, "trainer.eval_every=1")
    with pytest.raises(UserError, match="SearchAgent"):
        make_trainer(tmp_path, "trainer.eval_every=1", f"data.eval_files=[{_eval_file(tmp_path)}]")


# --------------------------------------------------------------------------- two processes, one vLLM engine each


def test_closing_an_engine_keeps_the_callers_process_group(tmp_path, smol_tokenizer):
    """vLLM's engine shutdown runs its cleanup_dist_env_and_memory, which destroys the default process group:
    under external_launcher that is the caller's world, and `rexrag eval` merges its rows over it after the engine
    is closed (the two-process eval wrote rank 0's rows only). close() keeps it."""
    import torch.distributed as dist
    from types import SimpleNamespace

    from rexrag.rollout.vllm_backend import VLLMBackend

    pytest.importorskip("vllm")
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=cleanup_dist_env_and_memory)))
        VLLMBackend.from_engine(llm, smol_tokenizer, eos=[2]).close()
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert dist.destroy_process_group is not None and "lambda" not in dist.destroy_process_group.__name__
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_vllm_eval_gives_the_rows_of_one_process(tmp_path, smol_tokenizer):
    """`accelerate launch` with two CPU processes, `--backend vllm`: each process starts its own engine
    (external_launcher, inside the gloo world) and evaluates every other question; predictions.jsonl and the
    scores equal a one-process vLLM run's. fp32 engine (the run's rollout.engine_dtype, via --from-run)."""
    pytest.importorskip("vllm")
    from rexrag.models import tiny_llama

    idx, qa = _corpus_and_questions(tmp_path)
    run = _run_dir(tmp_path, idx, qa, backend="vllm", max_total_tokens=384, max_new_tokens_per_turn=6)
    model = tiny_llama(len(smol_tokenizer), hidden=128, heads=2, seed=3, bos_token_id=smol_tokenizer.bos_token_id,
                       eos_token_id=smol_tokenizer.eos_token_id, pad_token_id=smol_tokenizer.pad_token_id)  # head_dim 64
    model.save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    args = ["--from-run", str(run), "--model", str(tmp_path / "model"), "--limit", "0", "--max-turns", "1",
            "--batch-size", "2", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "rexrag.cli", "eval", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=240, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    try:
        two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "rexrag.cli", "eval", *args,
                              "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=360, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"two-process eval did not finish within 360 s (a hang): {str(exc.stderr)[-3000:]}")
    assert two.returncode == 0, two.stderr[-5000:]
    assert "generation backend: vllm" in one.stdout and "generation backend: vllm" in two.stdout
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows2] == [f"q{i}" for i in range(5)]
    assert rows1 == rows2
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["datasets"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["datasets"]
    assert m1 == m2
