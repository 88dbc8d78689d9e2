"""rollout.format=tool_calls end to end: `rexrag train` on the offline SmolLM2 (its ChatML template ignores tools,
so they are declared in a system message), REX-RAG probes on; bad settings stop the CLI with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from rexrag.train.logging import read_metrics

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


@pytest.mark.slow
def test_train_cli_tool_calls_smollm2(tmp_path):
    from rexrag.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--config", str(DEMO), "--no-progress", f"trainer.out_dir={out}", "trainer.steps=1",
               "rollout.format=tool_calls", "data.batch_size=2", "rollout.n=2", "rollout.max_turns=1",
               "rollout.max_new_tokens_per_turn=24", "trainer.mini_batch_size=4", "trainer.micro_batch_size=2",
               "rex.probe_prob=1.0", "rollout.backend=hf"])
    assert rc == 0
    (rec,) = read_metrics(out / "metrics.jsonl")  # ~8 min on 2 loaded cores (2 steps ~14; 2026-12-06)
    assert rec["step"] == 1 and rec["rollout/trajectories"] >= 4 and "rex/probes_made" in rec
    assert rec["rollout/template_drift_turns"] == 0  # SmolLM2's ChatML re-renders history as sampled
    assert (out / "checkpoints" / "step_000001" / "model" / "config.json").is_file()


@pytest.mark.parametrize("override,setting", [
    ("rollout.tool_parser=nope", "rollout.tool_parser"),
    ("rollout.tools=[search,search]", "rollout.tools"),
    ("rollout.tools=[os.path.join]", "rollout.tools"),
])
def test_train_cli_bad_tool_settings_exit_2(tmp_path, capsys, override, setting):
    from rexrag.cli import main

    rc = main(["train", "--config", str(DEMO), "--no-progress", f"trainer.out_dir={tmp_path}",
               "rollout.format=tool_calls", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and setting in err[0], err
    assert not (tmp_path / "checkpoints").exists()


def test_eval_cli_bad_tool_settings_exit_2(tmp_path, capsys):
    from rexrag.cli import main

    rc = main(["eval", "--format", "tool_calls", "--tool-parser", "nope", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rollout.tool_parser" in err[0], err
    rc = main(["eval", "--format", "tool_calls", "--method", "direct", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--format" in err[-1], err
