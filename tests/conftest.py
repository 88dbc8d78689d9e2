"""Shared pytest fixtures: the SmolLM2 tokenizer, a tiny random Llama on its vocabulary, the data dir.

The tokenizer is real (the offline default's), the model is random and tiny: component tests run in
seconds without loading SmolLM2 weights (those tests are marked ``slow``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rexrag.models import load_tokenizer, tiny_llama
from rexrag.sharding import STRICT_ENV

# Every process a test starts (and this one) checks NCCL's rules at each collective (rexrag.sharding):
# a collective that works on gloo but would crash on GPUs fails here.
os.environ.setdefault(STRICT_ENV, "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository with shared/ beside it: <repo>/../shared/data.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct tokenizer (pad token set, chat template kept)."""
    return load_tokenizer("smollm2-135m")


@pytest.fixture
def tiny_model(smol_tokenizer):
    """Random 2-layer Llama (hidden 64) over the SmolLM2 vocabulary; fresh per test, seed 0."""
    return tiny_llama(
        len(smol_tokenizer),
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data directory (<repo>/../shared/data); skips only when it is genuinely absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data dir {SHARED_DATA} is absent (CI places shared/ beside the repo)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is ~50x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (registered in ``sys.modules`` so that dataclasses and
    pickling inside it work)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
