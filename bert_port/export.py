"""Export a model to ONNX with dynamic batch and sequence axes, then check it in ONNX Runtime.

    python -m bert_port.export MODEL --out model.onnx [--head BertForSequenceClassification]

MODEL is a pretrained name or a directory (converter output, save_pretrained, ppb layout). The
head defaults to the one the directory's config names (`architectures`), else BertModel. After
writing, the ONNX model runs in ONNX Runtime on a padded batch of another shape than the export
example, and the largest difference from our eager model (at every position, padding included) is
printed.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from bert_port.heads import MODEL_CLASSES
from converters import runner
from converters.atomic import atomic_path
from converters.owned import replaceable_files
from converters.text import shown
from converters.files import CONFIG_NAME, load_json

INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]
# The classes whose inputs are (batch, seq), as each declares (multiple choice adds a choice axis).
HEADS = tuple(name for name, cls in MODEL_CLASSES.items() if cls.input_axes == ("batch", "seq"))
TOLERANCE = 1e-4
INSTALL_HINT = 'pip install -e ".[export]" (onnx, onnxscript, onnxruntime)'


class _Outputs(nn.Module):
    """The model with tensor-only outputs: BertModel gives (last layer, pooled), heads their logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask) -> Tuple[torch.Tensor, ...]:
        from bert_port.model import BertModel

        if isinstance(self.model, BertModel):
            return self.model(input_ids, token_type_ids, attention_mask, output_all_encoded_layers=False)
        out = self.model(input_ids, token_type_ids, attention_mask)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def output_names(head: str) -> List[str]:
    return list(MODEL_CLASSES[head].output_names)


def example_inputs(config, batch: int, seq_len: int, seed: int) -> Tuple[torch.Tensor, ...]:
    """Random ids with a different amount of padding per row (the first row none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, config.vocab_size, (batch, seq_len), generator=g)
    types = torch.randint(0, config.type_vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for row in range(1, batch):
        mask[row, max(1, seq_len - 3 * row):] = 0
    return ids * mask, types * mask, mask


def export_onnx(model: nn.Module, path: os.PathLike, head: str, *, exporter: str = "dynamo", opset: int = 18) -> None:
    """Write `model` (eval mode) to `path` atomically, with dynamic batch and sequence axes."""
    wrapped = _Outputs(model).eval()
    example = example_inputs(model.config, 2, 16, seed=0)
    names = output_names(head)
    path = Path(path)
    with atomic_path(path) as tmp, torch.no_grad():
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=model.config.max_position_embeddings)
            shapes = {n: {0: batch, 1: seq} for n in INPUT_NAMES}
            program = torch.onnx.export(wrapped, example, dynamic_shapes=shapes, input_names=INPUT_NAMES,
                                        output_names=names, opset_version=opset, dynamo=True, verbose=False)
            program.save(tmp)
        else:
            axes = {n: {0: "batch", 1: "seq"} for n in INPUT_NAMES}
            axes.update({n: {0: "batch", 1: "seq"} if _has_seq_axis(head, n) else {0: "batch"} for n in names})
            torch.onnx.export(wrapped, example, tmp, input_names=INPUT_NAMES, output_names=names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)


def _has_seq_axis(head: str, name: str) -> bool:
    return name in MODEL_CLASSES[head].seq_axis_outputs


def require_export_packages(exporter: str = "dynamo") -> None:
    """One line naming the install command when what export needs is missing (the `export` extra)."""
    needed = ("onnx", "onnxruntime") + (("onnxscript",) if exporter == "dynamo" else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(f"export needs {', '.join(missing)}: {INSTALL_HINT}")


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Exporters and ONNX Runtime warn and log about their own internals (deprecations, graph
    rewrites); none of it concerns the user, whose outcome is the parity line we print."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir", "onnxruntime")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def check_onnx(model: nn.Module, path: os.PathLike, head: str) -> float:
    """max |ours - ONNX Runtime| at every position of a padded (3, 23) batch."""
    import onnxruntime

    inputs = example_inputs(model.config, 3, 23, seed=1)
    with torch.no_grad():
        ours = _Outputs(model).eval()(*inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    return max(float((a - torch.from_numpy(b)).abs().max()) for a, b in zip(ours, theirs))


def _head_of(directory: Optional[Path]) -> str:
    if directory is None:
        return "BertModel"
    try:  # a capped read of a regular file (SECURITY.md): the directory may come from anyone
        archs = load_json(directory / CONFIG_NAME, what="config").get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return "BertModel"
    return next((a for a in archs if a in HEADS), "BertModel")


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("python -m bert_port.export", __doc__.split("\n\n")[0], f"Needs: {INSTALL_HINT}")
    p.add_argument("model", help="a pretrained name or a model directory")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--head", choices=HEADS,
                   help="model class (default: the one the directory's config.json names, else BertModel)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx.export's dynamo exporter or the TorchScript one")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version to target")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    replaceable_files([out], args.force)  # an existing --out only with --force, and only a regular file
    if not out.parent.is_dir():
        raise ValueError(f"{shown(out.parent)}: no such directory")
    require_export_packages(args.exporter)
    local = Path(args.model) if Path(args.model).is_dir() else None
    head = args.head or _head_of(local)
    model = MODEL_CLASSES[head].from_pretrained(args.model).eval()
    with quiet_third_party():
        export_onnx(model, out, head, exporter=args.exporter, opset=args.opset)
        worst = check_onnx(model, out, head)
    print(f"wrote {shown(out)} ({head}, {args.exporter} exporter, opset {args.opset}, dynamic batch and sequence axes)")
    verdict = "ok" if worst <= TOLERANCE else f"MISMATCH (> {TOLERANCE:g})"
    print(f"parity: max |bert_port - onnxruntime| = {worst:.2e} on a padded 3x23 batch (every position): {verdict}")
    return 0 if worst <= TOLERANCE else 1


def main(argv: Optional[List[str]] = None) -> int:
    return runner.run(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
