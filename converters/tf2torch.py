"""python -m converters.tf2torch CKPT_PREFIX --config bert_config.json [--vocab vocab.txt] --out DIR

Converts a Google BERT checkpoint (bert_model.ckpt.index + .data-*; TF1 names, TF2 object names,
or the tensorflow/models encoder naming) into a directory that bert_port and HF transformers load.
Needs no TensorFlow. Optimizer slots (adam_m/adam_v) and bookkeeping are skipped and counted.
"""
import argparse

from converters import cli
from converters.convert import tf_to_torch


def convert(prefix, config, out_dir, *, vocab=None, gelu="tanh", fmt="safetensors", force=False) -> dict:
    """Library entry point; raises ConversionError on bad input."""
    return tf_to_torch(prefix, config, out_dir, vocab=vocab, gelu=gelu, fmt=fmt, force=force)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m converters.tf2torch", __doc__.split("\n\n")[1])
    p.add_argument("prefix", help="checkpoint prefix, e.g. uncased_L-12_H-768_A-12/bert_model.ckpt")
    cli.add_import_arguments(p)
    return p


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: convert(a.prefix, a.config, a.out, vocab=a.vocab, gelu=a.gelu, fmt=a.fmt, force=a.force))
