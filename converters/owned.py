"""The paths a command owns: the one place where bert_port creates, renames and deletes.

A command owns one root: the cache root, a converter's output directory (or the directory of its
output file), a fine-tuning run's `--out`. The rules, for every caller:

* **No symbolic link below the root is followed.** Every component between the root and the path
  is `lstat`-ed and must be a real directory; a link there is refused with `UnsafePath` naming it
  (the root itself may be reached through links: the user chose it). Final components are created
  with `O_EXCL`/`O_NOFOLLOW` or `mkdir`, renamed with `os.replace` (which replaces a link, never
  its target) and deleted with `unlink`/`rmtree` (which remove links, never what they point to).
* **Only what the command wrote is deleted**: its own temporary names, or, with `--force`, existing
  files of its own kind that the caller has checked and names to the user (`replaceable_files`).
* **Lock files live inside the root** and are opened with `O_NOFOLLOW`.
* **A failed write is one line**: `write_error` turns the OSError of a full disk or a read-only
  directory into a `ConversionError` naming the file and saying that nothing was written.

Symlinks are checked by path, then acted on: the threat model (SECURITY.md) is files and links an
attacker left on disk, not a process racing this one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Iterable, List, Union

from converters.errors import ConversionError
from converters.text import shown

PathLike = Union[str, "os.PathLike[str]"]


class UnsafePath(ConversionError):
    """A path below an owned root goes through a symbolic link, or leaves the root."""


class WriteFailed(ConversionError):
    """The disk refused a write (full, read-only, too large a file): the input was fine."""


# What a refused write looks like, whichever writer (Python, numpy, torch, Rust) hit it. A read error
# inside a write block keeps its own type and message.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


def write_error(path: PathLike, error: BaseException, what: str = "write") -> WriteFailed:
    """The one-line error for a failed write (ENOSPC, EFBIG, EACCES, EROFS ...)."""
    text = str(error).strip()
    reason = getattr(error, "strerror", None) or (text.splitlines()[0] if text else type(error).__name__)
    if not isinstance(error, OSError):  # a library's own words (torch: "unexpected pos 14144 vs 14032")
        reason = f"the writer failed, is the disk full? {reason}"
    return WriteFailed(f"{shown(os.fspath(path))}: cannot {what} ({shown(reason)}); nothing was written")


def contained(root: PathLike, path: PathLike, *, last: bool = False) -> Path:
    """`path`, after checking that it lies inside `root` and that no existing directory between
    them is a symbolic link (nor `path` itself with `last=True`, for callers that would follow it:
    removing, replacing or `O_NOFOLLOW`-opening a link acts on the link, so they need not)."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise UnsafePath(f"{shown(os.fspath(path))}: outside {shown(os.fspath(root))}") from None
    if any(part in ("..", "") for part in rel.parts):
        raise UnsafePath(f"{shown(os.fspath(path))}: '..' leaves {shown(os.fspath(root))}")
    current = root
    for i, part in enumerate(rel.parts):
        current = current / part
        if i == len(rel.parts) - 1 and not last:
            break
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{shown(os.fspath(current))}: is a symbolic link inside {shown(os.fspath(root))}; "
                             "refusing to follow it (remove the link)")
    return path


def make_dirs(root: PathLike, path: PathLike) -> Path:
    """Create `path` and its missing parents below `root` (which may itself be created), never
    through a symbolic link."""
    root, path = Path(root), contained(root, path)
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current, 0o777)
        contained(root, current, last=True)
        if not current.is_dir():
            raise UnsafePath(f"{shown(os.fspath(current))}: exists and is not a directory")
    return path


def remove_tree(root: PathLike, path: PathLike) -> bool:
    """Delete a directory (or a file or link) below `root`: a link is removed itself, a directory is
    renamed aside first so nobody sees it half-deleted. False if there was nothing to remove."""
    path = contained(root, path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return True
    trash = path.with_name(f".{path.name}.{secrets.token_hex(8)}.trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)  # rmtree removes links inside, never their targets
    return True


def remove_file(root: PathLike, path: PathLike) -> bool:
    """Unlink a file or link below `root` (never a directory); False if it was not there."""
    path = contained(root, path)
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise UnsafePath(f"{shown(os.fspath(path))}: is a directory, expected a file")
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def replace(root: PathLike, src: PathLike, dst: PathLike) -> None:
    """Rename `src` over `dst`, both below `root` (a link at `dst` is replaced, not followed)."""
    os.replace(contained(root, src), contained(root, dst))


def open_lock(root: PathLike, path: PathLike) -> int:
    """A descriptor of the lock file `path` below `root` (created if needed, a link refused)."""
    path = contained(root, path)
    make_dirs(root, path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise UnsafePath(f"{shown(os.fspath(path))}: cannot open the lock file ({e.strerror or e})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{shown(os.fspath(path))}: the lock file is not a regular file")
    return fd


def replaceable_files(paths: Iterable[PathLike], force: bool) -> List[Path]:
    """The existing ones of `paths` (a single-file output: a pickle, a TF bundle's files, an .onnx).
    Without --force any existing one is refused; with it, each must be a regular file (a directory,
    link or device is never ours to replace). Returns them so the caller can name them."""
    existing = []
    for p in map(Path, paths):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if not force:
            raise ConversionError(f"{shown(os.fspath(p))}: already exists (use --force to replace it)")
        if not stat.S_ISREG(st.st_mode):
            raise ConversionError(f"{shown(os.fspath(p))}: exists and is not a regular file; --force replaces only "
                                  "files this command writes")
        existing.append(p)
    return existing


def output_dir(directory: PathLike) -> Path:
    """Create a directory the user named for outputs (and its parents: the user's choice, links
    followed); a ConversionError line when it cannot be, or is not a directory."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise write_error(directory, e, "create directory") from e
    if not directory.is_dir():
        raise ConversionError(f"{shown(os.fspath(directory))}: exists and is not a directory")
    return directory


def parent_dir(path: PathLike) -> Path:
    """Create the directory an output file goes into (see `output_dir`)."""
    return output_dir(Path(path).parent)
