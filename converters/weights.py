"""Loading a PyTorch or safetensors state dict, by content, without running pickle code.

torch is imported on the first call, not with this module: the converters that need it
(torch2mge, torch2tf, reading a model directory) import it only when they read one.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]


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
        raise ValueError(f"{path}: cannot load weights ({first_line})") from e
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return state_dict
