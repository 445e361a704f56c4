"""What every converter command shares: arguments, the one-screen summary, exit codes.

Exit codes: 0 converted, 1 conversion error (one line on stderr, no traceback unless --debug),
2 usage error (argparse's own).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from converters.config import GELU_NAMES
from converters.convert import ConvertOptions
from converters.errors import ConversionError
from converters.text import shown

GELU_HELP = (
    "GELU the converted config asks for. 'tanh' (default) writes hidden_act \"gelu_new\": the tanh "
    "approximation that Google's TF BERT and MegEngine's BERT actually compute, so the converted model "
    "(in bert_port or HF transformers) reproduces the source. 'erf' writes \"gelu\": exact GELU as "
    "pytorch_pretrained_bert/HF compute it (outputs then differ from the source by ~1e-3)."
)


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--force", action="store_true", help="replace the output if it already exists")
    p.add_argument("--debug", action="store_true", help="show the traceback on errors")
    return p


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the source's bert_config.json")
    p.add_argument("--vocab", help="vocab.txt to copy into the output directory")
    p.add_argument("--out", required=True, help="output directory (config.json + weights); must not exist")
    p.add_argument("--format", dest="fmt", choices=("safetensors", "pytorch"), default="safetensors",
                   help="model.safetensors (default) or pytorch_model.bin")
    p.add_argument("--gelu", choices=sorted(GELU_NAMES), default="tanh", help=GELU_HELP)
    p.add_argument("--labels", help="comma-separated class names of a classifier (default LABEL_0, LABEL_1, ...)")


def options(args: argparse.Namespace) -> ConvertOptions:
    """The parsed import arguments as the one options value the conversion takes."""
    labels = tuple(args.labels.split(",")) if getattr(args, "labels", None) else None
    return ConvertOptions(config=args.config, out=args.out, vocab=args.vocab, gelu=args.gelu, fmt=args.fmt,
                          force=args.force, labels=labels)


def main(p: argparse.ArgumentParser, action: Callable[[argparse.Namespace], dict]) -> NoReturn:
    args = p.parse_args()
    try:
        summary = action(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
    except (ConversionError, ValueError, OSError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {shown(message, 1000)}", file=sys.stderr)
        sys.exit(1)
    print_summary(summary)
    sys.exit(0)


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
