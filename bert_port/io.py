"""Reading and writing weight files safely: atomic writes, no pickle code execution.

Every file bert_port writes goes through `converters.atomic` (re-exported here): a temporary name
in the target directory, flushed, then renamed into place, so an interrupted run never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, Union

from converters.atomic import atomic_path, atomic_write_text
from converters.owned import write_error
from converters.weights import load_weights

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]


def save_safetensors(state_dict: Dict[str, "torch.Tensor"], path: PathLike) -> None:
    """Write `model.safetensors` as HF writes it (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={"format": "pt"})
        except OSError:
            raise
        except Exception as e:  # safetensors' Rust writer: SafetensorError("... IoError(Os { code: 28 ..")
            raise write_error(path, e) from e


__all__ = ["atomic_path", "atomic_write_text", "load_weights", "save_safetensors"]
