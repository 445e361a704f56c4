"""Opening files named by untrusted input: regular files only, and never more than a size cap.

`open(path).read()` on a FIFO blocks forever at open(); on `/dev/zero` (or a symlink to it) it reads
until memory runs out. Here a path is opened with O_NONBLOCK (so a FIFO cannot block the open),
then `fstat` of the *opened* descriptor must say "regular file" (no check-then-open race) no
larger than the caller's cap, and reads stop at the size fstat reported. Imports nothing heavy:
the converters use it without torch.
"""
from __future__ import annotations

import json
import os
import stat
from typing import BinaryIO, Union

PathLike = Union[str, "os.PathLike[str]"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Caps for the small text files bert_port reads (SECURITY.md, "Limits"). Real files are far smaller:
# bert_config.json ~0.5 KiB, tokenizer_config.json < 1 KiB, the multilingual vocab.txt 0.9 MiB.
MAX_JSON_BYTES = 1 * MiB
MAX_VOCAB_BYTES = 64 * MiB


class NotARegularFile(OSError):
    """The path exists but is a FIFO, device, socket or directory, or exceeds its size cap."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(st: os.stat_result, path: PathLike, max_bytes: "int | None", what: str = "file") -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotARegularFile(f"{os.fspath(path)}: {what} is {_kind(st.st_mode)}, expected a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise NotARegularFile(f"{os.fspath(path)}: {what} is {st.st_size} bytes, more than the "
                              f"{max_bytes}-byte limit")


def open_regular(path: PathLike, max_bytes: "int | None", what: str = "file") -> BinaryIO:
    """A binary file object for `path` (symlinks followed) if it is a regular file <= max_bytes.

    Raises FileNotFoundError/PermissionError as `open` does, NotARegularFile (an OSError) otherwise.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(os.fstat(fd), path, max_bytes, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes (a growing file is cut
    at the cap plus one byte and refused)."""
    with open_regular(path, max_bytes, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise NotARegularFile(f"{os.fspath(path)}: {what} grew past the {max_bytes}-byte limit while being read")
    return data


def read_text(path: PathLike, max_bytes: int, what: str = "file") -> str:
    return read_regular(path, max_bytes, what).decode("utf-8")


def load_json(path: PathLike, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file") -> object:
    """Parse a small JSON file: OSError (incl. NotARegularFile) for the file, ValueError for its
    content (bad UTF-8, bad JSON, nesting deep enough to exhaust the recursion limit)."""
    data = read_regular(path, max_bytes, what)
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as e:
        raise ValueError(f"{os.fspath(path)}: {what} is nested too deeply") from e
