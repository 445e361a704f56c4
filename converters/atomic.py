"""The one way this project writes a file or a directory: all of it, or nothing.

Content goes to a temporary name in the target's own directory (so the final rename never
crosses file systems), is flushed to disk, then renamed over the target: a reader, or a crash,
sees the old file or the whole new one, never half of it. Temporary files and directories are
created with the modes any tool would use (0666 / 0777 minus the process umask: 0644 / 0755 by
default), applied by the kernel at creation; the umask is never changed, so other threads
creating files at the same moment are unaffected.

A write the disk refuses (full, read-only, a file too large) is a `converters.owned.WriteFailed`
naming the file: one line for the CLIs, and the temp file is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Union

from converters.owned import WriteFailed, is_write_error, write_error

PathLike = Union[str, "os.PathLike[str]"]


def _temp_name(path: Path) -> Path:
    # `.<name>.<dot-free token>.tmp`: hidden, and recognisable by the hub cache's sweeper
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def fsync_path(path: PathLike) -> None:
    """Flush a file or directory to disk, so that a rename after it is never seen before the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a new empty temp file's path beside `path`; when the block succeeds, flush it and
    rename it to `path`, else delete it.

    The block may replace the temp file rather than write into it (safetensors and the ONNX exporter
    do, with mode 0600): its creation mode is put back before the rename."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise write_error(path, e) from e
    mode = os.fstat(fd).st_mode & 0o777
    os.close(fd)
    try:
        yield os.fspath(tmp)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_write_error(e):
            raise write_error(path, e) from e
        raise
    try:
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(path, e) from e


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, data: Any) -> None:
    """Pretty, key-sorted JSON (as every JSON file of a model directory or the cache is written)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def temp_dir_beside(path: PathLike) -> Path:
    """A new empty directory `.<name>.<token>.tmp` next to `path`, to be filled and renamed to it."""
    tmp = _temp_name(Path(path))
    try:
        os.mkdir(tmp, 0o777)
    except OSError as e:
        raise write_error(path, e, "create a directory beside") from e
    return tmp


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `path` that becomes `path` only when the block succeeds (its
    files flushed first); deleted on failure. An existing `path` is swapped out, then deleted:
    callers decide beforehand whether it may be replaced."""
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e):
            raise write_error(path, e) from e
        raise
    try:
        _commit_directory(tmp, path)
    except (OSError, WriteFailed) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteFailed):
            raise
        raise write_error(path, e) from e


def _commit_directory(tmp: Path, path: Path) -> None:
    """Flush `tmp`'s files, then rename it to `path`; an existing `path` (a link: the link itself)
    is swapped into a temp directory first and deleted after."""
    for p in tmp.rglob("*"):
        if p.is_file() and not p.is_symlink():
            fsync_path(p)
    fsync_path(tmp)
    if os.path.lexists(path):
        old = temp_dir_beside(path)
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)
