"""Conversions between source checkpoints (MegEngine, TF, torch/safetensors) and bert_port model
directories, and back (torch2mge, torch2tf).

An import is `convert(reader, plan, options)`: a `reader.CheckpointReader` gives names and shapes,
`mapping` plans them, every shape is checked against the config, then tensors are read one at a
time and streamed into a directory that appears only when complete. `SOURCES` lists the formats.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from converters import mapping
from converters.atomic import atomic_path, atomic_write_text
from converters.config import ACTIVATIONS, GELU_NAMES, BertConfig, label_maps
from converters.errors import ConversionError
from converters.files import CONFIG_NAME, MAX_VOCAB_BYTES, SAFE_WEIGHTS_NAME, VOCAB_NAME, WEIGHTS_NAME, weights_file
from converters.output import copy_file, list_files, output_directory, write_safetensors
from converters.owned import parent_dir, remove_file, replaceable_files, write_error
from converters.reader import CheckpointReader

PathLike = Union[str, os.PathLike]

@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion into a model directory is told, from argparse (or a library call) to
    the writer, as one value. `labels` names the classifier's classes (default `LABEL_i`)."""

    config: PathLike  # the source's bert_config.json
    out: PathLike  # the model directory to create
    vocab: Optional[PathLike] = None  # vocab.txt to copy beside the weights
    gelu: str = "tanh"  # what a source "gelu" becomes: GELU_NAMES key
    fmt: str = "safetensors"  # or "pytorch" (pytorch_model.bin)
    force: bool = False  # replace an existing output of ours
    labels: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.gelu not in GELU_NAMES:
            raise ConversionError(f"--gelu must be one of {sorted(GELU_NAMES)}, got {self.gelu!r}")
        if self.fmt not in ("safetensors", "pytorch"):
            raise ConversionError(f"--format must be safetensors or pytorch, got {self.fmt!r}")


def load_config(options: ConvertOptions) -> BertConfig:
    """The source's bert_config.json as a BertConfig whose hidden_act names the function the source
    framework computed ("tanh", the default) or exact GELU ("erf", `--gelu erf`)."""
    try:
        config = BertConfig.from_json_file(options.config)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if ACTIVATIONS.get(config.hidden_act) in ("gelu_erf", "gelu_tanh"):
        config.hidden_act = GELU_NAMES[options.gelu]
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


def target_shapes(reader: CheckpointReader, plan: mapping.Plan) -> Dict[str, Tuple[int, ...]]:
    """Each planned tensor's shape in the target layout, from the reader's header (nothing read)."""
    shapes = {}
    for name, (target, layout) in plan.renames.items():
        shape, _ = reader.shape_dtype(name)
        shapes[target] = mapping.layout_shape(shape, layout)
    return shapes


def convert(reader: CheckpointReader, plan: mapping.Plan, options: ConvertOptions) -> dict:
    """THE conversion: a planned checkpoint -> config.json + weights (+ vocab.txt) in `options.out`.

    Every shape is checked against the config before anything is read; tensors are then read one
    at a time and streamed into the output, which appears only when complete."""
    config = load_config(options)
    shapes = target_shapes(reader, plan)
    architecture = check_against_config(reader.source, options.config, shapes, config)
    by_target = {target: (src, layout) for src, (target, layout) in plan.renames.items()}

    def produce(target: str) -> np.ndarray:
        src, layout = by_target[target]
        array = mapping.to_layout(np.asarray(reader.read(src)), layout)
        return array.astype(np.float32, copy=False) if array.dtype.kind == "f" else array

    out_dir, replaced = Path(options.out), []
    with output_directory(out_dir, options.force, replaced) as tmp:
        _write_config(tmp, config, architecture, shapes, options.labels)
        if options.vocab is not None:
            copy_file(Path(options.vocab), tmp / VOCAB_NAME, "vocab", MAX_VOCAB_BYTES)
            _check_vocab_lines(tmp / VOCAB_NAME, options.vocab, config.vocab_size)
        _write_weights(tmp, options.fmt, {name: shapes[name] for name in sorted(shapes)}, produce)
        files = list_files(tmp)
    return {
        "source": reader.source, "output": str(out_dir), "architecture": architecture,
        "hidden_act": config.hidden_act, "tensors_converted": len(shapes), "skipped": len(plan.skipped),
        "unknown": list(plan.unknown), "parameters": int(sum(int(np.prod(s)) for s in shapes.values())),
        "files": files,
        "replaced": replaced,
    }


def _check_vocab_lines(copy: Path, source: PathLike, vocab_size: int) -> None:
    """A vocab.txt with more tokens than the embedding has rows gives ids the model cannot look up:
    refused now (lines counted in C over the copy, not parsed), not at the first long word."""
    lines, last = 0, b"\n"
    with open(copy, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    lines += last != b"\n"
    if lines > vocab_size:
        raise ConversionError(f"{source}: vocabulary has {lines} lines, more than the config's vocab_size {vocab_size}")


def _write_config(tmp: Path, config: BertConfig, architecture: str, shapes: Mapping[str, tuple],
                  labels: Optional[Tuple[str, ...]]) -> None:
    hf = config.to_hf_dict([architecture])
    if "classifier.weight" in shapes:
        n = shapes["classifier.weight"][0]
        if labels is not None and len(labels) != n:
            raise ConversionError(f"{len(labels)} labels given for a classifier of {n} classes")
        id2label, label2id = label_maps(n, labels)
        hf.setdefault("id2label", id2label)
        hf.setdefault("label2id", label2id)
    atomic_write_text(tmp / CONFIG_NAME, BertConfig.from_dict(hf).to_json_string())


def _write_weights(tmp: Path, fmt: str, shapes: Mapping[str, tuple], produce: Callable[[str], np.ndarray]) -> None:
    if fmt == "safetensors":
        write_safetensors(tmp / SAFE_WEIGHTS_NAME, [(n, np.dtype(np.float32), s) for n, s in shapes.items()], produce)
        return
    import torch

    tensors = {name: torch.from_numpy(np.array(produce(name))) for name in shapes}
    with atomic_path(tmp / WEIGHTS_NAME) as path:
        try:
            torch.save(tensors, path)
        except RuntimeError as e:  # torch's C++ writer: "file write failed" on a full disk
            raise write_error(tmp / WEIGHTS_NAME, e) from e


# source format -> (its reader class as "module:Class", its plan from names and config). Adding a
# format is one reader module (a reader.CheckpointReader), one plan in `mapping`, one row here.
SOURCES: Dict[str, Tuple[str, Callable[[List[str], BertConfig], mapping.Plan]]] = {
    "megengine": ("converters.mge_pickle:MgePickleReader", lambda names, config: mapping.canonical_from_mge(names)),
    "tf": ("converters.tf_checkpoint:TFCheckpointReader",
           lambda names, config: mapping.plan_from_tf(names, config.num_hidden_layers)),
    "torch": ("converters.torch_checkpoint:TorchCheckpointReader",
              lambda names, config: mapping.canonical_from_torch(names)),
}


def open_reader(source_format: str, src: PathLike) -> CheckpointReader:
    """The format's reader on `src` (its module imported only now: a TF conversion loads no pickle code)."""
    module, _, name = SOURCES[source_format][0].partition(":")
    return getattr(importlib.import_module(module), name)(src)


def convert_file(source_format: str, src: PathLike, options: ConvertOptions) -> dict:
    """Open `src` with the format's reader, plan its names, `convert`. The library call behind every
    import CLI and `bert_port.hub`; raises ConversionError on bad input."""
    make_plan = SOURCES[source_format][1]
    config = load_config(options)  # before the (possibly large) source is opened
    with open_reader(source_format, src) as reader:
        return convert(reader, make_plan(reader.names(), config), options)


def mge_to_torch(src: PathLike, config: PathLike, out_dir: PathLike, **options: Any) -> dict:
    """MegEngine hub .pkl (or a Models classifier) -> bert_port/HF model directory."""
    return convert_file("megengine", src, ConvertOptions(config, out_dir, **options))


def tf_to_torch(prefix: PathLike, config: PathLike, out_dir: PathLike, **options: Any) -> dict:
    """Google TF1 / TF2 checkpoint -> bert_port/HF model directory, one tensor in memory at a time."""
    return convert_file("tf", prefix, ConvertOptions(config, out_dir, **options))


def _canonical_state(model_dir: PathLike) -> Dict[str, np.ndarray]:
    """A bert_port/HF model directory's weights by canonical name (`bert.` prefix added if absent),
    read by the torch-free reader (floats as float32: bfloat16/float16 widened exactly)."""
    from converters.torch_checkpoint import TorchCheckpointReader

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a model directory")
    try:
        path = weights_file(model_dir)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    out = {}
    with TorchCheckpointReader(path) as reader:
        for name in reader.names():
            array = reader.read(name)
            out[mapping.canonical_key(name)] = array.astype(np.float32) if array.dtype.kind == "f" else array
    return out


def torch_to_mge(model_dir: PathLike, out_file: PathLike, *, force: bool = False) -> dict:
    """bert_port/HF directory -> MegEngine Models state dict pickle (float32 ndarrays, protocol 4)."""
    from converters.mge_pickle import save_mge_pickle

    state = _canonical_state(model_dir)
    plan = mapping.mge_from_canonical(state)
    out = {target: np.ascontiguousarray(state[src], dtype=np.float32) for src, (target, _) in plan.renames.items()}
    replaced = replaceable_files([out_file], force)
    parent_dir(out_file)
    save_mge_pickle(out, out_file)
    return _export_summary(model_dir, out_file, plan, out, replaced)


def torch_to_tf(model_dir: PathLike, out_prefix: PathLike, *, force: bool = False) -> dict:
    """bert_port/HF directory -> TF1 checkpoint with Google's names (kernels transposed back)."""
    from converters.tf_checkpoint import data_filename, write_tf_checkpoint

    state = _canonical_state(model_dir)
    plan = mapping.plan_from_canonical(state)
    out = {target: mapping.to_layout(np.asarray(state[src], dtype=np.float32), layout)
           for src, (target, layout) in plan.renames.items()}
    bundle = _bundle_files(out_prefix)
    replaced = replaceable_files(bundle, force)  # every file of an existing bundle: ours to replace only with --force
    parent_dir(out_prefix)
    write_tf_checkpoint(out_prefix, out)
    written = {Path(str(out_prefix) + ".index"), Path(data_filename(os.fspath(out_prefix), 0, 1))}
    for stale in replaced:  # an older bundle's other shards would confuse whoever globs the prefix
        if stale not in written:
            remove_file(stale.parent, stale)
    return _export_summary(model_dir, out_prefix, plan, out, replaced)


def _bundle_files(prefix: PathLike) -> list:
    """The files of a TF bundle at `prefix` on disk: `.index` and every `.data-NNNNN-of-MMMMM`."""
    import re

    prefix = Path(prefix)
    pattern = re.compile(re.escape(prefix.name) + r"\.(index|data-\d{5}-of-\d{5})")
    try:
        names = sorted(os.listdir(prefix.parent))
    except OSError:
        return []
    return [prefix.parent / n for n in names if pattern.fullmatch(n)]


def _export_summary(model_dir, output, plan: mapping.Plan, out: Mapping[str, np.ndarray], replaced=()) -> dict:
    return {
        "source": str(model_dir),
        "output": str(output),
        "tensors_converted": len(out),
        "skipped": len(plan.skipped),
        "unknown": list(plan.unknown),
        "parameters": int(sum(a.size for a in out.values())),
        "replaced": [p.name for p in replaced],
    }
