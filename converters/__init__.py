"""Readers and converters for MegEngine hub pickles, Google TF checkpoints and torch/safetensors
files (no MegEngine, no TF, no torch).

    converters.load_mge_pickle(path) -> dict[str, numpy.ndarray]   (restricted unpickler)
    converters.load_tf_checkpoint(prefix) -> dict[str, numpy.ndarray | bytes]   (crc-verified)

Every format also has a lazy reader behind one interface, `converters.reader.CheckpointReader`
(`MgePickleReader`, `TFCheckpointReader`, `TorchCheckpointReader`). They return raw source names;
`converters.mapping` maps them to bert_port's keys. Every error is a `ConversionError` (a
ValueError) naming the file and the problem.
"""
from converters.errors import ConversionError
from converters.mge_pickle import load_mge_pickle
from converters.tf_checkpoint import load_tf_checkpoint

__all__ = ["ConversionError", "load_mge_pickle", "load_tf_checkpoint"]
