"""Metrics sinks for training: ``metrics.jsonl``, TensorBoard, optional wandb, and a rich progress bar.

Metric names are namespaced: ``rollout/``, ``reward/``, ``actor/``, ``critic/``, ``timing/``,
``memory/`` and ``rex/``. Only the main process writes. On resume, lines of ``metrics.jsonl`` for
steps after the checkpoint are dropped first (they belong to the part of the run that is redone),
and so is a torn last line (a crash in the middle of writing it), with a warning; any other line
that is not JSON is an error naming it.

wandb (``trainer.wandb_project``, when installed): the run's id is kept in ``<out_dir>/wandb.json``, and
a resumed run continues that wandb run (``wandb.init(id=..., resume="allow")``); a fresh run, or a
resume into another project, starts a new one. wandb's steps only increase: steps redone after the
checkpoint keep the values first logged there (``metrics.jsonl`` and TensorBoard are rewound).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from rexrag.errors import DataError
from rexrag.fsutil import atomic_write_text

NAMESPACES = ("rollout", "reward", "actor", "critic", "timing", "memory", "rex")
WANDB_FILE = "wandb.json"  # the run's wandb id, so that a resumed run continues it
PROGRESS_KEYS = ("reward/mean", "actor/pg_loss", "actor/kl", "rollout/response_length_mean", "timing/step_s")


def memory_metrics() -> dict[str, float]:
    """Host memory in MiB (see ``rexrag.memory`` for exactly what each covers) and, when CUDA is in
    use, the peak accelerator memory in GiB:

    - ``memory/peak_rss_mb``: this process's peak RSS (``ru_maxrss``), in-process vLLM engine included;
    - ``memory/rss_mb``: its RSS now;
    - ``memory/children_rss_mb``: current RSS summed over live child processes (a multiprocess engine);
    - ``memory/peak_rss_children_mb``: the largest peak among exited, waited-for children.
    Peak host memory of the run is at most ``peak_rss_mb + children_rss_mb``-at-its-peak; with no
    children (the CPU default) it is ``peak_rss_mb``."""
    from rexrag import memory

    out = {"memory/peak_rss_mb": memory.peak_rss_mb(), "memory/rss_mb": memory.rss_mb(),
           "memory/children_rss_mb": memory.children_rss_mb(), "memory/peak_rss_children_mb": memory.peak_rss_children_mb()}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["memory/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception:  # memory stats are best-effort  # noqa: BLE001
        pass
    return out


def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict]], str]:
    """([(line, record)], torn last line or "") of a ``metrics.jsonl`` file. Only the last line may be torn."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            if i == len(lines) - 1:
                return records, line
            raise DataError(f"{path}:{i + 1}: not a JSON record ({line[:60]!r}); only a torn last line is tolerated")
        records.append((line, rec))
    return records, ""


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep only records with ``step <= last_step`` (atomic rewrite); a torn last line is dropped with a
    warning. Returns the number of records dropped (the torn line included)."""
    if not path.is_file():
        return 0
    records, torn = _read_jsonl(path)
    if torn:
        print(f"warning: {path}: dropped a torn last line ({len(torn)} characters, left by an interrupted run): "
              f"{torn[:80]!r}", file=sys.stderr)
    keep = [line for line, rec in records if rec.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(records) - len(keep) + bool(torn)


class MetricsLogger:
    """Writes one JSON record per step plus TensorBoard scalars (and wandb when asked and installed)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str = "", config: dict | None = None, resume_step: int | None = None,
                 total_steps: int = 0, progress: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self._tb = self._wandb = self._progress = self._plain = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts a fresh log
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
        if wandb_project:
            self._wandb = self._start_wandb(wandb_project, config or {}, resumed=resume_step is not None)
        if progress:
            self._start_progress(total_steps, resume_step or 0)

    def _start_wandb(self, project: str, config: dict, resumed: bool):
        """A wandb run; a resumed run continues the run whose id ``wandb.json`` holds (same project), a
        fresh one starts a new run and records its id there. None when wandb is not installed."""
        try:
            import wandb
        except ImportError:
            print("wandb_project is set but wandb is not installed; logging to jsonl/TensorBoard only", file=sys.stderr)
            return None
        path = self.out_dir / WANDB_FILE
        saved = _read_json(path) if resumed else {}
        kwargs = {"project": project, "config": config, "dir": str(self.out_dir)}
        if saved.get("id") and saved.get("project") == project:
            # "allow": also when it was never synced; the config changes on resume (trainer.resume, maybe steps),
            # which wandb refuses for a resumed run without allow_val_change
            kwargs.update(id=saved["id"], resume="allow", allow_val_change=True)
        run = wandb.init(**kwargs)
        atomic_write_text(path, json.dumps({"id": run.id, "project": project}) + "\n")
        return run

    def _start_progress(self, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if not Console().is_terminal:  # a log file gets one plain line per step, with count and ETA
            self._plain = (total, done, time.monotonic())
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, info="")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as fh:  # one line per step; a crash loses at most the current line
            fh.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        info = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.3g}" for k in PROGRESS_KEYS if k in metrics)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        elif self._plain is not None:
            print(plain_progress_line(step, *self._plain, time.monotonic(), info), flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def plain_progress_line(step: int, total: int, first: int, started: float, now: float, info: str) -> str:
    """``train 3/10  eta 0:01:10  reward=..``: the ETA extrapolates the steps done since ``first``."""
    done = step - first
    eta = (now - started) / done * (total - step) if done > 0 else float("nan")
    eta_text = str(_dt.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
    return f"train {step}/{total}  eta {eta_text}  {info}".rstrip()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file, in order (a torn last line, from a crash, is left out)."""
    return [rec for _, rec in _read_jsonl(Path(path))[0]]
