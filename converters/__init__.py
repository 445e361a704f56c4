"""Readers and converters for MegEngine hub pickles and Google TF checkpoints (no MegEngine, no TF)."""
from converters.errors import ConversionError

__all__ = ["ConversionError"]
