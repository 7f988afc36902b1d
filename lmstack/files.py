"""Crash-safe file and folder writes, and content hashes: the one copy every stage uses.

A reader (another process, or the next run after a kill) sees either the old file or folder or
the whole new one, never a half-written one:

- ``atomic_open(path)`` / ``atomic_write(path, write)`` write a temporary file beside ``path``,
  fsync it, rename it over ``path`` and fsync the parent folder so the rename itself survives
  a power cut;
- ``atomic_dir(dst)`` builds a folder under a hidden temporary name, fsyncs every file in it
  and the folder, swaps it into place and fsyncs the parent.

Deliberately left out: locking (two writers of the same path race; the last rename wins) and
Windows (``os.replace`` over an open file, directory fsync).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """``open(path, mode)`` for writing, as a context manager whose file appears at ``path``
    only when the block finishes: written beside it, fsynced, renamed over it, parent fsynced.
    On an exception the partial file is removed and ``path`` is left as it was."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole new file: mode {mode!r} must start with 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every report private
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Call ``write(binary_file)`` so that readers see the old file or the whole new one."""
    with atomic_open(path, "wb") as f:
        write(f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it replaces ``dst`` whole.

    On an exception the temporary folder is removed and ``dst`` is left as it was. With
    ``overwrite=False`` an existing ``dst`` is an error (raised before anything is written).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            elif f.is_dir():
                fsync_dir(f)
        fsync_dir(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
