"""Read PyTorch weight files without torch and without trusting them: safetensors, torch's zip
archives (records stored or deflated) and torch's legacy (pre-1.6, non-zip) serialization.

Why a reader of our own, when `torch.load(weights_only=True)` exists: it gives names, shapes and
dtypes from the file's header without reading (or allocating) any tensor, so `from_pretrained` can
check a file against its config before it builds a model; it needs no torch (converters stay
torch-free); and every byte it materialises is charged to one `reader.Budget` for the file.

Each variant is read to the numbers `torch.load(weights_only=True)` / `safetensors` give (tests
compare them on every variant), or refused with a ConversionError naming the file:
* zip: `<archive>/data.pkl` (a restricted pickle: `_rebuild_tensor_v2`, `_rebuild_parameter`,
  `OrderedDict` and the typed storage classes, nothing else), storages in `<archive>/data/<key>`
  (stored or deflated: zipfile decompresses and checks each record's crc), `<archive>/byteorder`
  "little" or "big" (absent = little, as torch assumes);
* legacy: magic number, protocol 1001 and sys-info pickles, the object pickle, the storage-key
  pickle, then each storage as int64 element count + little-endian bytes (torch writes them so);
* tensors are (storage, offset, size, stride) views: offsets, strides and shared storages are
  honoured; every view is checked to lie inside its storage before anything is read;
* safetensors: the header (at most 100 MB, like the safetensors library) must describe tensors
  that tile the data region exactly, in order, as the library checks;
* refused: torch's tar format (torch < 0.4), sparse/quantized/complex tensors, unknown dtypes.
"""
from __future__ import annotations

import collections
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Tuple, Union

import numpy as np

from converters._pickle import Frozen, Function, RestrictedUnpickler, ordered_dict, run_unpickler
from converters.text import quoted
from converters.errors import ConversionError, MalformedInput
from converters.files import open_regular
from converters.reader import Budget, ReaderBase, Shape, check_tensor_count

PathLike = Union[str, "os.PathLike[str]"]

MAX_FILE_BYTES = 1 << 36  # 64 GiB, as for MegEngine pickles
MAX_PICKLE_BYTES = 64 << 20  # data.pkl: BERT-large's is ~60 KB
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
MAX_RANK = 64
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# dtype name -> numpy code (little-endian); bfloat16 is read as its uint16 bits
_NUMPY = {"float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2", "int64": "i8", "int32": "i4",
          "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "b1", "uint16": "u2", "uint32": "u4", "uint64": "u8"}
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
             "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
_SAFETENSORS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
                "U32": "uint32", "U64": "uint64"}


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _View:
    """A tensor: `shape` elements of `storage` from `offset` with `stride` (in elements)."""

    storage: _Storage
    offset: int
    shape: Shape
    stride: Shape


class _StorageType(Frozen):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _ints(value: Any, what: str) -> Shape:
    if type(value) is not tuple or len(value) > MAX_RANK or any(type(d) is not int or not 0 <= d < 1 << 62 for d in value):
        raise MalformedInput(f"tensor {what} is not a tuple of at most {MAX_RANK} non-negative ints")
    return value


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *flags: Any) -> _View:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])."""
    if type(storage) is not _Storage or type(offset) is not int or not 0 <= offset < 1 << 62:
        raise MalformedInput("_rebuild_tensor_v2 without a storage and an offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise MalformedInput("tensor size and stride differ in rank")
    view = _View(storage, offset, size, stride)
    if all(size):  # the last element it touches must lie inside the storage
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise MalformedInput(f"a {size} view at offset {offset} runs past its storage of {storage.numel} elements")
    return view


def _rebuild_parameter(data: Any, *flags: Any) -> _View:
    """torch._utils._rebuild_parameter(data, requires_grad, hooks[, state]): the tensor is all we keep."""
    if type(data) is not _View:
        raise MalformedInput("_rebuild_parameter of something other than a tensor")
    return data


def _allowed() -> Dict[Tuple[str, str], Any]:
    names: Dict[Tuple[str, str], Any] = {
        ("collections", "OrderedDict"): Function(ordered_dict),
        ("torch._utils", "_rebuild_tensor_v2"): Function(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): Function(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): Function(_rebuild_parameter),
    }
    for cls, dtype in _STORAGES.items():
        names[("torch", cls)] = _StorageType(dtype)
    return names


class _TorchUnpickler(RestrictedUnpickler):
    """data.pkl (zip) or the object pickle (legacy); storages come from persistent ids."""

    allowed = _allowed()
    kind = "PyTorch weights file"
    allowed_text = "tensors, storages and OrderedDict"

    def __init__(self, f: Any, size: int, path: str, storages: Dict[str, _Storage]) -> None:
        super().__init__(f, size, path)
        self.storages = storages  # key -> storage, shared by every reference to it

    def persistent_load(self, pid: Any) -> Any:
        # zip: ('storage', type, key, location, numel); legacy adds view_metadata (must be None)
        if (type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage"
                or type(pid[1]) is not _StorageType or type(pid[2]) is not str or type(pid[4]) is not int
                or not 0 <= pid[4] < 1 << 62 or (len(pid) == 6 and pid[5] is not None)):
            raise MalformedInput("unsupported persistent id (only whole storages are allowed)")
        old = self.storages.get(pid[2])
        if old is None:
            check_tensor_count(len(self.storages) + 1)
            old = self.storages[pid[2]] = _Storage(pid[2], pid[1].dtype, pid[4])
        elif (old.dtype, old.numel) != (pid[1].dtype, pid[4]):
            raise MalformedInput(f"storage {quoted(pid[2])} is declared with two dtypes or sizes")
        return old


def _state_dict(obj: Any, where: str) -> Dict[str, _View]:
    if type(obj) not in (dict, collections.OrderedDict):
        raise ConversionError(f"{where}: not a state dict (expected a mapping of names to tensors)")
    check_tensor_count(len(obj))
    for key, value in dict.items(obj):
        if type(key) is not str or type(value) is not _View:
            raise ConversionError(f"{where}: not a state dict (expected a mapping of names to tensors)")
    return dict(obj)


def _nbytes(storage: _Storage) -> int:
    return storage.numel * np.dtype(_NUMPY[storage.dtype]).itemsize


class TorchCheckpointReader(ReaderBase):
    """A safetensors, torch zip or legacy torch file behind the CheckpointReader interface.

    Opening reads the header only (names, shapes, dtypes, where each storage lies) and checks it;
    `read(name)` materialises one tensor, charging the storage bytes it reads and the array it
    returns to the file's Budget (`declared`: bytes a config's shapes justify, for deflated zips).
    """

    def __init__(self, path: PathLike, declared: int = 0) -> None:
        self.source = os.fspath(path)
        try:
            self._file: "BinaryIO | None" = open_regular(self.source, MAX_FILE_BYTES, "weights file")
        except FileNotFoundError:
            raise ConversionError(f"{self.source}: no such weights file") from None
        except OSError as e:
            raise ConversionError(f"{self.source}: cannot read weights file ({e.strerror or e})") from e
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            self._budget = Budget.for_input(self._size, declared)
            self._order = "<"
            self._views, self._fetch = self._open()
            total = sum(int(np.prod(v.shape, dtype=object)) * np.dtype(_NUMPY[v.storage.dtype]).itemsize
                        for v in self._views.values())
            if total > self._budget.bytes_left:
                raise MalformedInput(f"its tensors claim {total} bytes, more than the file's {self._size} justify")
        except ConversionError:
            self.close()
            raise
        except MalformedInput as e:
            self.close()
            raise ConversionError(f"{self.source}: {e}") from e
        except Exception as e:  # zipfile, zlib, struct and json raise many types on malformed bytes
            self.close()
            raise ConversionError(f"{self.source}: not a readable weights file ({_described(e)})") from e

    def _open(self) -> Tuple[Dict[str, _View], Callable[[_Storage], bytes]]:
        head = self._pread(0, 512) if self._size >= 512 else self._pread(0, self._size)
        if head[:4] == b"PK\x03\x04":
            return self._open_zip()
        if len(head) > 262 and head[257:262] == b"ustar":
            raise MalformedInput("a torch tar archive (torch < 0.4); re-save it with a current torch")
        if head[:1] == b"\x80":
            return self._open_legacy()
        if len(head) > 8 and head[8:9] == b"{":
            return self._open_safetensors()
        raise MalformedInput("not a safetensors, torch zip or legacy torch file")

    # ------------------------------------------------------------------ formats
    def _open_zip(self) -> Tuple[Dict[str, _View], Callable[[_Storage], bytes]]:
        entries = zipfile._EndRecData(self._file)  # type: ignore[attr-defined]
        if entries is None:
            raise MalformedInput("a zip without its end-of-central-directory record")
        check_tensor_count(entries[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
        z = zipfile.ZipFile(self._file)
        names = z.namelist()
        # two readers may disagree on such archives (first vs last duplicate, shifted offsets): refuse
        if len(set(names)) != len(names) or z.start_dir != entries[zipfile._ECD_OFFSET]:  # type: ignore[attr-defined]
            raise MalformedInput("a zip with duplicate record names or bytes before the archive")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise MalformedInput("a zip archive, but not one torch.save wrote (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        order = self._zip_record(z, prefix + "byteorder", 8) if prefix + "byteorder" in z.NameToInfo else b"little"
        if order not in (b"little", b"big"):
            raise MalformedInput(f"unknown byteorder record {order[:8]!r}")
        self._order = "<" if order == b"little" else ">"
        data = self._zip_record(z, pickles[0], MAX_PICKLE_BYTES)
        storages: Dict[str, _Storage] = {}
        views = self._unpickle(_BytesFile(data), len(data), storages)
        for s in storages.values():
            info = z.NameToInfo.get(prefix + "data/" + s.key)
            if info is None or info.file_size != _nbytes(s):
                raise MalformedInput(f"storage {quoted(s.key)} of {_nbytes(s)} bytes has no record of that size")
        return views, lambda s: self._zip_record(z, prefix + "data/" + s.key, _nbytes(s), charge=True)

    def _zip_record(self, z: zipfile.ZipFile, name: str, limit: int, charge: bool = False) -> bytes:
        """A record's bytes (decompressed, crc-checked by zipfile), at most `limit` of them."""
        info = z.getinfo(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
            raise MalformedInput(f"record {quoted(name)} is encrypted or compressed with method "
                                 f"{info.compress_type} (torch reads stored and deflated records only)")
        if info.file_size > limit:
            raise MalformedInput(f"record {quoted(name)} holds {info.file_size} bytes, more than {limit}")
        if charge:
            self._budget.charge_bytes(info.file_size, f"storage {quoted(name)}")
        with z.open(info) as r:
            data = r.read(info.file_size + 1)  # reading to the end makes zipfile check the crc
        if len(data) != info.file_size:
            raise MalformedInput(f"record {quoted(name)} is truncated")
        return data

    def _open_legacy(self) -> Tuple[Dict[str, _View], Callable[[_Storage], bytes]]:
        assert self._file is not None
        self._file.seek(0)
        if self._next_pickle({}) != _LEGACY_MAGIC or self._next_pickle({}) != _LEGACY_PROTOCOL:
            raise MalformedInput("not a torch file (bad legacy magic number or protocol version)")
        self._next_pickle({})  # sys_info: torch writes the storage bytes little-endian whatever it says
        storages: Dict[str, _Storage] = {}
        views = _state_dict(self._next_pickle(storages), self.source)
        keys = self._next_pickle({})
        if type(keys) is not list or sorted(keys) != sorted(storages) or len(set(keys)) != len(keys):
            raise MalformedInput("the storage-key list disagrees with the storages the tensors use")
        where, pos = {}, self._file.tell()
        for key in keys:
            (count,) = struct.unpack("<q", self._pread(pos, 8))
            if count != storages[key].numel or pos + 8 + _nbytes(storages[key]) > self._size:
                raise MalformedInput(f"storage {quoted(key)} record does not match its {storages[key].numel} elements")
            where[key], pos = pos + 8, pos + 8 + _nbytes(storages[key])
        return views, lambda s: self._charged_pread(where[s.key], _nbytes(s), s.key)

    def _open_safetensors(self) -> Tuple[Dict[str, _View], Callable[[_Storage], bytes]]:
        (n,) = struct.unpack("<Q", self._pread(0, 8))
        if n > MAX_SAFETENSORS_HEADER or 8 + n > self._size:
            raise MalformedInput(f"safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(self._pread(8, n), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MalformedInput(f"safetensors header is not JSON ({ascii(str(e)[:100])})") from e
        if type(header) is not dict:
            raise MalformedInput("safetensors header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if type(meta) is not dict or not all(type(v) is str for v in meta.values()):
            raise MalformedInput("safetensors __metadata__ must map strings to strings")
        check_tensor_count(len(header))
        views, begin, end = {}, {}, 0
        for name, entry in sorted(header.items(), key=lambda kv: _offsets(kv)[0]):
            storage, (b, e) = _safetensors_storage(name, entry), _offsets((name, entry))
            if b != end or e - b != _nbytes(storage):
                raise MalformedInput(f"tensor {quoted(name)}: data_offsets [{b}, {e}] do not tile the data region")
            views[name], begin[name], end = _View(storage, 0, _entry_shape(entry), _contiguous(entry)), b, e
        if 8 + n + end != self._size:
            raise MalformedInput(f"safetensors data region is {self._size - 8 - n} bytes, the header describes {end}")
        return views, lambda s: self._charged_pread(8 + n + begin[s.key], _nbytes(s), s.key)

    # ------------------------------------------------------------------ helpers
    def _pread(self, pos: int, n: int) -> bytes:
        if self._file is None:
            raise ConversionError(f"{self.source}: reader is closed")
        data = os.pread(self._file.fileno(), n, pos)
        if len(data) != n:
            raise MalformedInput(f"truncated: {n} bytes at offset {pos} run past the end (file shrank?)")
        return data

    def _charged_pread(self, pos: int, n: int, key: str) -> bytes:
        self._budget.charge_bytes(n, f"storage {quoted(key)}")
        return self._pread(pos, n)

    def _next_pickle(self, storages: Dict[str, _Storage]) -> Any:
        assert self._file is not None
        unpickler = _TorchUnpickler(self._file, self._size - self._file.tell(), self.source, storages)
        return run_unpickler(unpickler, self.source)

    def _unpickle(self, f: Any, size: int, storages: Dict[str, _Storage]) -> Dict[str, _View]:
        return _state_dict(run_unpickler(_TorchUnpickler(f, size, self.source, storages), self.source), self.source)

    # ------------------------------------------------------------------ interface
    def names(self) -> List[str]:
        return list(self._views)

    def _view(self, name: str) -> _View:
        try:
            return self._views[name]
        except KeyError:
            raise ConversionError(f"{self.source}: no tensor named {quoted(name, 200)}") from None

    def shape_dtype(self, name: str) -> Tuple[Shape, str]:
        view = self._view(name)
        return view.shape, view.storage.dtype

    def read(self, name: str) -> np.ndarray:
        """One tensor, native order, C-contiguous, private; bfloat16 widened to float32 (exact)."""
        view = self._view(name)
        dtype = np.dtype(_NUMPY[view.storage.dtype]).newbyteorder(self._order)
        try:
            self._budget.charge_bytes(int(np.prod(view.shape, dtype=object)) * dtype.itemsize, f"tensor {quoted(name)}")
            raw = self._fetch(view.storage)
        except MalformedInput as e:
            raise ConversionError(f"{self.source}: {e}") from e
        except ConversionError:
            raise
        except Exception as e:  # zipfile, zlib, OSError on malformed or changed bytes
            raise ConversionError(f"{self.source}: cannot read tensor {quoted(name)} ({_described(e)})") from e
        if not all(view.shape):
            array = np.zeros(view.shape, dtype.newbyteorder("="))
        else:
            base = np.frombuffer(raw, dtype)[view.offset:]
            strided = np.lib.stride_tricks.as_strided(base, view.shape, [s * dtype.itemsize for s in view.stride],
                                                      writeable=False)
            array = np.array(strided, dtype=dtype.newbyteorder("="), order="C")
        if view.storage.dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()  # type: ignore[union-attr]
            self._file = None


def _described(e: BaseException) -> str:
    """An exception from a library parsing file bytes, for a one-line message (escapes spelled out)."""
    return f"{type(e).__name__}: {ascii(str(e)[:200])[1:-1]}"


class _BytesFile:
    """data.pkl's bytes as the file the unpickler reads."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out, self._pos = self._data[self._pos:end], min(end, len(self._data))
        return out

    def readline(self) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        out, self._pos = self._data[self._pos:end], end
        return out


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedInput("safetensors header names a key twice")
    return out


def _offsets(item: Tuple[str, Any]) -> Tuple[int, int]:
    entry = item[1]
    offsets = entry.get("data_offsets") if type(entry) is dict else None
    if (type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise MalformedInput(f"tensor {quoted(item[0])}: data_offsets must be two ordered non-negative ints")
    return offsets[0], offsets[1]


def _entry_shape(entry: Dict[str, Any]) -> Shape:
    shape = entry.get("shape")
    return _ints(tuple(shape) if type(shape) is list else None, "shape")


def _contiguous(entry: Dict[str, Any]) -> Shape:
    shape, stride, step = _entry_shape(entry), [], 1
    for d in reversed(shape):
        stride.append(step)
        step *= d
    return tuple(reversed(stride))


def _safetensors_storage(name: str, entry: Dict[str, Any]) -> _Storage:
    if set(entry) != {"dtype", "shape", "data_offsets"} or entry["dtype"] not in _SAFETENSORS:
        raise MalformedInput(f"tensor {quoted(name)}: unsupported entry or dtype {quoted(entry.get('dtype'))}")
    count = 1
    for d in _entry_shape(entry):
        count = min(count * d, 1 << 62)
    return _Storage(name, _SAFETENSORS[entry["dtype"]], count)
