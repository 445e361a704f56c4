"""Writing a converted model directory: all or nothing, streaming one tensor at a time.

The directory is built under a temporary sibling name and renamed into place at the end, so a
failed or killed conversion leaves nothing a later `from_pretrained` could mistake for a model.
`model.safetensors` is written as a stream (header first, computed from shapes alone, then each
tensor's bytes), so converting a multi-GB checkpoint holds one tensor in memory, not the model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from converters.atomic import atomic_directory, atomic_path
from converters.errors import ConversionError, file_error
from converters.owned import parent_dir
from converters.text import shown
from converters.files import CONFIG_NAME, SAFE_WEIGHTS_NAME, VOCAB_NAME, WEIGHTS_NAME, NotARegularFile, open_regular

_SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
                       np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("uint8"): "U8",
                       np.dtype("int8"): "I8", np.dtype("bool"): "BOOL"}


# What a conversion writes into its output directory. `--force` replaces an existing directory only
# if it holds nothing else (a previous conversion's output), so it can never delete foreign files.
OUTPUT_NAMES = frozenset({CONFIG_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, VOCAB_NAME})


def check_replaceable(out_dir: Path) -> List[str]:
    """Refuse to replace `out_dir` unless every entry in it is a regular file we would write;
    return those entries (to name them to the user)."""
    try:
        entries = list(os.scandir(out_dir))
    except OSError as e:
        raise file_error(out_dir, e, "list the existing output directory", ConversionError) from e
    foreign = sorted(e.name for e in entries if e.name not in OUTPUT_NAMES or not e.is_file(follow_symlinks=False))
    if foreign:
        names = ", ".join(shown(ascii(n), 60) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConversionError(f"{shown(out_dir)}: --force replaces only a directory of converter outputs "
                              f"({', '.join(sorted(OUTPUT_NAMES))}); it also holds {names}: "
                              "move those away or choose another --out")
    return sorted(e.name for e in entries)


@contextlib.contextmanager
def output_directory(out_dir: Path, force: bool, replaced: Optional[List[str]] = None) -> Iterator[Path]:
    """Yield a temp directory that becomes `out_dir` only when the block succeeds. An existing
    `out_dir` is replaced only with `force` and only if it holds nothing but converter outputs
    (whose names are appended to `replaced`); a link at `out_dir` is replaced, never followed."""
    out_dir = Path(out_dir)
    exists = os.path.lexists(out_dir)
    if exists and not force:
        raise ConversionError(f"{shown(out_dir)}: output directory already exists (use --force to replace it)")
    if exists and not out_dir.is_dir():
        raise ConversionError(f"{shown(out_dir)}: exists and is not a directory")
    old = check_replaceable(out_dir) if exists else []
    parent_dir(out_dir)
    with atomic_directory(out_dir) as tmp:
        yield tmp
        if os.path.lexists(out_dir):
            old = check_replaceable(out_dir)  # again: it may have changed during the conversion
    if replaced is not None:
        replaced.extend(old)


def write_safetensors(path: Path, specs: Sequence[Tuple[str, np.dtype, Tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray]) -> None:
    """Stream a safetensors file: `specs` gives (name, dtype, shape) of each tensor in order and
    `produce(name)` returns its array when its turn comes (it must match the spec)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in specs:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ConversionError(f"{name}: produced shape {array.shape}, planned {tuple(shape)}")
            f.write(memoryview(array).cast("B"))


def copy_file(src: Path, dst: Path, what: str, max_bytes: int) -> None:
    """Copy a regular file of at most `max_bytes` (a FIFO or /dev/zero is refused, not copied
    until the disk is full)."""
    try:
        with open_regular(src, max_bytes, what) as f, atomic_path(dst) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out)
    except NotARegularFile as e:
        raise ConversionError(shown(str(e), 400)) from e
    except OSError as e:
        raise file_error(src, e, f"read {what}", ConversionError) from e


def list_files(directory: Path) -> List[str]:
    return sorted(p.name for p in Path(directory).iterdir())
