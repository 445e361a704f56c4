"""Reading and writing weight files safely: atomic writes, no pickle code execution.

Every file bert_port writes goes to a temporary name in the target directory first and is renamed
into place, so an interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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
    """Load a `.safetensors` or a PyTorch `.bin` state dict; `.bin` only with `weights_only=True`.

    Errors name the file: a user pointed at a corrupt or hostile download must learn which one.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(path)
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


# `<p>.query.<k>`, `<p>.key.<k>`, `<p>.value.<k>`: BertSelfAttention fuses each such triple into one tensor.
_QKV = re.compile(r"(.*)\.query\.(weight|bias)")
_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _load_safetensors(path: Path) -> Dict[str, "torch.Tensor"]:
    """Tensors memory-mapped copy-on-write by safetensors (which validates the file), except each
    query/key/value triple: read into consecutive row blocks of one new tensor.

    BertSelfAttention adopts such a stacked tensor as its fused QKV parameter without a copy. Had
    the triple been mapped too, fusing would copy it and leave its file pages resident beside the
    copy: peak memory 1.2x the weights instead of 1.0x (bench/bench_load.py).
    """
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f, open(path, "rb") as raw:
        header = json.loads(raw.read(int.from_bytes(raw.read(8), "little")))  # as validated by safe_open
        data_start = raw.tell()
        triples = _qkv_triples(header)
        stacked = {name for triple in triples for name in triple}
        tensors = {name: f.get_tensor(name) for name in f.keys() if name not in stacked}
        for triple in triples:
            info = header[triple[0]]
            rows = info["shape"][0]
            buffer = torch.empty([3 * rows, *info["shape"][1:]], dtype=getattr(torch, _DTYPES[info["dtype"]]))
            for i, name in enumerate(triple):
                tensors[name] = part = buffer[i * rows:(i + 1) * rows]
                raw.seek(data_start + header[name]["data_offsets"][0])
                view = memoryview(part.view(torch.uint8).numpy()).cast("B")
                while view.nbytes:
                    n = raw.readinto(view)
                    if not n:
                        raise ValueError("file is truncated")
                    view = view[n:]
    return tensors


def _qkv_triples(header: dict) -> list:
    """[query, key, value] names of each triple in a safetensors header with one dtype and shape."""
    triples = []
    for name in header:
        m = _QKV.fullmatch(name)
        if not m:
            continue
        triple = [f"{m.group(1)}.{part}.{m.group(2)}" for part in ("query", "key", "value")]
        infos = [header.get(n) for n in triple]
        if all(isinstance(i, dict) and i.get("dtype") == infos[0]["dtype"] and i.get("shape") == infos[0]["shape"]
               for i in infos) and infos[0]["dtype"] in _DTYPES and infos[0]["shape"]:
            triples.append(triple)
    return triples


def save_safetensors(state_dict: Dict[str, "torch.Tensor"], path: PathLike) -> None:
    """Write `model.safetensors` as HF writes it (metadata format=pt), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def save_torch_bin(state_dict: Dict[str, "torch.Tensor"], path: PathLike) -> None:
    import torch

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
