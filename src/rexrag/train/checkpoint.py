"""Training checkpoints: model and optimizer in torch DCP (any process count), recognised by a manifest.

Layout of ``<out_dir>/checkpoints/step_000123/``:

- ``state/dcp/``: the prepared model(s) (``policy``, and ``critic`` for ``gae``) and the optimizer as one
  torch DCP checkpoint (``torch.distributed.checkpoint``) of their ``get_state_dict`` (parameter names
  without DDP/FSDP wrappers, optimizer state keyed by them), written the same way under FSDP2, DDP and
  one process; each process writes its part (``__<rank>_0.distcp``) and DCP reshards on load, so a run
  saved by W processes resumes on any number (FSDP2 <-> DDP <-> one process);
- ``state/random_states_<rank>.pkl``: each process's RNG states (python, numpy, torch, cuda);
- ``state/objects.pt``: the objects registered with :func:`register_state` (LR scheduler, prompt
  sampler, the REX explorer with one state per process);
- ``model/``: the consolidated export for evaluation: ``save_pretrained`` of the policy (full weights
  gathered on the main process, or only the LoRA adapters) plus the tokenizer, so ``rexrag eval`` /
  ``load_model`` can use the directory directly;
- ``trainer_state.json``: step, data position, counters, and ``checkpoint``: the format, the process
  count and sharding that wrote it, and the run's seed;
- ``manifest.json``: written last: every other file with its size, the step, when it was saved and by
  which run. Only a directory with a manifest whose files are all present at their recorded sizes is
  a checkpoint. The directory is filled under a hidden temp name and renamed into place after the
  manifest is written (``rexrag.fsutil``).

**Another number of processes.** Model and optimizer reshard through DCP (exactly: the same numbers
land in other shards). What is per process cannot be split or merged, so it is reseeded
deterministically from (``trainer.seed``, step, new rank): the global RNGs (python, numpy, torch) and
the REX explorer's probe RNG; the explorer's adaptive ratio rho is global and is taken as saved. The
same process count restores every RNG as saved. A resume that cannot work on this launch (the prompt
batch not divisible by the process count, or a checkpoint of the old format on another layout) stops
with one line, before any model loads when ``rexrag train --resume`` checks it (:func:`check_resumable`).

Checkpoints written before this format (``accelerator.save_state``: ``state/pytorch_model*``,
``optimizer*``, ``custom_checkpoint_<i>.pkl``) still resume through ``accelerator.load_state`` on the
launch that wrote them (same process count and sharding); on any other they are refused with that line.

Resuming picks the newest *intact* checkpoint: a damaged newer one (a missing or truncated file, a
missing or unreadable manifest) is skipped with a warning that names what is wrong. "Newest" is by
save time, not step number, so a fresh run in an old run's directory resumes from its own work.
Pruning (``keep_last``) keeps the ``keep_last`` newest intact checkpoints, never the only intact one
and never an older run's checkpoint in place of a newer run's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
import weakref
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

FORMAT = 2  # 1 (no "checkpoint" entry in trainer_state.json): accelerate save_state; 2: see the module docstring
DCP_DIR = "dcp"
OBJECTS = "objects.pt"
_SEEDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # accelerator -> the run's seed (register_state)


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


def derived_seed(seed: int, step: int, rank: int, what: str) -> int:
    """A 63-bit seed from (run seed, step, rank, what): the same on every machine and Python."""
    digest = hashlib.sha256(f"rexrag/{what}/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reseed_global(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (every device) from ``derived_seed(seed, step, rank, "global")``."""
    s = derived_seed(seed, step, rank, "global")
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


class PerProcessState:
    """Checkpoint ``obj`` (with ``state_dict`` / ``load_state_dict``) once per process.

    Every process's state is gathered into one list (the REX explorer's probe RNG is seeded per rank)
    and each process takes its own back. On another number of processes (:meth:`load_resharded`)
    process r gets the first process's state without its ``rng``, plus ``rng_seed`` (the caller
    derives it from the run's seed, the step and r): the rest of the state must be global (the
    explorer's adaptive ratio is)."""

    def __init__(self, obj, accelerator):
        self.obj, self.acc = obj, accelerator

    def state_dict(self) -> dict:
        local = self.obj.state_dict()
        if self.acc.num_processes == 1:
            return {"per_process": [local]}
        from rexrag.sharding import gather_objects

        return {"per_process": gather_objects(local)}

    def load_state_dict(self, state: dict) -> None:
        """The old format's loader (``accelerator.load_state``): the same process count only."""
        parts = state["per_process"]
        if len(parts) != self.acc.num_processes:
            raise UserError(f"this checkpoint was written by {len(parts)} processes; resume it with as many (this run has {self.acc.num_processes})")
        self.obj.load_state_dict(parts[self.acc.process_index])

    def load_resharded(self, state: dict, rng_seed: int) -> None:
        """Own state when the process count is the one that saved, else the global part and ``rng_seed``."""
        parts = state["per_process"]
        if len(parts) == self.acc.num_processes:
            self.obj.load_state_dict(parts[self.acc.process_index])
            return
        self.obj.load_state_dict({**{k: v for k, v in parts[0].items() if k != "rng"}, "rng_seed": rng_seed})


def register_state(accelerator, *, scheduler, sampler, explorer=None) -> None:
    """Register what checkpoints carry besides models, optimizers and RNG: the LR scheduler, the
    prompt sampler and (when it has state) the explorer, per process; the sampler's ``seed`` is the
    run's seed for reseeding on another process count. Call once, in the same order in every run
    (objects are stored by position)."""
    objs = [scheduler, sampler]
    if explorer is not None and hasattr(explorer, "state_dict") and hasattr(explorer, "load_state_dict"):
        objs.append(PerProcessState(explorer, accelerator))
    accelerator.register_for_checkpointing(*objs)
    _SEEDS[accelerator] = int(getattr(sampler, "seed", 0))


def layout(accelerator) -> dict:
    """What wrote a checkpoint: format, process count, sharding, the run's seed (``trainer_state.json``)."""
    from rexrag.sharding import is_sharded

    return {"format": FORMAT, "world_size": accelerator.num_processes, "sharded": is_sharded(accelerator),
            "seed": _SEEDS.get(accelerator, 0)}


def _stateful(accelerator) -> tuple[torch.nn.Module, list]:
    """The prepared models as one module (``policy``, ``critic``: DCP's names then carry no DDP/FSDP
    wrapper) and the plain optimizers under accelerate's wrappers."""
    names = ["policy", "critic"] + [f"model_{i}" for i in range(2, len(accelerator._models))]
    module = torch.nn.ModuleDict(dict(zip(names, accelerator._models)))
    optimizers = [getattr(o, "optimizer", o) for o in accelerator._optimizers]
    return module, optimizers


def _dcp(save: bool, state: dict, path: Path) -> None:
    """``dcp.save`` / ``dcp.load`` of ``state`` at ``path`` on every process (collective: DCP's own
    collectives, started from ``rexrag.sharding.on_all_ranks``, which also reports a failure on any
    process to all of them, naming it)."""
    import torch.distributed.checkpoint as dcp

    from rexrag.sharding import on_all_ranks

    fn = dcp.save if save else dcp.load
    alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())  # one process, no group
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        on_all_ranks(functools.partial(fn, state, checkpoint_id=str(path), no_dist=alone),
                     f"{'saving' if save else 'loading'} {path}")


def save_train_state(accelerator, target: Path) -> None:
    """Write model(s) + optimizer (DCP), this process's RNG states and the registered objects into
    ``target`` (collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target.mkdir(parents=True, exist_ok=True)
    module, optimizers = _stateful(accelerator)
    model_sd, optim_sd = get_state_dict(module, optimizers)
    _dcp(True, {"model": model_sd, "optim": optim_sd}, target / DCP_DIR)
    torch.save(rng_state(), target / f"random_states_{accelerator.process_index}.pkl")
    objects = [obj.state_dict() for obj in accelerator._custom_objects]  # PerProcessState gathers: collective
    if accelerator.is_main_process:
        torch.save({"objects": objects}, target / OBJECTS)


def load_train_state(accelerator, target: Path, saved: dict, step: int) -> None:
    """Restore what :func:`save_train_state` wrote, on this launch's processes (see the module
    docstring for what is reseeded when their number differs from ``saved["world_size"]``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    module, optimizers = _stateful(accelerator)
    model_sd, optim_sd = get_state_dict(module, optimizers)  # this layout's shapes and shards, filled by DCP
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(False, state, target / DCP_DIR)
    set_state_dict(module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank, seed = accelerator.process_index, int(saved.get("seed", 0))
    same = int(saved["world_size"]) == accelerator.num_processes
    if same:
        set_rng_state(torch.load(target / f"random_states_{rank}.pkl", weights_only=False))
    else:
        reseed_global(seed, step, rank)
    objects = torch.load(target / OBJECTS, weights_only=False)["objects"]
    registered = accelerator._custom_objects
    if len(objects) != len(registered):
        raise UserError(f"{target}: {len(objects)} saved objects, this run registers {len(registered)} (REX-RAG "
                        "switched on or off since the checkpoint?); resume with the run's own config")
    for obj, obj_state in zip(registered, objects):
        if isinstance(obj, PerProcessState):
            obj.load_resharded(obj_state, derived_seed(seed, step, rank, "explorer"))
        else:
            obj.load_state_dict(obj_state)


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
    """Write checkpoint ``step`` (collective: every process calls it); see the module docstring."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    save_train_state(accelerator, tmp / "state")
    export_model(accelerator, model, tokenizer, tmp / "model")
    accelerator.wait_for_everyone()  # every process's shards are on disk
    if accelerator.is_main_process:
        state = {"step": step, **trainer_state, "checkpoint": layout(accelerator)}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp, step)
        replace_dir(tmp, final)
        prune_checkpoints(out_dir, keep_last, protect=final)
    accelerator.wait_for_everyone()
    return final


def saved_layout(ckpt_dir: Path) -> dict | None:
    """``{"format", "world_size", "sharded", ...}`` of the checkpoint at ``ckpt_dir``: its
    ``trainer_state.json`` entry, or for the old format what its ``state/`` files show; None when
    neither says."""
    try:
        entry = json.loads((Path(ckpt_dir) / "trainer_state.json").read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        entry = None
    if isinstance(entry, dict):
        return entry
    state = Path(ckpt_dir) / "state"
    world = len(list(state.glob("random_states_*.pkl")))
    if not world:
        return None
    return {"format": 1, "world_size": world, "sharded": (state / "pytorch_model_fsdp_0").is_dir()}


def _describe(world: int, sharded: bool) -> str:
    return f"{world} process{'es' if world != 1 else ''}{' (FSDP)' if sharded else ''}"


def reshard_problem(ckpt_dir: Path, *, world: int, sharded: bool, batch_size: int | None = None) -> str | None:
    """None when the checkpoint at ``ckpt_dir`` can resume on ``world`` processes (``sharded``: FSDP),
    else one line naming the setting and the numbers. ``batch_size``: ``data.batch_size``, which every
    process count must divide (each process takes whole prompt groups)."""
    saved = saved_layout(ckpt_dir)
    if saved is None:
        return None
    was = _describe(int(saved["world_size"]), bool(saved.get("sharded")))
    if batch_size is not None and batch_size % world:
        fits = max(d for d in range(1, world + 1) if batch_size % d == 0)
        return (f"cannot resume {ckpt_dir} (written by {was}) on {world} processes: data.batch_size={batch_size} is not "
                f"divisible by {world} (each process takes whole prompt groups); launch a number of processes that "
                f"divides {batch_size} (e.g. {fits})")
    same = int(saved["world_size"]) == world and bool(saved.get("sharded")) == sharded
    if int(saved.get("format", 1)) < FORMAT and not same:
        return (f"cannot resume {ckpt_dir} on {_describe(world, sharded)}: it was written by {was} through accelerate's "
                "save_state (an older rexrag), which cannot be resharded; resume it on that launch (its next "
                "checkpoint then resumes on any number of processes)")
    return None


def check_resumable(out_dir: str | Path, batch_size: int, world: int | None = None, sharded: bool | None = None) -> None:
    """Raise ``UserError`` (one line) when the newest intact checkpoint of ``out_dir`` cannot resume on
    this launch; ``world`` / ``sharded`` default to what ``accelerate launch`` put in the environment
    (``WORLD_SIZE``, ``ACCELERATE_USE_FSDP``), so ``rexrag train --resume`` calls it before any model
    loads. No checkpoint: nothing to check (the trainer says so)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if sharded is None:
        sharded = world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    path = latest_checkpoint(out_dir, warn=False)
    problem = reshard_problem(path, world=world, sharded=sharded, batch_size=batch_size) if path is not None else None
    if problem is not None:
        raise UserError(problem)


def load_checkpoint(path: Path, *, accelerator) -> dict:
    """Restore what ``save_checkpoint`` wrote (models, optimizers, RNG, registered objects) on this
    launch's processes, resharding where their number or sharding differs; returns the trainer state
    dict (step, data position, counters)."""
    from rexrag.sharding import is_sharded

    path = Path(path)
    problem = check_checkpoint(path)
    if problem is not None:
        raise UserError(f"cannot resume: {problem}")
    problem = reshard_problem(path, world=accelerator.num_processes, sharded=is_sharded(accelerator))
    if problem is not None:
        raise UserError(problem)
    state = json.loads((path / "trainer_state.json").read_text())
    saved = saved_layout(path)
    if saved is None or int(saved.get("format", 1)) < FORMAT:
        accelerator.load_state(str(path / "state"))  # the old format, on the launch that wrote it
    else:
        load_train_state(accelerator, path / "state", saved, int(state["step"]))
    return state
