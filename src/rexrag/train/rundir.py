"""The run directory: what marks a run, the resolved config saved with it, and resume's config rules.

``<trainer.out_dir>/`` holds one run:

- ``config.yaml``: the resolved config, written atomically when training starts (``retrieval.api_key``
  blanked: secrets never go to disk); ``rexrag train --resume`` reads it back, so a resumed run uses
  the run's own model, index and settings, not whatever the command line would build by default;
- ``metrics.jsonl``, ``checkpoints/``, ``tensorboard/``: written by the trainer.

A fresh run refuses a directory that holds another run's ``config.yaml``, ``metrics.jsonl`` or a
checkpoint (``check_fresh``); ``rexrag train --overwrite`` first removes exactly the four entries
above (``clear_run``) and nothing else: other files, and an ``index/`` built over the demo corpus,
stay. On resume, a key given on the command line (in ``--config`` or as ``key=value``) whose value
differs from the saved one is an error naming the keys, unless ``--allow-override`` (the command
line then wins); the keys in ``RESUME_MAY_CHANGE`` (``trainer.steps`` to train further, logging and
checkpoint cadence, what is evaluated during training) may always change. The newest checkpoint is
resharded to this launch's number of processes where it can be (``rexrag.train.checkpoint.check_resumable``
says otherwise in one line, before any model loads).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from rexrag.config import Config, config_from_dict, config_to_dict, load_config, parse_overrides
from rexrag.errors import ConfigError, UserError
from rexrag.fsutil import atomic_write_text

CONFIG_FILE = "config.yaml"
RUN_ENTRIES = (CONFIG_FILE, "metrics.jsonl", "checkpoints", "tensorboard")  # what --overwrite removes
SECRET_KEYS = frozenset({"retrieval.api_key"})  # never written; taken from the command line on resume
RESUME_MAY_CHANGE = frozenset({
    "trainer.steps", "trainer.save_every", "trainer.keep_last", "trainer.log_tensorboard", "trainer.wandb_project",
    "trainer.resume", "trainer.out_dir", "trainer.eval_every", "data.eval_files", "data.eval_limit", *SECRET_KEYS,
})


def run_markers(out_dir: str | Path) -> list[str]:
    """The entries of ``out_dir`` that show it holds a run (config, metrics, a non-empty checkpoints dir)."""
    out = Path(out_dir)
    found = [name for name in (CONFIG_FILE, "metrics.jsonl") if (out / name).exists()]
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append("checkpoints/")
    return found


def check_fresh(out_dir: str | Path) -> None:
    """A fresh run may not start in a directory that holds another run."""
    found = run_markers(out_dir)
    if found:
        raise UserError(
            f"{out_dir} already holds a run ({', '.join(found)}); continue it with `rexrag train --resume "
            f"trainer.out_dir={out_dir}` (trainer.resume=true), start over with --overwrite (removes "
            f"{', '.join(RUN_ENTRIES)} there, nothing else), or choose another trainer.out_dir")


def clear_run(out_dir: str | Path) -> list[Path]:
    """Remove the run entries ``RUN_ENTRIES`` of ``out_dir`` (only those); returns what was removed."""
    out = Path(out_dir)
    removed = []
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


def _redacted(cfg: Config) -> dict[str, Any]:
    data = config_to_dict(cfg)
    for key in SECRET_KEYS:
        section, name = key.split(".")
        data[section][name] = ""
    return data


def save_config(out_dir: str | Path, cfg: Config) -> Path:
    """Write the resolved ``cfg`` to ``<out_dir>/config.yaml`` atomically (secrets blanked)."""
    text = "# resolved config of this run, written by rexrag train; `rexrag train --resume` reads it\n"
    text += yaml.safe_dump(_redacted(cfg), sort_keys=False, allow_unicode=True)
    return atomic_write_text(Path(out_dir) / CONFIG_FILE, text)


def load_saved_config(out_dir: str | Path) -> Config | None:
    """The config saved in ``out_dir`` (None when there is none)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; restore it or resume with --config and --allow-override") from None


def explicit_keys(path: str | Path | None, overrides: list[str]) -> set[str]:
    """Dotted keys the command line sets: those in the ``--config`` YAML file and the overrides."""
    data: dict = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    keys = set()
    for source in (data, parse_overrides(overrides)):
        for section, fields in source.items():
            if isinstance(fields, dict):
                keys.update(f"{section}.{name}" for name in fields)
    return keys


def _get(data: dict, key: str) -> Any:
    section, name = key.split(".", 1)
    return data.get(section, {}).get(name)


def resume_config(given: Config, explicit: set[str], *, allow_override: bool = False) -> Config:
    """The config to resume ``given.trainer.out_dir`` with: the saved one, plus the command line's
    explicit keys where they may change (``RESUME_MAY_CHANGE``, or any with ``allow_override``).
    A conflicting key without ``allow_override`` is a ``ConfigError`` naming every such key. With
    no saved config (a run started by an older version), ``given`` is used as it is, with a warning."""
    out_dir = given.trainer.out_dir
    saved = load_saved_config(out_dir)
    if saved is None and not run_markers(out_dir):  # a mistyped out_dir must not train from scratch for hours
        raise UserError(f"--resume: {out_dir} holds no run (no {CONFIG_FILE}, metrics.jsonl or checkpoints/); check "
                        "trainer.out_dir, or start a fresh run there without --resume")
    if saved is None:
        if run_markers(out_dir):
            print(f"warning: {out_dir} has no {CONFIG_FILE} (a run started by an older rexrag); resuming with the "
                  "command line's config as given", file=sys.stderr)
        given.trainer.resume = True
        return _resumable(given)
    new, old = config_to_dict(given), config_to_dict(saved)
    changed = sorted(k for k in explicit if _get(new, k) != _get(old, k) and k.count(".") == 1)
    conflicts = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if conflicts and not allow_override:
        detail = "; ".join(f"{k}: run has {_get(old, k)!r}, command line {_get(new, k)!r}" for k in conflicts)
        raise ConfigError(
            f"--resume uses the run's saved config {Path(out_dir) / CONFIG_FILE}, and the command line changes "
            f"{', '.join(conflicts)} ({detail}). Drop them (e.g. `rexrag train --resume trainer.out_dir={out_dir}`), "
            "or pass --allow-override to apply them")
    if conflicts:
        print(f"warning: resuming {out_dir} with overridden {', '.join(conflicts)}", file=sys.stderr)
    for key in [*changed, *SECRET_KEYS]:
        section, name = key.split(".")
        old[section][name] = new[section][name]
    old["trainer"]["out_dir"] = out_dir
    old["trainer"]["resume"] = True
    return _resumable(config_from_dict(old))


def _resumable(cfg: Config) -> Config:
    """``cfg``, once its newest checkpoint is known to resume on this launch's processes (else the
    one-line ``UserError`` of ``rexrag.train.checkpoint.check_resumable``, before any model loads)."""
    from rexrag.train.checkpoint import check_resumable

    check_resumable(cfg.trainer.out_dir, cfg.data.batch_size)
    return cfg
