"""``rexrag demo``: the whole pipeline offline on a laptop CPU (placeholder, being written)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEMO_FILES = ("corpus.jsonl", "train.jsonl", "eval.jsonl", "NOTICE", "manifest.json")


def demo_file(name: str) -> Path:
    """Path of a bundled demo data file (``resources/demo/<name>``)."""
    if name not in DEMO_FILES:
        raise ValueError(f"unknown demo file {name!r}; choose one of {list(DEMO_FILES)}")
    return Path(str(resources.files("rexrag") / "resources" / "demo" / name))
