"""python -m converters.torch2tf DIR --out PREFIX

Writes a bert_port/HF model directory as a TF1 checkpoint with Google's variable names
(PREFIX.index + PREFIX.data-00000-of-00001) that `tf.train.load_checkpoint` and Google's
modeling.py read. Kernels are transposed back to TF's [in, out]. Needs no TensorFlow.
"""
import argparse

from converters import cli
from converters.convert import torch_to_tf


def build_parser() -> argparse.ArgumentParser:
    return cli.command("torch2tf", __doc__, "model_dir", cli.MODEL_DIR_HELP, export_to="output checkpoint prefix, e.g. out/bert_model.ckpt")


if __name__ == "__main__":
    cli.main(build_parser(), lambda a: torch_to_tf(a.model_dir, a.out, force=a.force))
