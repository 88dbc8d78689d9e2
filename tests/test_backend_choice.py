"""Which generation backend runs, said at start: ``auto`` never turns a GPU run into the HF loop silently.

Without vLLM, ``rollout.backend=auto`` used to pick the HF loop everywhere, on a GPU about 10x slower,
with no line saying so. Now a CUDA machine without vLLM stops (one line: install it, or choose ``hf``),
a CPU one falls back as before, and ``rexrag train`` / ``rexrag eval`` print the backend that runs.
"""

from __future__ import annotations

import pytest
import torch

from rexrag.cli import main
from rexrag.errors import UserError
from rexrag.rollout import vllm_backend
from rexrag.rollout.backends import backend_line, resolve_backend_name


@pytest.fixture
def cuda_without_vllm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)


def test_auto_on_cuda_without_vllm_is_one_line_saying_what_to_do(cuda_without_vllm, monkeypatch):
    with pytest.raises(UserError, match=r"rollout.backend=auto on a CUDA machine, but vLLM is not installed: "
                                        r"`pip install 'rexrag\[vllm\]'`, or .*rollout.backend=hf") as err:
        resolve_backend_name("auto")
    assert "\n" not in str(err.value)
    assert resolve_backend_name("hf") == "hf"  # chosen explicitly: fine
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    assert resolve_backend_name("auto") == "vllm"


def test_auto_on_a_cpu_without_vllm_falls_back_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    assert resolve_backend_name("auto") == "hf"
    assert backend_line("auto") == "generation backend: hf (rollout.backend=auto: vLLM is not installed; CPU machine)"
    assert backend_line("hf", "--backend") == "generation backend: hf (--backend=hf)"
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    assert backend_line("auto") == "generation backend: vllm (rollout.backend=auto: vLLM is installed)"


def test_train_and_eval_stop_before_any_model_loads(cuda_without_vllm, monkeypatch, tmp_path, capsys):
    import rexrag.commands.train as train_cmd
    import rexrag.models as models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_cmd, "build_trainer", loaded)
    monkeypatch.setattr(models, "load_model", loaded)
    assert main(["train", f"trainer.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rexrag train: error: rollout.backend=auto on a CUDA machine") and "\n" not in err
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n')
    assert main(["eval", "--method", "direct", "--dataset", f"a={qa}", "--out", str(tmp_path / "ev")]) == 2
    assert "rexrag eval: error: rollout.backend=auto on a CUDA machine" in capsys.readouterr().err


def test_train_and_eval_print_the_backend_that_runs(monkeypatch, tmp_path, capsys):
    import rexrag.commands.train as train_cmd

    def stop(*a, **k):
        raise UserError("stopped here by the test")

    monkeypatch.setattr(train_cmd, "build_trainer", stop)
    assert main(["train", f"trainer.out_dir={tmp_path / 'run'}", "rollout.backend=hf"]) == 2
    assert "generation backend: hf (rollout.backend=hf)\n" in capsys.readouterr().out
    assert main(["eval", "--backend", "hf", "--method", "direct", "--dataset", f"a={tmp_path / 'none.jsonl'}",
                 "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().out.startswith("generation backend: hf (--backend=hf)\n")
