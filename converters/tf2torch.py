"""python -m converters.tf2torch CKPT_PREFIX --config bert_config.json [--vocab vocab.txt] --out DIR

Converts a Google BERT checkpoint (bert_model.ckpt.index + .data-*; TF1 names, TF2 object names,
or the tensorflow/models encoder naming) into a directory that bert_port and HF transformers load.
Needs no TensorFlow. Optimizer slots (adam_m/adam_v) and bookkeeping are skipped and counted.
"""
import argparse
from typing import Any

from converters import cli
from converters.convert import ConvertOptions, convert_file


def convert(prefix, config, out_dir, **options: Any) -> dict:
    """Library entry point (kept for scripts); new code calls `convert_file("tf", prefix, ConvertOptions(...))`."""
    return convert_file("tf", prefix, ConvertOptions(config, out_dir, **options))


def build_parser() -> argparse.ArgumentParser:
    return cli.command("tf2torch", __doc__, "prefix", "checkpoint prefix, e.g. uncased_L-12_H-768_A-12/bert_model.ckpt")


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: convert_file("tf", a.prefix, cli.options(a)))
