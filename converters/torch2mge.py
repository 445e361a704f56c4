"""python -m converters.torch2mge DIR --out FILE.pkl

Writes a bert_port/HF model directory as a MegEngine Models state dict: a dict of float32 numpy
arrays, pickle protocol 4, that MegEngine's `Module.load_state_dict` accepts. BertModel weights use
the hub form (no prefix); with a classifier, `bert.` + `classifier.` keys. MegEngine Models has
no pretraining/QA heads: those tensors are skipped and counted.
"""
import argparse

from converters import cli
from converters.convert import torch_to_mge


def build_parser() -> argparse.ArgumentParser:
    return cli.command("torch2mge", __doc__, "model_dir", cli.MODEL_DIR_HELP, export_to="output .pkl file")


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: torch_to_mge(a.model_dir, a.out, force=a.force))
