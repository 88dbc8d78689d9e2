"""The one atomic-write helper: files and directories are replaced whole, synced first, or not at all."""

from __future__ import annotations

import os

import pytest

from rexrag import fsutil


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    fsutil.atomic_write_text(path, "one")
    fsutil.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1]
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    fsutil.atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert events[:2] == ["fsync", "replace"]
    assert (tmp_path / "x.bin").read_bytes() == b"data"


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_text("old")
    with pytest.raises(RuntimeError), fsutil.atomic_path(path) as tmp:
        assert (
            tmp.parent == path.parent
            and tmp.suffix == ".png"
            and tmp.name.startswith(".")
        )
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_atomic_dir_swaps_a_whole_directory(tmp_path):
    out = tmp_path / "ckpt"
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()
    with fsutil.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(KeyboardInterrupt), fsutil.atomic_dir(out) as tmp:
        (tmp / "c").write_text("3")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_keep_existing_lets_the_first_writer_win(tmp_path):
    out = tmp_path / "model"
    with fsutil.atomic_dir(out, keep_existing=True) as tmp:
        (tmp / "ours").write_text("x")
        out.mkdir()  # another process finished first
        (out / "theirs").write_text("y")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
