"""The files of a model directory: their names, and opening ones named by untrusted input.

A model directory (what `save_pretrained` and the converters write, what `from_pretrained` reads)
holds a config under one of CONFIG_NAMES and weights under one of WEIGHTS_NAMES, in that order of
preference, plus `vocab.txt`.

Untrusted paths are opened as regular files only, and never read past a size cap.

`open(path).read()` on a FIFO blocks forever at open(); on `/dev/zero` (or a symlink to it) it reads
until memory runs out. Here a path is opened with O_NONBLOCK (so a FIFO cannot block the open),
then `fstat` of the *opened* descriptor must say "regular file" (no check-then-open race) no
larger than the caller's cap, and reads stop at the size fstat reported.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

WEIGHTS_NAME = "pytorch_model.bin"  # pytorch_pretrained_bert's names
CONFIG_NAME = "config.json"
BERT_CONFIG_NAME = "bert_config.json"  # Google's and MegEngine's name
TF_WEIGHTS_NAME = "model.ckpt"
SAFE_WEIGHTS_NAME = "model.safetensors"  # what save_pretrained and the converters write (HF's name)
VOCAB_NAME = "vocab.txt"
CONFIG_NAMES = (CONFIG_NAME, BERT_CONFIG_NAME)  # the reference's order of preference
WEIGHTS_NAMES = (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)

MiB = 1 << 20

# Caps for the small text files bert_port reads (SECURITY.md, "Limits"). Real files are far smaller:
# bert_config.json ~0.5 KiB, tokenizer_config.json < 1 KiB, the multilingual vocab.txt 0.9 MiB.
MAX_JSON_BYTES = 1 * MiB
MAX_VOCAB_BYTES = 64 * MiB
MAX_VOCAB_LINES = 1 << 20  # tokens per vocab.txt, = the config's vocab_size limit (mBERT: 119,547)


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


def find_file(directory: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` that is a file in `directory` (ValueError naming them all if none is)."""
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory}: no {what} file found (looked for {', '.join(names)})")


def weights_file(directory: Path) -> Path:
    """The newest of the directory's weight files: a script that re-saves `pytorch_model.bin` beside
    an older `model.safetensors` (or the other way round) gets what it saved last."""
    found = [directory / n for n in WEIGHTS_NAMES if (directory / n).is_file()]
    if not found:
        raise ValueError(f"{directory}: no weights file found (looked for {', '.join(WEIGHTS_NAMES)})")
    return max(found, key=lambda p: p.stat().st_mtime_ns)
