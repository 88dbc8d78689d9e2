"""Training checkpoints through ``accelerator.save_state`` / ``load_state``, recognised by a manifest.

Layout of ``<out_dir>/checkpoints/step_000123/``:

- ``state/``: ``accelerator.save_state``: the prepared model(s) (policy, and the critic for ``gae``)
  and optimizer -- sharded per process under FSDP (``SHARDED_STATE_DICT``, torch DCP files), whole
  otherwise -- each process's RNG states (``random_states_<rank>.pkl``), and the objects registered
  with :func:`register_state` (``custom_checkpoint_<i>.pkl``: LR scheduler, prompt sampler, the REX
  explorer with one state per process);
- ``model/``: the consolidated export for evaluation: ``save_pretrained`` of the policy (full weights
  gathered on the main process, or only the LoRA adapters) plus the tokenizer, so ``rexrag eval`` /
  ``load_model`` can use the directory directly;
- ``trainer_state.json``: step, data position, counters;
- ``manifest.json``: written last: every other file with its size, the step, when it was saved and by
  which run. Only a directory with a manifest whose files are all present at their recorded sizes is
  a checkpoint. The directory is filled under a hidden temp name and renamed into place after the
  manifest is written (``rexrag.fsutil``).

Resuming picks the newest *intact* checkpoint: a damaged newer one (a missing or truncated file, a
missing or unreadable manifest) is skipped with a warning that names what is wrong. "Newest" is by
save time, not step number, so a fresh run in an old run's directory resumes from its own work.
Pruning (``keep_last``) keeps the ``keep_last`` newest intact checkpoints, never the only intact one
and never an older run's checkpoint in place of a newer run's.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rexrag.errors import UserError
from rexrag.fsutil import atomic_write_text, replace_dir

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
_RUN_ID = uuid.uuid4().hex  # this process's run: written into every manifest it saves


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


# --------------------------------------------------------------------------- manifest


def write_manifest(ckpt_dir: Path, step: int) -> dict:
    """List every file under ``ckpt_dir`` with its size; write ``manifest.json`` atomically, last."""
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {"step": step, "saved_at": time.time(), "run_id": _RUN_ID, "files": files}
    atomic_write_text(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / MANIFEST).read_text())


def check_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None when ``ckpt_dir`` is an intact checkpoint, else what is wrong with it (one line)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MANIFEST).is_file():
        return f"{ckpt_dir}: no {MANIFEST} (interrupted save, or written by an older rexrag)"
    try:
        manifest = read_manifest(ckpt_dir)
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{ckpt_dir}: unreadable {MANIFEST} ({e})"
    for rel, size in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            return f"{ckpt_dir}: {rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{ckpt_dir}: {rel} has {actual} bytes, the manifest says {size}"
    return None


def _candidates(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)] if root.is_dir() else []


def _order_key(path: Path) -> tuple[float, int]:
    """Save time (then step) of a checkpoint; a damaged manifest sorts by the directory's mtime."""
    step = int(_STEP_DIR.match(path.name).group(1))
    try:
        return float(read_manifest(path)["saved_at"]), step
    except (OSError, ValueError, KeyError, TypeError):
        return path.stat().st_mtime, step


def list_checkpoints(out_dir: str | Path, *, warn: bool = False) -> list[Path]:
    """Intact checkpoints, oldest first (by save time). ``warn``: say loudly which newer ones are damaged."""
    found = sorted(_candidates(out_dir), key=_order_key)
    intact = [p for p in found if check_checkpoint(p) is None]
    if warn and found:
        newest_ok = _order_key(intact[-1]) if intact else None
        for p in found:
            problem = check_checkpoint(p)
            if problem is not None and (newest_ok is None or _order_key(p) > newest_ok):
                fallback = f"falling back to {intact[-1].name}" if intact else "no intact checkpoint to resume from"
                msg = f"damaged checkpoint skipped: {problem}; {fallback}"
                log.warning(msg)
                warnings.warn(msg, stacklevel=3)
    return intact


def latest_checkpoint(out_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest intact checkpoint (warning about every newer damaged one), or None."""
    ckpts = list_checkpoints(out_dir, warn=warn)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep_last`` newest intact checkpoints (by save time, so an older run's
    checkpoints go before a newer run's whatever their steps). Damaged ones older than the oldest
    kept are deleted too. ``protect`` (the one just written) and the newest intact one are never
    deleted. Returns what was deleted."""
    if keep_last <= 0:
        return []
    intact = list_checkpoints(out_dir)
    if not intact:
        return []
    keep = set(intact[-keep_last:]) | {intact[-1]} | ({Path(protect)} if protect is not None else set())
    oldest_kept = min(_order_key(p) for p in keep if p.exists())
    gone = []
    for p in _candidates(out_dir):
        if p in keep:
            continue
        if check_checkpoint(p) is None or _order_key(p) < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


# --------------------------------------------------------------------------- state


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


class PerProcessState:
    """Checkpoint ``obj`` (with ``state_dict`` / ``load_state_dict``) once per process.

    accelerate writes a registered object from the main process only; an object whose state differs
    by process (the REX explorer's random generator is seeded per rank) gathers every process's state
    into that one file and each process takes its own back."""

    def __init__(self, obj, accelerator):
        self.obj, self.acc = obj, accelerator

    def state_dict(self) -> dict:
        local = self.obj.state_dict()
        if self.acc.num_processes == 1:
            return {"per_process": [local]}
        from rexrag.sharding import gather_objects

        return {"per_process": gather_objects(local)}

    def load_state_dict(self, state: dict) -> None:
        parts = state["per_process"]
        if len(parts) != self.acc.num_processes:
            raise UserError(f"this checkpoint was written by {len(parts)} processes; resume it with as many (this run has {self.acc.num_processes})")
        self.obj.load_state_dict(parts[self.acc.process_index])


def register_state(accelerator, *, scheduler, sampler, explorer=None) -> None:
    """Register what ``save_state`` / ``load_state`` carry besides models, optimizers and RNG: the LR
    scheduler, the prompt sampler and (when it has state) the explorer, per process. Call once,
    in the same order in every run (accelerate stores them by position)."""
    objs = [scheduler, sampler]
    if explorer is not None and hasattr(explorer, "state_dict") and hasattr(explorer, "load_state_dict"):
        objs.append(PerProcessState(explorer, accelerator))
    accelerator.register_for_checkpointing(*objs)


# --------------------------------------------------------------------------- consolidated weights


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
    """Load weights written by ``save_pretrained`` into an existing (unwrapped, unsharded) model."""
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


def export_model(accelerator, model, tokenizer, target: Path) -> None:
    """``save_pretrained`` of the full policy into ``target`` from the main process (collective: the
    weights of a sharded model are gathered shard by shard onto the main process's CPU)."""
    state = accelerator.get_state_dict(model)  # collective for FSDP/DeepSpeed; full only on the main process
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(target, state_dict=state, safe_serialization=True)
    _plain_architectures(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)


def _plain_architectures(target: Path) -> None:
    """FSDP2 swaps a sharded module's class for ``FSDP<Name>``; the export names the real class."""
    cfg = target / "config.json"
    if not cfg.is_file():
        return
    data = json.loads(cfg.read_text())
    archs = data.get("architectures") or []
    fixed = [a.removeprefix("FSDP") for a in archs]
    if fixed != archs:
        data["architectures"] = fixed
        atomic_write_text(cfg, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- save / load


def save_checkpoint(out_dir: str | Path, step: int, *, accelerator, model, tokenizer, trainer_state: dict,
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` (collective: every process calls it). Models, optimizers, RNG and the
    registered objects go through ``accelerator.save_state``; see the module docstring."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"), safe_serialization=False)
    export_model(accelerator, model, tokenizer, tmp / "model")
    accelerator.wait_for_everyone()  # every process's shards are on disk
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        write_manifest(tmp, step)
        replace_dir(tmp, final)
        prune_checkpoints(out_dir, keep_last, protect=final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, *, accelerator) -> dict:
    """Restore what ``save_checkpoint`` wrote (models, optimizers, RNG, registered objects) through
    ``accelerator.load_state``; returns the trainer state dict (step, data position, counters)."""
    problem = check_checkpoint(path)
    if problem is not None:
        raise UserError(f"cannot resume: {problem}")
    accelerator.load_state(str(Path(path) / "state"))
    return json.loads((Path(path) / "trainer_state.json").read_text())
