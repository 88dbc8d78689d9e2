"""Atomic training checkpoints: write into a temp dir, then rename; prune to ``keep_last``.

Layout of ``<out_dir>/checkpoints/step_000123/``:

- ``model/``: ``save_pretrained`` of the policy (full weights, or only the LoRA adapters) plus the
  tokenizer, so ``rexrag eval`` / ``load_model`` can use the directory directly;
- ``critic.pt`` (value model, ``gae`` only), ``optimizer.pt``, ``scheduler.pt``;
- ``rng_<rank>.pt``: python, numpy and torch (and CUDA) RNG states of each process;
- ``explorer.pt``: the REX explorer's ``state_dict()`` when it has one;
- ``trainer_state.json``: step, data position, counters (written last: its presence marks a
  complete checkpoint, and the directory only gets its final name after it is written).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rexrag.errors import UserError
from rexrag.fsutil import replace_dir

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_state_from_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (model_dir / name).is_file():
            return load_file(str(model_dir / name))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(model_dir / shard)))
        return state
    raise UserError(f"{model_dir}: no model weights (model.safetensors, shards or adapter_model.safetensors)")


def load_model_weights(model, model_dir: Path) -> None:
    """Load weights written by ``save_pretrained`` into an existing (unwrapped) model."""
    from rexrag.models import is_peft

    state = _model_state_from_dir(model_dir)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise UserError(f"{model_dir}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")


def save_checkpoint(out_dir: str | Path, step: int, *, accelerator, model, tokenizer, optimizer, scheduler,
                    trainer_state: dict, critic=None, explorer=None, keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically from all processes (collective: every rank calls it)."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    unwrapped = accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # collective for FSDP/DeepSpeed
    if accelerator.is_main_process:
        unwrapped.save_pretrained(tmp / "model", state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if critic is not None:
            torch.save(accelerator.unwrap_model(critic).state_dict(), tmp / "critic.pt")
        if explorer is not None and hasattr(explorer, "state_dict"):
            torch.save(explorer.state_dict(), tmp / "explorer.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        replace_dir(tmp, final)
        for old in list_checkpoints(out_dir)[: -keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, accelerator, model, optimizer, scheduler, critic=None, explorer=None) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state dict (step, data position...)."""
    state = json.loads((path / "trainer_state.json").read_text())
    load_model_weights(accelerator.unwrap_model(model), path / "model")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if critic is not None:
        if not (path / "critic.pt").is_file():
            raise UserError(f"{path}: no critic.pt, but this run trains a value model (algo.adv_estimator=gae)")
        accelerator.unwrap_model(critic).load_state_dict(torch.load(path / "critic.pt", map_location="cpu"))
    if explorer is not None and hasattr(explorer, "load_state_dict") and (path / "explorer.pt").is_file():
        explorer.load_state_dict(torch.load(path / "explorer.pt", weights_only=False))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
