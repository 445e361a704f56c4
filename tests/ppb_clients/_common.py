"""Shared by the client drivers: arguments, seeds, Python 3.11 shims for 2019 code, and the output file.

The drivers are plain pytorch_pretrained_bert client programs: they never name bert_port. The test
runs each one twice, `python DRIVER` (real pytorch_pretrained_bert 0.6.2) and
`python -m bert_port.alias DRIVER` (the alias), and compares the .npz files they write.
"""
import argparse
import collections
import collections.abc
import json
import random

import numpy as np
import torch

# allennlp 0.8.4 imports these from `collections`; Python 3.10 removed the aliases.
for _name in ("Callable", "Iterable", "Mapping", "MutableMapping", "MutableSet", "Sequence"):
    setattr(collections, _name, getattr(collections.abc, _name))

# Sentences of very different lengths, so that every batch is padded.
SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch.",
    "Hello world",
    "Transformers read whole sentences at once and weigh every word against every other word.",
    "It rained.",
    "BERT was published in 2018 and quickly became the default encoder for many language tasks.",
    "Short one",
    "Padding tokens fill the shorter rows of a batch so that all rows have the same length.",
]


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a pytorch_pretrained_bert model directory")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--float64", action="store_true",
                        help="run the model in float64 (the test's high-precision reference, inference outputs)")
    return parser.parse_args()


def float64_by_default(args):
    """With --float64, float tensors made from here on are float64: for libraries that build the model
    themselves, from the weights file only (no random initialization that the wider dtype would redraw)."""
    if args.float64:
        torch.set_default_dtype(torch.float64)


def seed(value=0):
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def save(path, arrays):
    """Write every output as float64 arrays, plus which BertModel produced them (in `backend`)."""
    import pytorch_pretrained_bert

    out = {k: np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v, dtype=np.float64)
           for k, v in arrays.items()}
    out["backend"] = np.array(json.dumps(pytorch_pretrained_bert.BertModel.__module__))
    np.savez(path, **out)
