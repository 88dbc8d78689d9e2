"""Checkpoints (rexrag.train.checkpoint): the manifest decides what is complete, a damaged newest
checkpoint falls back loudly to the newest intact one, and pruning keeps the right ones."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from test_trainer import _params, make_trainer

from rexrag.train import checkpoint as ckpt


pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_ckpt(out, step: int, saved_at: float, run_id: str = "r", weights: bytes = b"w" * 64):
    d = ckpt.checkpoint_root(out) / f"step_{step:06d}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "model.safetensors").write_bytes(weights)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    files = {"model/model.safetensors": len(weights), "trainer_state.json": (d / "trainer_state.json").stat().st_size}
    (d / ckpt.MANIFEST).write_text(json.dumps({"step": step, "saved_at": saved_at, "run_id": run_id, "files": files}))
    return d


def test_damaged_latest_falls_back_to_newest_intact_loudly(tmp_path):
    a, b, c = (_fake_ckpt(tmp_path, s, 100.0 + s) for s in (1, 2, 3))
    assert ckpt.latest_checkpoint(tmp_path) == c
    (c / "model" / "model.safetensors").write_bytes(b"")  # truncated to 0 bytes
    with pytest.warns(UserWarning, match=r"step_000003: model/model.safetensors has 0 bytes.*falling back to step_000002"):
        assert ckpt.latest_checkpoint(tmp_path) == b
    (b / "model" / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"step_000002: model/model.safetensors is missing.*falling back to step_000001"):
        assert ckpt.latest_checkpoint(tmp_path) == a
    (a / ckpt.MANIFEST).unlink()  # an interrupted save never got its manifest
    with pytest.warns(UserWarning, match="no manifest.json.*no intact checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.check_checkpoint(a).endswith("written by an older rexrag)")


def test_prune_keeps_newest_intact_and_never_the_only_intact_one(tmp_path):
    a, b, c = (_fake_ckpt(tmp_path, s, 100.0 + s) for s in (1, 2, 3))
    (c / "model" / "model.safetensors").write_bytes(b"")  # newest is damaged
    gone = ckpt.prune_checkpoints(tmp_path, keep_last=1)
    assert gone == [a] and b.is_dir() and c.is_dir()  # b is the only intact one: kept; damaged c is newer: kept
    (b / "model" / "model.safetensors").write_bytes(b"")
    assert ckpt.prune_checkpoints(tmp_path, keep_last=1) == []  # no intact one: nothing goes


def test_prune_orders_by_save_time_not_step(tmp_path):
    """A new run started in an old run's directory: its low-step checkpoints are the newest."""
    old = [_fake_ckpt(tmp_path, s, 100.0 + s, "old") for s in (8, 10)]
    new = [_fake_ckpt(tmp_path, s, 200.0 + s, "new") for s in (1, 2)]
    assert ckpt.latest_checkpoint(tmp_path) == new[-1]
    gone = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(gone) == sorted(old) and all(p.is_dir() for p in new)


def test_trainer_checkpoint_has_manifest_and_resume_skips_a_damaged_one(tmp_path):
    common = ("algo.kl_coef=0.01", "trainer.mini_batch_size=16", "trainer.save_every=1", "trainer.keep_last=3")
    full = make_trainer(tmp_path / "full", "trainer.steps=2", *common)
    full.train()
    part = make_trainer(tmp_path / "part", "trainer.steps=3", *common)
    part.train()
    root = ckpt.checkpoint_root(tmp_path / "part")
    manifest = ckpt.read_manifest(root / "step_000003")
    assert "model/model.safetensors" in manifest["files"] and manifest["step"] == 3
    assert any(f.startswith("state/") for f in manifest["files"])
    weights = root / "step_000003" / "state" / "dcp" / "__0_0.distcp"
    os.truncate(weights, 0)  # a crash or full disk left the newest weights empty
    resumed = make_trainer(tmp_path / "part", "trainer.steps=2", *common, "trainer.resume=true")
    with pytest.warns(UserWarning, match="step_000003: state/dcp/__0_0.distcp has 0 bytes.*falling back to step_000002"):
        assert resumed.resume() and resumed.step_idx == 2
    a, b = _params(full.acc.unwrap_model(full.model)), _params(resumed.acc.unwrap_model(resumed.model))
    assert all(torch.equal(a[n], b[n]) for n in a)  # the step-2 weights, exactly
    # the next save prunes the damaged one only once enough intact newer ones exist
    time.sleep(0.01)
    resumed.tc.keep_last = 1
    resumed.step_idx = 4
    resumed.save()
    assert ckpt.latest_checkpoint(tmp_path / "part").name == "step_000004"
    assert sorted(p.name for p in root.iterdir()) == ["step_000004"]
