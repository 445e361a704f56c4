"""python -m converters.mge2torch SRC.pkl --config bert_config.json [--vocab vocab.txt] --out DIR

Converts MegEngine hub weights (bert_<hash>_<name>.pkl) or a MegEngine Models classifier into a
directory that bert_port and HF transformers load. Needs no MegEngine: the pickle is read by a
restricted unpickler that accepts only numpy arrays and MegEngine tensors.
"""
import argparse

from converters import cli
from converters.convert import mge_to_torch


def convert(src, config, out_dir, *, vocab=None, gelu="tanh", fmt="safetensors", force=False) -> dict:
    """Library entry point (used by bert_port.hub); raises ConversionError on bad input."""
    return mge_to_torch(src, config, out_dir, vocab=vocab, gelu=gelu, fmt=fmt, force=force)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m converters.mge2torch", __doc__.split("\n\n")[1])
    p.add_argument("src", help="MegEngine .pkl (state dict of BertModel or BertForSequenceClassification)")
    cli.add_import_arguments(p)
    return p


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: convert(a.src, a.config, a.out, vocab=a.vocab, gelu=a.gelu, fmt=a.fmt, force=a.force))
