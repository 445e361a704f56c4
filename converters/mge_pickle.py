"""Read and write MegEngine weight pickles (.pkl) without MegEngine, and without trusting them.

A MegEngine hub file is `megengine.save(model.state_dict(), f)`: a pickled OrderedDict of numpy
arrays (protocol 4 from MegEngine 1.x, 5 from 0.x on Python >= 3.8). `state_dict(keep_var=True)`
and whole-tensor saves pickle `megengine.tensor.Parameter`/`Tensor` objects instead.

`pickle.load` would run any callable the file names, so `load_mge_pickle` unpickles with an
allow-list of exact global names. None of them is the real thing: numpy's reconstruction helpers,
`numpy.dtype`, `numpy.ndarray` and MegEngine's tensor classes all map to small stand-ins that only
record plain data and validate it (dtype numeric, byte count = shape x itemsize) BEFORE numpy
allocates anything, so a hostile file can neither run code nor make us allocate more than it holds.
numpy.core.* names are served under numpy 2 without touching the deprecated `numpy.core` module.
"""
from __future__ import annotations

import collections
import contextvars
import os
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np

from converters._pickle import (MAX_DICT_ITEMS, MAX_OPCODES, Frozen, Function, RestrictedUnpickler,  # noqa: F401
                                codecs_encode, empty_bytes, ordered_dict, run_unpickler)
from converters.text import quoted
from converters.atomic import atomic_path
from converters.errors import ConversionError, MalformedInput, file_error
from converters.files import open_regular
from converters.reader import Budget, ReaderBase, check_tensor_count

PathLike = Union[str, "os.PathLike[str]"]

# dtype codes a weight file may hold (numpy's pickled dtype(code, False, True) form)
_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
_MAX_NDIM = 32
_MAX_DIM = 1 << 40  # per dimension; a dimension above the file's size is impossible anyway
MAX_FILE_BYTES = 1 << 36  # 64 GiB: sanity cap (BERT-large is 1.3 GB); memory is bounded by the budget below


# the budget of the load in progress (arrays are built inside pickle callbacks, which take no extra argument)
_BUDGET: "contextvars.ContextVar[Budget | None]" = contextvars.ContextVar("mge_array_budget", default=None)


def _shape(value: Any) -> "tuple[int, ...]":
    # dims are bounded before any arithmetic: a shape of memo copies of one 10**100000 int would
    # otherwise cost minutes of bignum multiplication
    if type(value) is not tuple or len(value) > _MAX_NDIM or any(type(d) is not int for d in value):
        raise MalformedInput(f"invalid array shape of type {type(value).__name__}")
    if any(d < 0 or d > _MAX_DIM for d in value):
        raise MalformedInput(f"array shape with a dimension outside [0, {_MAX_DIM}]")
    return value


def _nbytes(shape: "tuple[int, ...]", itemsize: int) -> int:
    n = itemsize
    for d in shape:  # at most 32 dims of at most 2**40: a 1320-bit int at worst
        n *= d
    return n


class _DType:
    """Stand-in for numpy.dtype: a whitelisted numeric code plus a byte order, nothing else."""

    __slots__ = ("code", "order")

    def __init__(self, code: str) -> None:
        self.code, self.order = code, "="

    def __setstate__(self, state: Any) -> None:
        # numpy writes (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if (type(state) is not tuple or len(state) < 5 or state[1] not in ("<", ">", "|", "=")
                or state[2:5] != (None, None, None)):
            raise MalformedInput("unsupported numpy dtype state (only plain numeric dtypes are allowed)")
        self.order = state[1]

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


def _make_dtype(code: Any = None, align: Any = False, copy: Any = True) -> _DType:
    if type(code) is not str or code not in _DTYPE_CODES:
        raise MalformedInput(f"unsupported numpy dtype {quoted(code, 20)} (only numeric dtypes are allowed)")
    return _DType(code)


def _from_bytes(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Checks the byte count against the claimed shape before numpy sees either."""
    if type(dtype) is not _DType:
        raise MalformedInput("array dtype is not a numpy dtype")
    dt, shape = dtype.resolve(), _shape(shape)
    if type(raw) not in (bytes, bytearray):
        raise MalformedInput(f"array data of type {type(raw).__name__} (expected bytes)")
    need = _nbytes(shape, dt.itemsize)
    if len(raw) != need:
        shape_text = str(shape) if len(shape) <= 8 else f"of rank {len(shape)}"
        raise MalformedInput(f"array data holds {len(raw)} bytes but shape {shape_text} of {dt} needs {need}")
    if order not in ("C", "F"):
        raise MalformedInput("invalid array memory order")
    budget = _BUDGET.get()
    if budget is not None:  # every materialised array counts in full: one buffer shared by many costs each
        budget.charge_bytes(need, "its arrays")
    return np.frombuffer(raw, dtype=dt).reshape(shape, order=order)


class _NDArrayClass(Frozen):
    """Stand-in for the `numpy.ndarray` global: only accepted as _reconstruct's first argument."""

    __slots__ = ()


_NDARRAY = _NDArrayClass()


class _ArrayState:
    """What the numpy helpers return. BUILD passes numpy's (version, shape, dtype, fortran, data)."""

    __slots__ = ("array",)

    def __init__(self, array: "np.ndarray | None" = None) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        if type(state) is not tuple or len(state) not in (4, 5):
            raise MalformedInput("invalid numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if (len(state) == 5 and state[0] != 1) or type(fortran) is not bool:
            raise MalformedInput("invalid numpy array state")
        self.array = _from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any = None, typecode: Any = None) -> _ArrayState:
    if subtype is not _NDARRAY:
        raise MalformedInput("numpy _reconstruct of something other than numpy.ndarray")
    return _ArrayState()


def _frombuffer(raw: Any, dtype: Any, shape: Any, order: Any) -> _ArrayState:
    return _ArrayState(_from_bytes(raw, dtype, shape, order))


def _scalar(dtype: Any, raw: Any = None) -> Any:
    return _from_bytes(raw, dtype, (), "C").item()


class _MgeTensor:
    """Stand-in for MegEngine's Tensor/Parameter/Buffer: keeps the data argument, ignores the rest.

    1.x pickles Parameter.__new__(cls, ndarray, dtype, device) + BUILD {} (or {"qparams": ...});
    1.0-1.2 and 0.x pickled an empty object + BUILD {"data": ndarray, "device", "dtype", ...}.
    It must be a real class (NEWOBJ requires one); BUILD on the class itself fails (unbound call).
    """

    __slots__ = ("data",)

    def __new__(cls, data: Any = None, *args: Any, **kwargs: Any) -> "_MgeTensor":
        self = object.__new__(cls)
        self.data = data
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if type(state) is not dict or not _TENSOR_STATE_KEYS.issuperset(state):
            raise MalformedInput("unexpected MegEngine tensor state (expected a dict with keys from "
                       f"{sorted(_TENSOR_STATE_KEYS)})")
        if "data" in state:
            self.data = state["data"]


# keys MegEngine's Tensor.__getstate__ wrote: 1.x {} / {"qparams"}; 1.0-1.2 data/device/dtype/qdict;
# 0.x data/device/dtype/metadata. Only "data" is used; anything else (say "__class__") is refused.
_TENSOR_STATE_KEYS = frozenset({"data", "device", "dtype", "qdict", "qparams", "metadata"})


def _allowed_globals() -> "dict[tuple[str, str], Any]":
    names: "dict[tuple[str, str], Any]" = {
        ("collections", "OrderedDict"): Function(ordered_dict),
        ("_codecs", "encode"): Function(codecs_encode),
        ("__builtin__", "bytes"): Function(empty_bytes),
        ("builtins", "bytes"): Function(empty_bytes),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): Function(_make_dtype),
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x writes numpy.core, numpy 2 numpy._core
        names[(core + ".multiarray", "_reconstruct")] = Function(_reconstruct)
        names[(core + ".multiarray", "scalar")] = Function(_scalar)
        names[(core + ".numeric", "_frombuffer")] = Function(_frombuffer)
    for module, name in (("megengine.tensor", "Parameter"), ("megengine.tensor", "Tensor"),
                         ("megengine.tensor", "Buffer"), ("megengine.core.tensor", "Tensor"),
                         ("megengine.core.tensor_nn", "Parameter"), ("megengine.core.tensor_nn", "Buffer")):
        names[(module, name)] = _MgeTensor
    return names


class _MgeUnpickler(RestrictedUnpickler):
    allowed = _allowed_globals()
    kind = "MegEngine pickle"
    allowed_text = "numpy arrays and MegEngine tensors"


def _as_array(value: Any) -> "np.ndarray | None":
    if type(value) is _MgeTensor:
        value = value.data
    if type(value) is _ArrayState:
        value = value.array
    return value if type(value) is np.ndarray else None


def load_mge_pickle(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a MegEngine .pkl state dict into {name: writable, native-order, C-contiguous ndarray}.

    Raises ConversionError (naming the file) for a missing/truncated/non-pickle/non-regular file,
    any global outside the allow-list, malformed array data, arrays that together claim more bytes
    than the file holds, or content that is not a dict of str -> array. Names whose pickle refers
    to one array object (the memo) share one array, as they shared one object in the file.
    """
    where = os.fspath(path)
    token = _BUDGET.set(None)
    try:
        with open_regular(where, MAX_FILE_BYTES, "MegEngine pickle") as f:
            size = os.fstat(f.fileno()).st_size
            _BUDGET.set(Budget(size, records=MAX_OPCODES))  # arrays: at most the file's bytes
            obj = run_unpickler(_MgeUnpickler(f, size, where), where)
        return _validate(obj, where)
    except OSError as e:
        raise file_error(where, e, "read MegEngine pickle", ConversionError) from e
    except MalformedInput as e:
        raise ConversionError(f"{where}: {e}") from e
    finally:
        _BUDGET.reset(token)


def _validate(obj: Any, where: str) -> Dict[str, np.ndarray]:
    if type(obj) not in (dict, collections.OrderedDict):
        raise ConversionError(f"{where}: expected a dict of name -> array, got {type(obj).__name__}")
    check_tensor_count(len(obj))
    result: Dict[str, np.ndarray] = {}
    private: Dict[int, np.ndarray] = {}  # id(array from the pickle) -> its one native copy
    for key, value in dict.items(obj):
        if type(key) is not str:
            raise ConversionError(f"{where}: state-dict key of type {type(key).__name__} (expected str)")
        array = _as_array(value)
        if array is None:
            raise ConversionError(f"{where}: value of {quoted(key, 200)} is {type(value).__name__}, not an array")
        if id(array) not in private:  # one copy per array object, never one per reference to it
            native = array.dtype.newbyteorder("=")
            if not array.flags.writeable or not array.flags.c_contiguous or array.dtype != native:
                # at most the file's size in total: _from_bytes charged every array to the budget
                array = np.array(array, dtype=native, order="C", copy=True)
            private[id(_as_array(value))] = array
        result[key] = private[id(_as_array(value))]
    return result


class MgePickleReader(ReaderBase):
    """A MegEngine pickle behind the CheckpointReader interface (converters.reader).

    A pickle has no index: it is parsed once, whole, when the reader opens (its arrays are bounded
    by the file's size); `read` then hands out a copy of one array.
    """

    def __init__(self, path: PathLike) -> None:
        self.source = os.fspath(path)
        self._arrays: "Dict[str, np.ndarray] | None" = load_mge_pickle(path)
        self._budget = Budget.for_input(sum(a.nbytes for a in {id(a): a for a in self._arrays.values()}.values()))

    def _get(self, name: str) -> np.ndarray:
        if self._arrays is None:
            raise ConversionError(f"{self.source}: reader is closed")
        try:
            return self._arrays[name]
        except KeyError:
            raise ConversionError(f"{self.source}: no tensor named {quoted(name, 200)}") from None

    def names(self) -> List[str]:
        return list(self._arrays or ())

    def shape_dtype(self, name: str) -> Tuple[Tuple[int, ...], str]:
        array = self._get(name)
        return tuple(array.shape), array.dtype.name

    def read(self, name: str) -> np.ndarray:
        array = self._get(name)
        try:  # each copy handed out is charged: reading one name a million times is refused
            self._budget.charge_bytes(array.nbytes, f"tensor {quoted(name, 200)}")
        except MalformedInput as e:
            raise ConversionError(f"{self.source}: {e}") from e
        return array.copy()

    def close(self) -> None:
        self._arrays = None


# ------------------------------------------------------------------------------------------ writing
def _op_unicode(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def _op_int(value: int) -> bytes:
    return b"J" + value.to_bytes(4, "little", signed=True)  # BININT


_F4_DTYPE = (b"cnumpy\ndtype\n" + _op_unicode("f4") + b"\x89\x88\x87R"  # dtype('f4', False, True)
             + b"(" + _op_int(3) + _op_unicode("<") + b"NNN" + _op_int(-1) + _op_int(-1) + _op_int(0) + b"tb")


def _array_header(shape: "tuple[int, ...]", nbytes: int) -> bytes:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') + BUILD (1, shape, f4, False, <data>)."""
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _op_int(0) + b"\x85C\x01b\x87R"
            + b"(" + _op_int(1) + b"(" + b"".join(_op_int(d) for d in shape) + b"t" + _F4_DTYPE + b"\x89"
            + b"\x8e" + nbytes.to_bytes(8, "little"))  # BINBYTES8; caller writes the data, then b"tb"


def save_mge_pickle(tensors: Mapping[str, Any], path: PathLike) -> None:
    """Write {name: array} as MegEngine's hub form: OrderedDict of float32 arrays, pickle protocol 4.

    Written opcode by opcode (streaming the array bytes), with `numpy.core.*` global names so that
    MegEngine's numpy 1.x reads it exactly like `megengine.save(model.state_dict(), f)` output, even
    when this runs under numpy 2. Atomic: a temp file in the same directory, then os.replace.
    """
    where = os.fspath(path)
    arrays = []
    for key, value in tensors.items():
        if type(key) is not str or not key.isprintable():
            raise ConversionError(f"{where}: state-dict key {key!r:.100} is not a printable str")
        try:
            array = np.ascontiguousarray(np.asarray(value), dtype="<f4")
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConversionError(f"{where}: value of '{key}' is not a float array ({e})") from e
        if any(d >= 2 ** 31 for d in array.shape):
            raise ConversionError(f"{where}: '{key}' has a dimension too large for this writer")
        arrays.append((key, array))
    try:
        _write_atomically(where, arrays)
    except OSError as e:
        raise file_error(where, e, "write MegEngine pickle", ConversionError) from e


def _write_atomically(where: str, arrays: "list[tuple[str, np.ndarray]]") -> None:
    with atomic_path(where) as tmp, open(tmp, "wb") as f:
        f.write(b"\x80\x04ccollections\nOrderedDict\n)R(")  # PROTO 4, OrderedDict(), MARK
        for key, array in arrays:
            f.write(_op_unicode(key) + _array_header(array.shape, array.nbytes))
            f.write(array.reshape(-1).view(np.uint8).data)
            f.write(b"tb")
        f.write(b"u.")  # SETITEMS, STOP
