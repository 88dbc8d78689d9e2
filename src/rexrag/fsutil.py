"""Atomic writes: the one place that knows how to replace a file or a directory safely.

A reader sees either the old content or the complete new one, never a half-written file, and a crash
leaves at most a hidden temp entry beside the target. Files: write a temp file in the same directory,
flush and fsync it, ``os.replace`` it onto the target, fsync the directory. Directories: fill a
temp directory beside the target, fsync its files, then rename it into place (an existing target is
first renamed aside, then deleted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every OS opens directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so writers that infer a format from it work);
    when the block ends without error, fsync it and move it onto ``path``. On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}"
    os.close(
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    )  # the umask applies, as for open()
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(dirpath)


def replace_dir(
    tmp: str | Path, out: str | Path, *, keep_existing: bool = False
) -> Path:
    """Move the finished directory ``tmp`` to ``out`` (same parent), after fsyncing its files.

    An existing ``out`` is renamed aside, replaced, then deleted, so ``out`` is never missing or
    partial. With ``keep_existing``, an ``out`` that already exists (another process got there first)
    wins and ``tmp`` is deleted instead.
    """
    tmp, out = Path(tmp), Path(out)
    _fsync_tree(tmp)
    if keep_existing:
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    elif not out.exists():
        os.rename(tmp, out)
    else:
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(out.parent)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(out: str | Path) -> None:
    """Delete what killed writers of ``out`` left beside it: ``.NAME.building-PID-*`` temp dirs
    whose process is gone (or of the older ``.NAME.building-HEX`` form, which names no pid), and
    ``.NAME.old-*`` once ``out`` itself exists. A writer still running on this machine is left
    alone; one on another machine over a shared file system is not seen as running."""
    out = Path(out)
    for path in out.parent.glob(f".{out.name}.building-*"):
        pid, sep, _ = path.name.rsplit(".building-", 1)[1].partition("-")
        if sep and pid.isdigit() and _pid_alive(int(pid)):
            continue
        log.warning("removing %s, left by an interrupted write", path)
        shutil.rmtree(path, ignore_errors=True)
    if out.exists():
        for path in out.parent.glob(f".{out.name}.old-*"):
            log.warning("removing %s, left by an interrupted swap", path)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``out``; when the block ends without error it becomes
    ``out`` (:func:`replace_dir`). On error the temp directory is deleted and ``out`` is untouched.
    Temp dirs that killed writers left are removed first (:func:`remove_stale_temps`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, out, keep_existing=keep_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_temps(out)  # now that out is complete, an interrupted swap's old copy too
