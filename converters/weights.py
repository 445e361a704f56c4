"""Loading a PyTorch or safetensors state dict, by content, without running pickle code.

torch is imported on the first call, not with this module: the converters that need it
(torch2mge, torch2tf, reading a model directory) import it only when they read one.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Mapping, Tuple, Union

from converters.text import shown

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]


def _mappable_zip(path: Path) -> bool:
    """A zip archive whose records are all stored uncompressed (what torch.save writes)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsWeights(Mapping):
    """A safetensors file as a read-only mapping name -> tensor, each tensor read when asked.

    `read_into(name, out)` reads a tensor's bytes straight into `out` with plain reads (no mmap):
    copying a checkpoint into a model this way holds nothing beside the model, instead of a second
    copy of every weight (peak memory ~1x the weights instead of ~2x; bench/bench_load.py).
    The safetensors library validates the header (offsets, sizes, dtypes) before anything is read.
    """

    def __init__(self, path: PathLike) -> None:
        import json

        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as f:  # raises on a malformed header
            keys = list(f.keys())
        with open(self.path, "rb") as raw:
            size = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(size))
        self._data_start = 8 + size
        self._info = {k: header[k] for k in keys}

    def __getitem__(self, key: str) -> "torch.Tensor":
        import torch

        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._info[key]["shape"])

    def dtype(self, key: str) -> "torch.dtype":
        import torch

        return getattr(torch, _SAFETENSORS_DTYPES[self._info[key]["dtype"]])

    def read_into(self, key: str, out: "torch.Tensor") -> None:
        """Read tensor `key` into `out`: a contiguous CPU tensor of its shape and dtype."""
        begin, end = self._info[key]["data_offsets"]
        if not out.is_contiguous() or out.dtype != self.dtype(key) or out.numel() * out.element_size() != end - begin:
            raise ValueError(f"{self.path}: {key!r} cannot be read into a {tuple(out.shape)} {out.dtype} tensor")
        import torch

        if end == begin:
            return
        view = memoryview(out.detach().view(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            while view.nbytes:
                n = f.readinto(view)
                if not n:
                    raise ValueError(f"{self.path}: file is truncated in {key!r}")
                view = view[n:]


def open_weights(path: PathLike) -> Mapping[str, "torch.Tensor"]:
    """Like `load_weights`, but a safetensors file is read lazily (see SafetensorsWeights)."""
    path = Path(path)
    try:
        if _is_safetensors(path):
            return SafetensorsWeights(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such weights file") from None
    except Exception as e:  # the safetensors header parser raises its own types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{shown(path)}: cannot load weights ({shown(first_line)})") from e
    return load_weights(path)


def load_weights(path: PathLike) -> Dict[str, "torch.Tensor"]:
    """Load a safetensors file or a PyTorch state dict (only with `weights_only=True`), by content.

    The format is read from the file's first bytes, not its name: a script that `torch.save`s
    under any name loads. Errors name the file: a user pointed at a corrupt or hostile download
    must learn which one.
    """
    import torch

    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        # mmap (zero-copy, copy-on-write) needs the zip format of torch >= 1.6 with every record stored:
        # torch maps a compressed record's bytes as they are (silently wrong numbers); others are read.
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_mappable_zip(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such weights file") from None
    except Exception as e:  # safetensors, zipfile and the weights-only unpickler raise many types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{shown(path)}: cannot load weights ({shown(first_line)})") from e
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return state_dict
