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
import pickle
import struct
from typing import Any, Dict, Mapping, Union

import numpy as np

from converters.atomic import atomic_path
from converters.files import open_regular
from converters.errors import ConversionError, MalformedInput, file_error

PathLike = Union[str, "os.PathLike[str]"]

# dtype codes a weight file may hold (numpy's pickled dtype(code, False, True) form)
_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
_MAX_NDIM = 32
_MAX_DIM = 1 << 40  # per dimension; a dimension above the file's size is impossible anyway
MAX_OPCODES = 1_000_000  # BERT-large needs ~15k; 1M bounds a crafted file to ~70 MB of objects
MAX_DICT_ITEMS = 1 << 14  # entries per dict: a BERT-large state dict (with optimizer state) has ~1.2k
MAX_KEY_CHARS = 1024  # dict keys: BERT's longest state-dict name is ~60 characters
MAX_FILE_BYTES = 1 << 36  # 64 GiB: sanity cap (BERT-large is 1.3 GB); memory is bounded by the budget below


def shown(text: object, limit: int = 100) -> str:
    """A name or key from a file, safe to print: quoted, cut short, escapes spelled out (ascii())."""
    if type(text) is str and len(text) > limit:
        return ascii(text[:limit]) + "..."
    return ascii(text) if type(text) is str else type(text).__name__


class _Budget:
    """Bytes the arrays of one load may still claim: each materialised array counts in full, so
    one buffer shared through the memo by many arrays cannot multiply the memory it costs."""

    __slots__ = ("left",)

    def __init__(self, size: int) -> None:
        self.left = size


_BUDGET: "contextvars.ContextVar[_Budget | None]" = contextvars.ContextVar("mge_array_budget", default=None)


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
        raise MalformedInput(f"unsupported numpy dtype {shown(code, 20)} (only numeric dtypes are allowed)")
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
    if budget is not None:
        budget.left -= need
        if budget.left < 0:
            raise MalformedInput("its arrays hold more bytes than the file (one buffer shared by several arrays?)")
    return np.frombuffer(raw, dtype=dt).reshape(shape, order=order)


class _Frozen:
    """Base of the stand-in objects handed to the pickle machinery: BUILD on them is refused.

    Without this a BUILD opcode on a global (say `_reconstruct`) would set attributes on it that
    outlive this load, e.g. a function's __defaults__.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise MalformedInput("BUILD on a global is not allowed")


class _NDArrayClass(_Frozen):
    """Stand-in for the `numpy.ndarray` global: only accepted as _reconstruct's first argument."""

    __slots__ = ()


_NDARRAY = _NDArrayClass()


class _Function(_Frozen):
    """An allowed global that is called (REDUCE) with positional arguments only."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


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


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocols 0-2 spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise MalformedInput("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin-1")


def _check_key(target: Any, key: Any) -> None:
    """Before a dict insertion: int/tuple/float keys hash predictably (1 + i*(2**61-1) all collide,
    making insertion quadratic), str keys use the per-process random hash, so only str is allowed."""
    if type(target) not in (dict, collections.OrderedDict):
        raise MalformedInput(f"SETITEM on a {type(target).__name__} (only dicts take items)")
    if type(key) is not str:
        raise MalformedInput(f"state-dict key of type {type(key).__name__} (expected str: a weight file's dicts have str keys only)")
    if len(key) > MAX_KEY_CHARS:
        raise MalformedInput(f"dict key of {len(key)} characters (limit {MAX_KEY_CHARS})")
    if len(target) >= MAX_DICT_ITEMS and key not in target:
        raise MalformedInput(f"a dict with more than {MAX_DICT_ITEMS} entries")


def _ordered_dict(*args: Any) -> "collections.OrderedDict[str, Any]":
    """OrderedDict() (Python 3's pickles), or OrderedDict([[key, value], ...]) (Python 2's)."""
    d: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
        raise MalformedInput("OrderedDict(...) takes only a list of (key, value) pairs")
    for pair in args[0] if args else ():
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise MalformedInput("OrderedDict(...) takes only a list of (key, value) pairs")
        _check_key(d, pair[0])
        d[pair[0]] = pair[1]
    return d


def _empty_bytes(*args: Any) -> bytes:
    """Protocols 0-2 spell b'' (an empty array's data) as bytes(); bytes(n) would allocate n."""
    if args:
        raise MalformedInput("bytes(...) with arguments is not allowed")
    return b""


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
        ("collections", "OrderedDict"): _Function(_ordered_dict),
        ("_codecs", "encode"): _Function(_codecs_encode),
        ("__builtin__", "bytes"): _Function(_empty_bytes),
        ("builtins", "bytes"): _Function(_empty_bytes),
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Function(_make_dtype),
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x writes numpy.core, numpy 2 numpy._core
        names[(core + ".multiarray", "_reconstruct")] = _Function(_reconstruct)
        names[(core + ".multiarray", "scalar")] = _Function(_scalar)
        names[(core + ".numeric", "_frombuffer")] = _Function(_frombuffer)
    for module, name in (("megengine.tensor", "Parameter"), ("megengine.tensor", "Tensor"),
                         ("megengine.tensor", "Buffer"), ("megengine.core.tensor", "Tensor"),
                         ("megengine.core.tensor_nn", "Parameter"), ("megengine.core.tensor_nn", "Buffer")):
        names[(module, name)] = _MgeTensor
    return names


_ALLOWED = _allowed_globals()


class _BoundedFile:
    """read(n) never asks the OS for more than the file still holds: a length field claiming
    10**12 bytes fails at once as a truncated file instead of reserving memory."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            if n == 1 and self._left == 0:
                return b""  # the unpickler turns this into EOFError ("ran out of input")
            raise MalformedInput(f"truncated pickle: an opcode needs {n} bytes, only {self._left} are left")
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._f.readline()
        self._left -= len(line)
        return line


def _counted(op: Any) -> Any:
    def run(self: "_RestrictedUnpickler") -> None:
        self._ops += 1
        if self._ops > MAX_OPCODES:
            raise MalformedInput(f"more than {MAX_OPCODES} pickle opcodes (a weight file needs a few per tensor)")
        op(self)
    return run


def _load_setitem(self: "_RestrictedUnpickler") -> None:
    value, key = self.stack.pop(), self.stack.pop()
    _check_key(self.stack[-1], key)
    self.stack[-1][key] = value


def _load_setitems(self: "_RestrictedUnpickler") -> None:
    items = self.pop_mark()
    target = self.stack[-1]
    if len(items) % 2:
        raise MalformedInput("SETITEMS with an odd number of stack items")
    for i in range(0, len(items), 2):
        _check_key(target, items[i])
        target[items[i]] = items[i + 1]


def _load_dict(self: "_RestrictedUnpickler") -> None:
    items = self.pop_mark()
    if len(items) % 2:
        raise MalformedInput("DICT with an odd number of stack items")
    d: "dict[str, Any]" = {}
    self.append(d)
    for i in range(0, len(items), 2):
        _check_key(d, items[i])
        d[items[i]] = items[i + 1]


def _no_sets(self: "_RestrictedUnpickler") -> None:
    raise MalformedInput("sets are not allowed in a weight file (their items would hash predictably)")


def _load_bytearray8(self: "_RestrictedUnpickler") -> None:
    # the stock loader allocates (and zero-fills) the claimed size before reading anything
    (n,) = struct.unpack("<Q", self.read(8))
    if n > self._size:
        raise MalformedInput(f"truncated pickle: BYTEARRAY8 claims {n} bytes, the file has {self._size}")
    buf = bytearray(n)
    self.readinto(buf)
    self.append(buf)


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, restricted.

    Not the C one: its memo is an array that a 9-byte pickle (LONG_BINPUT 2**31) resizes to
    16 GiB and zero-fills. Here the memo is a dict, every opcode is counted, and BYTEARRAY8
    checks its length first. Speed is no issue: a weight file has a few dozen opcodes per tensor.
    """

    dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}  # type: ignore[attr-defined]
    dispatch[pickle.BYTEARRAY8[0]] = _counted(_load_bytearray8)
    dispatch[pickle.SETITEM[0]] = _counted(_load_setitem)
    dispatch[pickle.SETITEMS[0]] = _counted(_load_setitems)
    dispatch[pickle.DICT[0]] = _counted(_load_dict)
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_op[0]] = _counted(_no_sets)

    def __init__(self, f: Any, size: int, path: str) -> None:
        super().__init__(_BoundedFile(f, size))
        self._size, self._path, self._ops = size, path, 0

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            what = ascii(f"{module[:100]}.{name[:100]}")
            raise ConversionError(
                f"{self._path}: refusing to load global {what} "
                "(only numpy arrays and MegEngine tensors are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ConversionError(f"{self._path}: persistent ids are not allowed in a MegEngine pickle")


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
    than the file holds, or content that is not a dict of str -> array.
    """
    where = os.fspath(path)
    token = _BUDGET.set(None)
    try:
        with open_regular(where, MAX_FILE_BYTES, "MegEngine pickle") as f:
            size = os.fstat(f.fileno()).st_size
            _BUDGET.set(_Budget(size))
            obj = _RestrictedUnpickler(f, size, where).load()
        return _validate(obj, where)
    except ConversionError:
        raise
    except OSError as e:
        raise file_error(where, e, "read MegEngine pickle", ConversionError) from e
    except MalformedInput as e:
        raise ConversionError(f"{where}: {e}") from e
    except RecursionError as e:
        raise ConversionError(f"{where}: not a MegEngine pickle (nested too deeply)") from e
    except MemoryError as e:
        raise ConversionError(f"{where}: not a MegEngine pickle (it needs more memory than is available)") from e
    except EOFError as e:
        raise ConversionError(f"{where}: truncated or empty pickle (no STOP opcode)") from e
    except Exception as e:  # UnpicklingError, KeyError, struct.error, ... from malformed data
        detail = ascii(str(e)[:200])[1:-1]  # may quote file bytes: escapes spelled out
        raise ConversionError(f"{where}: not a readable MegEngine pickle ({type(e).__name__}: {detail})") from e
    finally:
        _BUDGET.reset(token)


def _validate(obj: Any, where: str) -> Dict[str, np.ndarray]:
    if type(obj) not in (dict, collections.OrderedDict):
        raise ConversionError(f"{where}: expected a dict of name -> array, got {type(obj).__name__}")
    result: Dict[str, np.ndarray] = {}
    for key, value in dict.items(obj):
        if type(key) is not str:
            raise ConversionError(f"{where}: state-dict key of type {type(key).__name__} (expected str)")
        array = _as_array(value)
        if array is None:
            raise ConversionError(f"{where}: value of {shown(key, 200)} is {type(value).__name__}, not an array")
        native = array.dtype.newbyteorder("=")
        if not array.flags.writeable or not array.flags.c_contiguous or array.dtype != native:
            # at most the file's size in total: _from_bytes charged every array to the budget
            array = np.array(array, dtype=native, order="C", copy=True)
        result[key] = array
    return result


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
