"""What every converter command shares: arguments and the one-screen summary. Errors and exit
codes follow `converters.runner` (0 converted, 1 error in one line, 2 usage, --debug traceback).
"""
from __future__ import annotations

import argparse
from typing import Callable, NoReturn

from converters import runner
from converters.config import GELU_NAMES
from converters.convert import ConvertOptions
from converters.text import shown

GELU_HELP = (
    "GELU the converted config asks for. 'tanh' writes hidden_act \"gelu_new\": the tanh "
    "approximation that Google's TF BERT and MegEngine's BERT actually compute, so the converted model "
    "(in bert_port or HF transformers) reproduces the source. 'erf' writes \"gelu\": exact GELU as "
    "pytorch_pretrained_bert/HF compute it (outputs then differ from the source by ~1e-3)."
)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = runner.parser(prog, description)
    p.add_argument("--force", action="store_true", help="replace the output if it already exists")
    return p


def command(module: str, doc: str, source: str, source_help: str, export_to: str = "") -> argparse.ArgumentParser:
    """The parser of `python -m converters.MODULE`: its docstring's second paragraph as description,
    `source` (the input path), then the import arguments, or for an export only `--out` (`export_to`)."""
    p = parser(f"python -m converters.{module}", doc.split("\n\n")[1])
    p.add_argument(source, help=source_help)
    if export_to:
        p.add_argument("--out", required=True, help=export_to)
    else:
        add_import_arguments(p)
    return p


MODEL_DIR_HELP = "directory with config.json and model.safetensors / pytorch_model.bin"


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the source's bert_config.json")
    p.add_argument("--vocab", help="vocab.txt to copy into the output directory (default: none copied)")
    p.add_argument("--out", required=True, help="output directory (config.json + weights); must not exist")
    p.add_argument("--format", dest="fmt", choices=("safetensors", "pytorch"), default="safetensors",
                   help="model.safetensors or pytorch_model.bin")
    p.add_argument("--gelu", choices=sorted(GELU_NAMES), default="tanh", help=GELU_HELP)
    p.add_argument("--labels", help="comma-separated class names of a classifier (default LABEL_0, LABEL_1, ...)")


def options(args: argparse.Namespace) -> ConvertOptions:
    """The parsed import arguments as the one options value the conversion takes."""
    labels = tuple(args.labels.split(",")) if getattr(args, "labels", None) else None
    return ConvertOptions(config=args.config, out=args.out, vocab=args.vocab, gelu=args.gelu, fmt=args.fmt,
                          force=args.force, labels=labels)


def main(p: argparse.ArgumentParser, action: Callable[[argparse.Namespace], dict]) -> NoReturn:
    """Run a converter command (`converters.runner`'s policy) and print its summary."""
    runner.main(p, lambda args: print_summary(action(args)))


def print_summary(s: dict) -> None:
    print(f"converted {shown(s['source'])} -> {shown(s['output'])}")
    if "architecture" in s:
        print(f"  architecture  {s['architecture']} (hidden_act {s['hidden_act']})")
    print(f"  tensors       {s['tensors_converted']} converted, {s['skipped']} skipped "
          f"(optimizer state, bookkeeping, tied copies), {len(s['unknown'])} unknown")
    print(f"  parameters    {s['parameters']:,}")
    if "files" in s:
        print(f"  files         {', '.join(s['files'])}")
    if s.get("replaced"):
        print(f"  replaced      {', '.join(shown(n, 60) for n in s['replaced'])} (the previous output, --force)")
    if s["unknown"]:
        names = ", ".join(shown(ascii(n), 60) for n in s["unknown"][:8]) + (" ..." if len(s["unknown"]) > 8 else "")
        print(f"  warning: not converted (names not understood): {names}")
