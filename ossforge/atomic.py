"""Crash-safe writes: a file or folder appears whole or not at all.

Everything is written under a temporary name beside its destination and renamed into place
(``os.replace`` is atomic within one file system), so neither a concurrent reader nor a killed
process ever sees half a file. Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def open_file(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Yield a file open on a temp name beside ``path``; it replaces ``path`` when the block succeeds.

    For streaming many lines. ``mode`` is ``"w"`` or ``"wb"``; ``open_kwargs`` go to ``open``
    (``encoding``, ``newline``). On an exception nothing is left behind and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with open_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (newlines as given); returns ``path``."""
    with open_file(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


@contextmanager
def directory(out_dir: str | Path, file_by_file: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``out_dir`` whose contents become ``out_dir`` only if the block succeeds.

    By default the whole folder is replaced: an existing ``out_dir`` is renamed aside, the new one
    renamed in and the old one removed (``out_dir`` is missing only between two renames).
    ``file_by_file=True`` keeps ``out_dir`` in place and renames each new file over its namesake,
    smallest first, so metadata lands before the weights it describes; every file is always either
    the old or the new complete version (use it when ``out_dir`` must never be missing).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if file_by_file:
        try:
            out.mkdir(exist_ok=True)
            for name in sorted((p.name for p in tmp.iterdir()), key=lambda n: ((tmp / n).stat().st_size, n)):
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
