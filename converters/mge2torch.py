"""python -m converters.mge2torch SRC.pkl --config bert_config.json [--vocab vocab.txt] --out DIR

Converts MegEngine hub weights (bert_<hash>_<name>.pkl) or a MegEngine Models classifier into a
directory that bert_port and HF transformers load. Needs no MegEngine: the pickle is read by a
restricted unpickler that accepts only numpy arrays and MegEngine tensors.
"""
import argparse
from typing import Any

from converters import cli
from converters.convert import ConvertOptions, convert_file


def convert(src, config, out_dir, **options: Any) -> dict:
    """Library entry point (kept for scripts); new code calls `convert_file("megengine", src, ConvertOptions(...))`."""
    return convert_file("megengine", src, ConvertOptions(config, out_dir, **options))


def build_parser() -> argparse.ArgumentParser:
    return cli.command("mge2torch", __doc__, "src", "MegEngine .pkl (state dict of BertModel or BertForSequenceClassification)")


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: convert_file("megengine", a.src, cli.options(a)))
