"""``ossforge.atomic``: a failed write leaves the old file or folder whole and no temp files."""

from __future__ import annotations

import pytest

from ossforge import atomic


def test_write_text_and_bytes_replace_whole(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    assert atomic.write_text(path, "a\nb\n") == path and path.read_text() == "a\nb\n"
    atomic.write_bytes(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_failed_stream_keeps_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic.open_file(path) as f:
            f.write("new half")
            raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_directory_file_by_file_keeps_folder_and_other_files(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "w.bin").write_bytes(b"old")
    with atomic.directory(out, file_by_file=True) as tmp:
        (tmp / "w.bin").write_bytes(b"new weights")
        (tmp / "config.json").write_text("{}")
    assert (out / "w.bin").read_bytes() == b"new weights" and (out / "config.json").read_text() == "{}"
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError):
        with atomic.directory(out, file_by_file=True) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise ValueError("crash")
    assert (out / "w.bin").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
