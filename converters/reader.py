"""The checkpoint-reader interface every source format implements, and the budget each read charges.

A conversion needs four things from a source file: the tensor names, each one's shape and dtype
(to plan and validate before anything is read), one tensor at a time, and a way to let go of the
file. `CheckpointReader` names exactly that; `convert.convert` takes any object that has it.
Implementations: `mge_pickle.MgePickleReader`, `tf_checkpoint.TFCheckpointReader`,
`torch_checkpoint.TorchCheckpointReader` (safetensors, torch zip and legacy files).
Adding a source format = one reader module, one plan in `mapping`, one CLI line.

`Budget`: one per read of one input. Every record parsed, every reference resolved and every byte
materialised is charged to it; its limits are a small constant times the input's size (plus what a
config's declared shapes justify), so work and memory stay proportional to the input, whatever
its structure. Running out is a `MalformedInput` (the reader adds the file name).
"""
from __future__ import annotations

from typing import Any, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from converters.errors import MalformedInput

Shape = Tuple[int, ...]

# Materialised bytes per input byte: tied weights (two names, one storage) need 2x; a deflated
# torch zip of real weights expands ~1.1x. Records: the smallest honest record (a TF index entry,
# a pickle opcode) takes a few bytes; one per input byte plus a floor is far above any real file.
BYTES_PER_INPUT_BYTE = 4
BYTES_FLOOR = 64 << 20
RECORDS_FLOOR = 1 << 16
MAX_TENSORS = 1 << 16  # names per checkpoint: BERT-large with Adam slots has ~1.2k


@runtime_checkable
class CheckpointReader(Protocol):
    """What a conversion reads from a source checkpoint (see the module docstring)."""

    source: str  # the file or prefix, for messages

    def names(self) -> List[str]:
        """Tensor names in the file's order."""

    def shape_dtype(self, name: str) -> Tuple[Shape, str]:
        """(shape, dtype name such as 'float32', 'bfloat16') without reading the tensor."""

    def read(self, name: str) -> np.ndarray:
        """One tensor as a private, native-order numpy array (bfloat16 widened to float32)."""

    def close(self) -> None:
        """Release the file(s); later reads fail."""

    def __enter__(self) -> "CheckpointReader": ...

    def __exit__(self, *exc: Any) -> None: ...


class ReaderBase:
    """The context-manager half of the interface, shared by every reader."""

    source: str = ""

    def close(self) -> None:
        """Nothing to release by default (readers that hold descriptors override this)."""

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Budget:
    """Work and memory one read of one input may spend (module docstring).

    `Budget(n)` allows n materialised bytes (a pickle's arrays: at most the file's own bytes);
    `Budget.for_input(size, declared)` the general rule for files whose records may expand.
    """

    __slots__ = ("bytes_left", "records_left")

    def __init__(self, max_bytes: int, records: Optional[int] = None) -> None:
        self.bytes_left = max_bytes
        self.records_left = records if records is not None else max_bytes + RECORDS_FLOOR

    @classmethod
    def for_input(cls, input_bytes: int, declared: int = 0) -> "Budget":
        """A small constant times the input, plus the bytes a config's shapes declare."""
        return cls(BYTES_PER_INPUT_BYTE * input_bytes + BYTES_FLOOR + declared, input_bytes + RECORDS_FLOOR)

    def charge_bytes(self, n: int, what: str = "tensor data") -> None:
        """Before materialising `n` bytes: refuse if the input cannot justify them."""
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise MalformedInput(f"{what} would materialise more bytes than the input justifies "
                                 "(one buffer referenced many times?)")

    def charge_records(self, n: int = 1, what: str = "records") -> None:
        """For each record parsed or reference resolved."""
        self.records_left -= n
        if self.records_left < 0:
            raise MalformedInput(f"more {what} than the input's size justifies")


def check_tensor_count(count: int) -> None:
    """A checkpoint names at most MAX_TENSORS tensors (checked before any per-name work)."""
    if count > MAX_TENSORS:
        raise MalformedInput(f"{count} tensors; a BERT checkpoint has at most a few thousand (limit {MAX_TENSORS})")
