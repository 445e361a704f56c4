"""Conversions between MegEngine / TF checkpoints and bert_port model directories.

Each direction is: read names -> plan them with `converters.mapping` -> check every shape against
the config -> write, streaming, into a directory that appears only when complete.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import numpy as np

from converters import mapping
from converters.atomic import atomic_path, atomic_write_text
from converters.config import ACTIVATIONS, GELU_NAMES, BertConfig
from converters.errors import ConversionError, file_error
from converters.files import CONFIG_NAME, MAX_VOCAB_BYTES, SAFE_WEIGHTS_NAME, VOCAB_NAME, WEIGHTS_NAME, weights_file
from converters.output import copy_file, list_files, output_directory, write_safetensors
from converters.weights import load_weights

PathLike = Union[str, os.PathLike]

def load_config(config_path: PathLike, gelu: str) -> BertConfig:
    """The source's bert_config.json as a BertConfig whose hidden_act names the function the source
    framework computed ("tanh", the default) or exact GELU ("erf", `--gelu erf`)."""
    if gelu not in GELU_NAMES:
        raise ConversionError(f"--gelu must be one of {sorted(GELU_NAMES)}, got {gelu!r}")
    try:
        config = BertConfig.from_json_file(config_path)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if ACTIVATIONS.get(config.hidden_act) in ("gelu_erf", "gelu_tanh"):
        config.hidden_act = GELU_NAMES[gelu]
    return config


def check_against_config(source: str, config_path: PathLike, shapes: Mapping[str, tuple], config) -> str:
    """Every planned tensor must exist in the config's model with the same shape, and vice versa."""
    architecture = mapping.architecture_of(shapes)
    declared = (getattr(config, "architectures", None) or [None])[0]
    if declared in mapping.HEADS and mapping.HEADS[declared] == mapping.HEADS[architecture]:
        architecture = declared  # keys cannot tell a token from a sequence classifier; the source config can
    num_labels = shapes.get("classifier.weight", (2,))[0]
    expected = mapping.canonical_shapes(config, architecture, num_labels)
    for name in shapes:
        if name not in expected:
            raise ConversionError(f"{source}: tensor for {name} has no place in the model {config_path} describes")
    for name, shape in expected.items():  # model order: a layer's weight is named before its bias
        if name in shapes and tuple(shapes[name]) != shape:
            raise ConversionError(f"{source}: {name} has shape {tuple(shapes[name])} but {config_path} implies {shape}")
    missing = sorted(set(expected) - set(shapes))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConversionError(f"{source}: missing tensors the config {config_path} requires: {shown}")
    return architecture


def write_model_dir(
    source: str,
    config,
    config_path: PathLike,
    plan: mapping.Plan,
    shapes: Mapping[str, tuple],
    read: Callable[[str], np.ndarray],
    out_dir: PathLike,
    vocab: Optional[PathLike],
    fmt: str,
    force: bool,
) -> dict:
    """Write config.json + weights (+ vocab.txt) for a planned conversion. `shapes` are target shapes."""
    if fmt not in ("safetensors", "pytorch"):
        raise ConversionError(f"--format must be safetensors or pytorch, got {fmt!r}")
    architecture = check_against_config(source, config_path, shapes, config)
    by_target = {target: (src, layout) for src, (target, layout) in plan.renames.items()}

    def produce(target: str) -> np.ndarray:
        src, layout = by_target[target]
        array = mapping.to_layout(np.asarray(read(src)), layout)
        return array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array

    order = sorted(shapes)
    out_dir = Path(out_dir)
    with output_directory(out_dir, force) as tmp:
        hf = config.to_hf_dict([architecture])
        if "classifier.weight" in shapes:
            n = shapes["classifier.weight"][0]
            hf.setdefault("id2label", {str(i): f"LABEL_{i}" for i in range(n)})
            hf.setdefault("label2id", {f"LABEL_{i}": i for i in range(n)})
        atomic_write_text(tmp / CONFIG_NAME, BertConfig.from_dict(hf).to_json_string())
        if vocab is not None:
            copy_file(Path(vocab), tmp / VOCAB_NAME, "vocab", MAX_VOCAB_BYTES)
        if fmt == "safetensors":
            specs = [(name, np.dtype(np.float32), shapes[name]) for name in order]
            write_safetensors(tmp / SAFE_WEIGHTS_NAME, specs, produce)
        else:
            import torch

            tensors = {name: torch.from_numpy(np.array(produce(name))) for name in order}
            with atomic_path(tmp / WEIGHTS_NAME) as path:
                torch.save(tensors, path)
        files = list_files(tmp)
    return {
        "source": source,
        "output": str(out_dir),
        "architecture": architecture,
        "hidden_act": config.hidden_act,
        "tensors_converted": len(order),
        "skipped": len(plan.skipped),
        "unknown": list(plan.unknown),
        "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
        "files": files,
    }


def mge_to_torch(src: PathLike, config: PathLike, out_dir: PathLike, *, vocab: Optional[PathLike] = None,
                 gelu: str = "tanh", fmt: str = "safetensors", force: bool = False) -> dict:
    """MegEngine hub .pkl (or a Models classifier) -> bert_port/HF model directory."""
    from converters.mge_pickle import load_mge_pickle

    cfg = load_config(config, gelu)
    tensors = load_mge_pickle(src)
    plan = mapping.canonical_from_mge(tensors)
    shapes = {target: tuple(tensors[name].shape) for name, (target, _) in plan.renames.items()}
    return write_model_dir(str(src), cfg, config, plan, shapes, tensors.__getitem__, out_dir, vocab, fmt, force)


def tf_to_torch(prefix: PathLike, config: PathLike, out_dir: PathLike, *, vocab: Optional[PathLike] = None,
                gelu: str = "tanh", fmt: str = "safetensors", force: bool = False) -> dict:
    """Google TF1 / TF2 checkpoint -> bert_port/HF model directory, one tensor in memory at a time."""
    from converters.tf_checkpoint import TFCheckpointReader

    cfg = load_config(config, gelu)
    reader = TFCheckpointReader(prefix)
    plan = mapping.plan_from_tf(reader.keys(), cfg.num_hidden_layers)
    shapes = {}
    for name, (target, layout) in plan.renames.items():
        shape, _ = reader.shape_dtype(name)
        shapes[target] = mapping.to_layout(np.empty(shape, dtype=np.uint8), layout).shape
    return write_model_dir(str(prefix), cfg, config, plan, shapes, reader.get, out_dir, vocab, fmt, force)


def _canonical_state(model_dir: PathLike) -> Dict[str, np.ndarray]:
    """A bert_port/HF model directory's weights by canonical name (`bert.` prefix added if absent)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a model directory")
    try:
        state = load_weights(weights_file(model_dir))
    except ValueError as e:
        raise ConversionError(str(e)) from e
    out = {}
    for name, tensor in state.items():
        out[mapping.canonical_key(name)] = tensor.detach().float().numpy() if tensor.is_floating_point() else tensor.numpy()
    return out


def torch_to_mge(model_dir: PathLike, out_file: PathLike, *, force: bool = False) -> dict:
    """bert_port/HF directory -> MegEngine Models state dict pickle (float32 ndarrays, protocol 4)."""
    from converters.mge_pickle import save_mge_pickle

    state = _canonical_state(model_dir)
    plan = mapping.mge_from_canonical(state)
    out = {target: np.ascontiguousarray(state[src], dtype=np.float32) for src, (target, _) in plan.renames.items()}
    _refuse_existing(out_file, force)
    save_mge_pickle(out, out_file)
    return _export_summary(model_dir, out_file, plan, out)


def torch_to_tf(model_dir: PathLike, out_prefix: PathLike, *, force: bool = False) -> dict:
    """bert_port/HF directory -> TF1 checkpoint with Google's names (kernels transposed back)."""
    from converters.tf_checkpoint import write_tf_checkpoint

    state = _canonical_state(model_dir)
    plan = mapping.plan_from_canonical(state)
    out = {target: mapping.to_layout(np.asarray(state[src], dtype=np.float32), layout)
           for src, (target, layout) in plan.renames.items()}
    _refuse_existing(str(out_prefix) + ".index", force)
    write_tf_checkpoint(out_prefix, out)
    _remove_stale_shards(out_prefix)
    return _export_summary(model_dir, out_prefix, plan, out)


def _remove_stale_shards(prefix: PathLike) -> None:
    """After --force over an older bundle with more shards: its `.data-NNNNN-of-MMMMM` files (M != 1)
    would sit next to the new single-shard checkpoint and confuse whoever globs the prefix."""
    import re

    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + r"\.data-\d{5}-of-(\d{5})")
    for f in prefix.parent.iterdir():
        m = pattern.fullmatch(f.name)
        if m and m.group(1) != "00001" and f.is_file():
            f.unlink()


def _refuse_existing(path: PathLike, force: bool) -> None:
    """Refuse to overwrite without --force; create the parent directory otherwise."""
    if Path(path).exists() and not force:
        raise ConversionError(f"{path}: already exists (use --force to replace it)")
    if Path(path).exists() and not Path(path).is_file():  # --force replaces our kind of file only
        raise ConversionError(f"{path}: exists and is not a regular file; --force will not replace it")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise file_error(Path(path).parent, e, "create directory", ConversionError) from e


def _export_summary(model_dir, output, plan: mapping.Plan, out: Mapping[str, np.ndarray]) -> dict:
    return {
        "source": str(model_dir),
        "output": str(output),
        "tensors_converted": len(out),
        "skipped": len(plan.skipped),
        "unknown": list(plan.unknown),
        "parameters": int(sum(a.size for a in out.values())),
    }
