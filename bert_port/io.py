"""Reading and writing weight files safely: atomic writes, no pickle code execution.

Every file bert_port writes goes to a temporary name in the target directory first and is renamed
into place, so an interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, Union

if TYPE_CHECKING:  # torch is imported where needed: the converters use this module without it
    import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def load_weights(path: PathLike) -> Dict[str, "torch.Tensor"]:
    """Load a safetensors file or a PyTorch state dict (only with `weights_only=True`), by content.

    The format is read from the file's first bytes, not its name: a script that `torch.save`s
    under any name loads. Errors name the file: a user pointed at a corrupt or hostile download
    must learn which one.
    """
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        # mmap (zero-copy, copy-on-write) needs the zip format of torch >= 1.6; older files are read.
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such weights file") from None
    except Exception as e:  # safetensors, zipfile and the weights-only unpickler raise many types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load weights ({first_line})") from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return state_dict


def save_safetensors(state_dict: Dict[str, "torch.Tensor"], path: PathLike) -> None:
    """Write `model.safetensors` as HF writes it (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
