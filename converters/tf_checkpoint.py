"""Read and write TensorFlow tensor-bundle checkpoints (`P.index` + `P.data-K-of-N`) without TF.

Why: Google's BERT checkpoints are TF bundles, and we convert them on machines without
TensorFlow. Format: tensor_bundle.cc + LevelDB table (summary in the project's TF reference
notes, tensorflow.md section 3), checked against files written by TF 2.21.

Reader design:
* the `.index` table is parsed and every entry validated up front (dtype known, shape vs size,
  shard exists, offset+size inside the shard), so later reads cannot run off a file;
* tensors are read lazily, one at a time, with pread into a private, writable array (a 4 GB
  checkpoint never needs 4 GB of RAM); every read verifies the tensor's crc32c on the bytes it
  returns. Never a memmap: a shard truncated or rewritten later would SIGBUS or silently change
  arrays already handed out;
* the index and the shards must be regular files (a FIFO would block, `/dev/zero` never end), the
  index at most MAX_INDEX_BYTES;
* bfloat16 is widened to float32 by default (exact: bf16 is the upper half of a float32);
  `get(name, widen_bfloat16=False)` returns the raw bits as a uint16 view instead;
* DT_STRING: a scalar gives `bytes`, other shapes a numpy object array of `bytes` (like TF), for at
  most MAX_STRING_ELEMENTS elements (one Python object each; BERT checkpoints hold no strings
  beyond TF2's scalar object graph); a bigger string tensor is refused when it is read;
* partitioned (sliced) variables are refused; BERT checkpoints never use them.
Every problem is a `ConversionError` whose message names the file.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterator, Mapping, Union

import numpy as np

from converters.atomic import atomic_path
from converters import _tf_proto as proto
from converters._leveldb_table import build_table, crc32c, mask_crc, put_varint, read_table, read_varint
from converters.errors import ConversionError, MalformedInput, file_error
from converters.files import check_regular, open_regular
from converters.reader import MAX_TENSORS, Budget, ReaderBase
from converters.text import quoted

__all__ = ["TFCheckpointReader", "load_tf_checkpoint", "list_variables", "write_tf_checkpoint"]

Tensor = Union[np.ndarray, bytes]
DT_STRING, DT_BFLOAT16 = 7, 14
# DataType enum (types.proto) -> (name, little-endian numpy dtype); bfloat16 stored as uint16 bits
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    1: ("float32", np.dtype("<f4")), 2: ("float64", np.dtype("<f8")), 3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")), 5: ("int16", np.dtype("<i2")), 6: ("int8", np.dtype("i1")),
    7: ("string", np.dtype(object)), 8: ("complex64", np.dtype("<c8")),
    9: ("int64", np.dtype("<i8")), 10: ("bool", np.dtype("?")), 14: ("bfloat16", np.dtype("<u2")),
    17: ("uint16", np.dtype("<u2")), 18: ("complex128", np.dtype("<c16")),
    19: ("float16", np.dtype("<f2")), 22: ("uint32", np.dtype("<u4")), 23: ("uint64", np.dtype("<u8")),
}
_CODE_BY_NAME = {name: code for code, (name, _) in _DTYPES.items()}
# numpy (kind, itemsize) -> code for the writer; bfloat16 has no numpy kind of its own
_CODE_BY_KIND = {(dt.kind, dt.itemsize): code for code, (_, dt) in _DTYPES.items()
                 if code not in (DT_STRING, DT_BFLOAT16)}
_TENSOR_BUNDLE_VERSION = 1  # kTensorBundleVersion: consumers older than this are refused
_MAX_RANK = proto.MAX_RANK
MAX_INDEX_BYTES = 64 << 20  # BERT-large with Adam slots: ~40 KB; entries are capped at reader.MAX_TENSORS
MAX_STRING_ELEMENTS = 1 << 12
_SHOWN_NAME = 200  # characters of a tensor name in messages
_CHUNK = 16 << 20  # crc and write granularity; keeps temporary copies small


def data_filename(prefix: str, shard: int, num_shards: int) -> str:
    """`P.data-00000-of-00001` (tensor_bundle naming.cc DataFilename)."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    """Shape for error messages, cut short so a hostile 3000-dim shape stays short."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(str(d) for d in shape[:8])}, ...] (rank {len(shape)})"


def _num_elements(shape: tuple[int, ...]) -> int:
    """Element count, saturated at 2**64 so thousands of huge dims cost no bignum work."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count = min(count * d, 1 << 64)
    return count


@dataclass(frozen=True)
class _Info:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int
    sliced: bool


class TFCheckpointReader(ReaderBase):
    """Lazy reader (a converters.reader.CheckpointReader): `names()`/`keys()`, `shape_dtype(name)`,
    `read(name)`/`get(name)`; opening validates the index. Shards are opened per read, so `close`
    has nothing to release."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = self.source = os.fspath(prefix)
        self.index_path = self.prefix + ".index"
        try:
            with open_regular(self.index_path, MAX_INDEX_BYTES, "TF checkpoint index") as f:
                data = f.read(MAX_INDEX_BYTES + 1)
        except FileNotFoundError as e:
            raise ConversionError(f"{self.index_path}: TF checkpoint index not found "
                                  "(pass the prefix, e.g. .../bert_model.ckpt)") from e
        except OSError as e:
            raise file_error(self.index_path, e, "read", ConversionError) from e
        if len(data) > MAX_INDEX_BYTES:
            raise ConversionError(f"{self.index_path}: grew past {MAX_INDEX_BYTES} bytes while being read")
        try:
            items = read_table(data, MAX_TENSORS + 1)  # + the header entry; charged per record
            if not items or items[0][0] != b"":
                raise MalformedInput("no header entry (empty key) in the index")
            header = proto.parse_header(items[0][1], consumers=(_TENSOR_BUNDLE_VERSION,))
            self._check_header(header)
            self.num_shards = header.num_shards
            infos = [(key, self._check_entry(key, value)) for key, value in items[1:]]
            # Slices of partitioned variables live under OrderedCode keys starting with NUL;
            # like TF's CheckpointReader, list only the full-tensor entries.
            self._infos = {key.decode("utf-8", "surrogateescape"): info
                           for key, info in infos if not key.startswith(b"\x00")}
        except MalformedInput as e:
            raise self._error(str(e)) from e
        self._budget = Budget.for_input(len(data) + self._check_shards())

    # ------------------------------------------------------------ validation
    def _error(self, msg: str, path: str | None = None) -> ConversionError:
        return ConversionError(f"{path or self.index_path}: {msg}")

    @staticmethod
    def _check_header(h: proto.Header) -> None:
        if h.num_shards < 1:
            raise MalformedInput(f"header claims {h.num_shards} data shards")
        if h.endianness != 0:
            raise MalformedInput("big-endian checkpoint (header endianness BIG); only little-endian is supported")
        if h.producer < 0 or h.min_consumer > _TENSOR_BUNDLE_VERSION or _TENSOR_BUNDLE_VERSION in h.rejected_consumers:
            shown = ", ".join(map(str, h.bad_consumers))
            if h.num_bad_consumers > len(h.bad_consumers):
                shown += f", ... ({h.num_bad_consumers} in all)"
            raise MalformedInput(f"unsupported tensor bundle version (producer {h.producer}, "
                          f"min_consumer {h.min_consumer}, bad_consumers [{shown}])")

    def _check_entry(self, key: bytes, value: bytes) -> _Info:
        name = quoted(key.decode("utf-8", "backslashreplace"), _SHOWN_NAME)
        try:
            e = proto.parse_entry(value)
        except MalformedInput as err:
            raise MalformedInput(f"tensor {name}: {err}") from err
        if e.dtype not in _DTYPES:
            raise MalformedInput(f"tensor {name} has unknown or unsupported dtype code {e.dtype}")
        if e.unknown_rank or any(d < 0 for d in e.shape):
            raise MalformedInput(f"tensor {name} has an unknown or negative shape {_fmt_shape(e.shape)}")
        if not 0 <= e.shard_id < self.num_shards:
            raise MalformedInput(f"tensor {name} is in shard {e.shard_id}, but the header says {self.num_shards} shards")
        if e.offset < 0 or e.size < 0:
            raise MalformedInput(f"tensor {name} has negative offset {e.offset} or size {e.size}")
        count = _num_elements(e.shape)
        label, np_dtype = _DTYPES[e.dtype]
        # numpy refuses shapes whose non-zero dims overflow intp even when a zero dim makes them empty
        if len(e.shape) > _MAX_RANK or _num_elements(tuple(d for d in e.shape if d)) * np_dtype.itemsize >= 1 << 63:
            raise MalformedInput(f"tensor {name} has an impossibly large shape {_fmt_shape(e.shape)}")
        if e.num_slices == 0:
            if e.dtype == DT_STRING:
                if count + 4 > e.size:  # >= 1 varint byte per element + 4-byte length checksum
                    raise MalformedInput(f"tensor {name}: size {e.size} bytes is too small for "
                                  f"{count} strings (shape {_fmt_shape(e.shape)})")
            elif count * np_dtype.itemsize != e.size:
                raise MalformedInput(f"tensor {name}: size {e.size} bytes disagrees with shape "
                              f"{_fmt_shape(e.shape)} ({count} x {label})")
        return _Info(e.dtype, e.shape, e.shard_id, e.offset, e.size, e.crc32c or 0, e.num_slices > 0)

    def _check_shards(self) -> int:
        """Every entry inside its shard; returns the shards' total size (what the budget derives from)."""
        sizes: dict[int, int] = {}
        for name, info in self._infos.items():
            if info.sliced:
                continue
            path = data_filename(self.prefix, info.shard, self.num_shards)
            if info.shard not in sizes:
                try:
                    st = os.stat(path)
                    check_regular(st, path, None, "data shard")
                    sizes[info.shard] = st.st_size
                except FileNotFoundError as e:
                    raise self._error(f"data shard {path} is missing") from e
                except OSError as e:
                    raise self._error(f"cannot use data shard {path}: {e.strerror or e}") from e
            if info.offset + info.size > sizes[info.shard]:
                raise self._error(f"tensor {quoted(name, _SHOWN_NAME)} (offset {info.offset}, size {info.size}) extends beyond "
                                  f"the end of the {sizes[info.shard]}-byte shard; file truncated?", path)
        return sum(sizes.values())

    # ------------------------------------------------------------ public API
    def keys(self) -> list[str]:
        """Tensor names in the index's (bytewise) order, header excluded."""
        return list(self._infos)

    names = keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def _info(self, name: str) -> _Info:
        try:
            return self._infos[name]
        except KeyError:
            raise self._error(f"no tensor named {quoted(name, _SHOWN_NAME)}") from None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, TF dtype name such as 'float32', 'bfloat16', 'string') without reading data."""
        info = self._info(name)
        return info.shape, _DTYPES[info.dtype][0]

    def _read(self, name: str, info: _Info, path: str) -> np.ndarray:
        """The entry's bytes as a private uint8 array, read with pread (never a memmap) and checked
        against its crc32c. Opened anew for each tensor: O_NONBLOCK plus a regular-file check on
        the descriptor, so a shard swapped for a FIFO since `__init__` cannot block us."""
        try:  # entries may overlap (one region named 65k times): every read is charged, bounding the work
            self._budget.charge_bytes(info.size, f"tensor {quoted(name, _SHOWN_NAME)}")
        except MalformedInput as e:
            raise self._error(str(e)) from e
        out = np.empty(info.size, np.uint8)
        crc = pos = 0
        try:
            with open_regular(path, None, "data shard") as f:
                fd = f.fileno()
                while pos < info.size:
                    chunk = os.pread(fd, min(_CHUNK, info.size - pos), info.offset + pos)
                    if not chunk:
                        raise self._error(f"tensor {quoted(name, _SHOWN_NAME)} extends beyond the end of the shard "
                                          "(file shrank?)", path)
                    crc = crc32c(chunk, crc)
                    out[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    pos += len(chunk)
        except OSError as e:
            raise self._error(f"cannot read: {e.strerror or e}", path) from e
        if info.dtype != DT_STRING and mask_crc(crc) != info.crc:
            raise self._error(f"crc32c mismatch for tensor {quoted(name, _SHOWN_NAME)}: data corrupted", path)
        return out

    def get(self, name: str, *, widen_bfloat16: bool = True) -> Tensor:
        """One tensor, crc-verified: a writable array of its own (or bytes for a string scalar)."""
        info = self._info(name)
        if info.sliced:
            raise self._error(f"tensor {quoted(name, _SHOWN_NAME)} is a partitioned (sliced) variable; not supported")
        path = data_filename(self.prefix, info.shard, self.num_shards)
        if info.dtype == DT_STRING:
            count = _num_elements(info.shape)
            if count > MAX_STRING_ELEMENTS:
                raise self._error(f"string tensor {quoted(name, _SHOWN_NAME)} has {count} elements; this reader "
                                  f"materialises at most {MAX_STRING_ELEMENTS} (BERT has no string tensors)")
            return self._strings(name, info, self._read(name, info, path).tobytes(), path)
        arr = self._read(name, info, path).view(_DTYPES[info.dtype][1]).reshape(info.shape)
        if info.dtype == DT_BFLOAT16 and widen_bfloat16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def read(self, name: str) -> np.ndarray:
        """The CheckpointReader read: `get` with bfloat16 widened; a string tensor is refused."""
        if self._info(name).dtype == DT_STRING:
            raise self._error(f"tensor {quoted(name, _SHOWN_NAME)} holds strings, not numbers")
        return self.get(name)

    def _strings(self, name: str, info: _Info, buf: bytes, path: str) -> Tensor:
        # layout: varint64 len[n] | u32 masked crc of lens (each as u32, or u64 if > 2**32-1) | bytes
        count = _num_elements(info.shape)
        lengths: list[int] = []
        pos, end = 0, len(buf)
        try:
            for _ in range(count):  # count <= size - 4 was checked at open
                n, pos = read_varint(buf, pos, end)
                lengths.append(n)
        except MalformedInput as e:
            raise self._error(f"string tensor {quoted(name, _SHOWN_NAME)}: bad length: {e}", path) from e
        packed = b"".join(struct.pack("<I", n) if n <= 0xFFFFFFFF else struct.pack("<Q", n) for n in lengths)
        crc = crc32c(packed)
        if end - pos < 4 or struct.unpack_from("<I", buf, pos)[0] != mask_crc(crc):
            raise self._error(f"string tensor {quoted(name, _SHOWN_NAME)}: length checksum mismatch", path)
        crc = crc32c(buf[pos:pos + 4], crc)
        pos += 4
        if sum(lengths) != end - pos:
            raise self._error(f"string tensor {quoted(name, _SHOWN_NAME)}: lengths add up to {sum(lengths)} bytes, "
                              f"entry holds {end - pos}", path)
        if mask_crc(crc32c(buf[pos:], crc)) != info.crc:
            raise self._error(f"crc32c mismatch for tensor {quoted(name, _SHOWN_NAME)}: data corrupted", path)
        items = []
        for n in lengths:
            items.append(buf[pos:pos + n])
            pos += n
        if info.shape == ():
            return items[0]
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(info.shape)


def load_tf_checkpoint(prefix: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors by raw TF name, each a private writable array (or bytes for a string scalar)."""
    reader = TFCheckpointReader(prefix)
    return {name: reader.get(name) for name in reader.keys()}


def list_variables(prefix: str | os.PathLike) -> list[tuple[str, list[int]]]:
    """(name, shape) pairs in sorted order, like `tf.train.list_variables`."""
    reader = TFCheckpointReader(prefix)
    return [(name, list(reader.shape_dtype(name)[0])) for name in reader.keys()]


# ================================================================ writer
def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bits with round-to-nearest-even (TF's cast); NaN stays a quiet NaN."""
    u = np.asarray(x, dtype="<f4", order="C").view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(x)
    return np.where(nan, (u >> 16) | 0x40, rounded).astype("<u2")


def _plan(prefix: str, name: str, value: object, override: str | None) -> tuple[int, tuple[int, ...], object]:
    """(dtype code, shape, payload) where payload is a little-endian ndarray or a list of bytes."""
    where = f"{prefix}: tensor {name!r}"
    if isinstance(value, (bytes, bytearray)):
        return DT_STRING, (), [bytes(value)]
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise ConversionError(f"{where}: expected numpy array or bytes, got {type(value).__name__}")
    shape = tuple(int(d) for d in value.shape)
    if value.dtype.kind in "OS":
        items = [bytes(v) if isinstance(v, (bytes, bytearray, np.bytes_)) else None for v in value.reshape(-1)]
        if any(v is None for v in items):
            raise ConversionError(f"{where}: string tensors must hold bytes")
        return DT_STRING, shape, items
    if override == "bfloat16" or value.dtype.name == "bfloat16":
        if value.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: already the right bits
            bits = np.asarray(value, order="C").view("<u2")
        elif value.dtype.kind == "f":
            bits = _to_bfloat16_bits(value)
        else:
            raise ConversionError(f"{where}: cannot store {value.dtype} as bfloat16")
        return DT_BFLOAT16, shape, bits
    if override is not None:
        if override not in _CODE_BY_NAME or override == "string":
            raise ConversionError(f"{where}: unsupported dtype override {override!r}")
        value = value.astype(_DTYPES[_CODE_BY_NAME[override]][1])
    code = _CODE_BY_KIND.get((value.dtype.kind, value.dtype.itemsize))
    if code is None:
        raise ConversionError(f"{where}: unsupported dtype {value.dtype}")
    return code, shape, np.asarray(value, dtype=_DTYPES[code][1], order="C")  # C order, little-endian


def _write_payload(f, payload: object, code: int) -> tuple[int, int]:
    """Write one tensor's bytes; returns (size, masked crc32c) as stored in its entry."""
    if code != DT_STRING:
        flat = payload.reshape(-1).view(np.uint8)
        crc = 0
        for i in range(0, flat.size, _CHUNK):
            chunk = flat[i:i + _CHUNK].tobytes()
            crc = crc32c(chunk, crc)
            f.write(chunk)
        return flat.size, mask_crc(crc)
    lens = b"".join(put_varint(len(s)) for s in payload)
    crc = crc32c(b"".join(struct.pack("<I" if len(s) <= 0xFFFFFFFF else "<Q", len(s)) for s in payload))
    length_crc = struct.pack("<I", mask_crc(crc))
    crc = crc32c(length_crc, crc)
    f.write(lens + length_crc)
    for s in payload:
        crc = crc32c(s, crc)
        f.write(s)
    return len(lens) + 4 + sum(len(s) for s in payload), mask_crc(crc)


def write_tf_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, Tensor],
                        dtypes: Mapping[str, str] | None = None) -> None:
    """Write a TF1-style bundle `prefix.index` + `prefix.data-00000-of-00001`.

    `dtypes` optionally forces a stored TF dtype per name (e.g. {"w": "bfloat16"} rounds float
    arrays to bfloat16 like tf.cast). Files are written under temporary names and renamed at the
    end (data first, index last, as TF does), so a failure leaves no partial checkpoint.
    """
    prefix = os.fspath(prefix)
    directory = os.path.dirname(prefix) or "."
    if not os.path.isdir(directory):
        raise ConversionError(f"{prefix}: output directory {directory} does not exist")
    dtypes = dict(dtypes or {})
    plans = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name.startswith("\x00"):
            raise ConversionError(f"{prefix}: tensor names must be non-empty strings not starting with NUL, "
                                  f"got {name!r}")
        plans.append((name.encode("utf-8", "surrogateescape"), name, *_plan(prefix, name, value, dtypes.get(name))))
    unknown = set(dtypes) - set(tensors)
    if unknown:
        raise ConversionError(f"{prefix}: dtype overrides for unknown tensors {sorted(unknown)}")
    plans.sort(key=lambda p: p[0])
    final_data, final_index = data_filename(prefix, 0, 1), prefix + ".index"
    try:
        items = [(b"", proto.encode_header(num_shards=1, producer=_TENSOR_BUNDLE_VERSION))]
        offset = 0
        # both files are complete under temporary names before either is renamed: data, then index
        with atomic_path(final_index) as tmp_index, atomic_path(final_data) as tmp_data:
            with open(tmp_data, "wb") as f:
                for key, _name, code, shape, payload in plans:
                    size, crc = _write_payload(f, payload, code)
                    items.append((key, proto.encode_entry(code, shape, offset, size, crc)))
                    offset += size
            with open(tmp_index, "wb") as f:
                f.write(build_table(items))
    except OSError as e:
        raise file_error(e.filename or prefix, e, "write TF checkpoint", ConversionError) from e
