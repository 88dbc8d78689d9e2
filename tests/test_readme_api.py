"""The documentation's Python API block (docs/guides/extending.md, "The whole thing in one run") runs as
written: a custom reward, a custom retriever and own data, two RL steps of the offline SmolLM2 default (HF backend,
CPU). ``import rexrag`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from rexrag.rewards import _REWARDS
from rexrag.train.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _api_block() -> str:
    page = (ROOT / "docs" / "guides" / "extending.md").read_text()
    section = page.split("## The whole thing in one run", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    return block


def test_readme_python_api_block_runs(tmp_path, monkeypatch):
    code = _api_block()
    assert len(code.strip().splitlines()) < 20
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, "docs/guides/extending.md (Python API)", "exec"), {"__name__": "readme_api"})  # noqa: S102 (the documented block)
    finally:
        torch.set_num_threads(threads)
        if "says_gold" in _REWARDS:
            _REWARDS.remove("says_gold")
    run = tmp_path / "runs" / "custom"
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and all(r["rollout/trajectories"] == 4 for r in recs)
    saved = yaml.safe_load((run / "config.yaml").read_text())  # (says_gold is unregistered again: read it raw)
    assert saved["trainer"]["reward"] == "em_format + 0.5*says_gold" and saved["retrieval"]["index"] == ""
    assert (run / "checkpoints" / "step_000002" / "model" / "config.json").is_file()


def test_import_rexrag_is_light_and_exports_resolve():
    code = ("import sys, rexrag; heavy = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; "
            "assert not heavy, heavy; assert rexrag.QAExample.__doc__ and rexrag.Trainer.__doc__; "
            "assert 'register_reward' in dir(rexrag)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
