"""Just enough protobuf wire format for tensor_bundle.proto (no protobuf dependency).

    BundleHeaderProto  {1 num_shards int32; 2 endianness enum (0 LITTLE, 1 BIG);
                        3 version VersionDef {1 producer; 2 min_consumer; 3 bad_consumers*}}
    BundleEntryProto   {1 dtype enum; 2 shape TensorShapeProto {2 dim* {1 size int64; 2 name};
                        3 unknown_rank bool}; 3 shard_id int32; 4 offset int64; 5 size int64;
                        6 crc32c fixed32; 7 slices* TensorSliceProto}
Unknown fields are skipped (forward compatible, like protobuf); a known field with the wrong
wire type, a group, or a length past the buffer raises `MalformedInput`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from converters._leveldb_table import put_varint, read_varint
from converters.errors import MalformedInput

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
MAX_RANK = 64  # numpy's NPY_MAXDIMS; TF allows 254 but no real checkpoint comes close
_SHOWN_BAD_CONSUMERS = 8  # bad_consumers kept for the error message; the rest are only counted


def _fields(buf: bytes, what: str) -> list[tuple[int, int, int | bytes]]:
    """(field_number, wire_type, value) for every field; value is int or bytes (wire type 2)."""
    out: list[tuple[int, int, int | bytes]] = []
    pos, end = 0, len(buf)
    try:
        while pos < end:
            tag, pos = read_varint(buf, pos, end)
            field, wire = tag >> 3, tag & 7
            if field == 0:
                raise MalformedInput("field number 0")
            if wire == _VARINT:
                value, pos = read_varint(buf, pos, end)
            elif wire == _FIXED64:
                if end - pos < 8:
                    raise MalformedInput("truncated fixed64")
                value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
            elif wire == _FIXED32:
                if end - pos < 4:
                    raise MalformedInput("truncated fixed32")
                value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
            elif wire == _LEN:
                n, pos = read_varint(buf, pos, end)
                if n > end - pos:
                    raise MalformedInput(f"length {n} runs past the end of the message")
                value, pos = buf[pos:pos + n], pos + n
            else:
                raise MalformedInput(f"unsupported wire type {wire}")
            out.append((field, wire, value))
    except MalformedInput as e:
        raise MalformedInput(f"malformed {what} protobuf: {e}") from e
    return out


def _signed(v: int, bits: int) -> int:
    """Varint int32/int64 fields carry negative numbers as 64-bit two's complement."""
    v = v - (1 << 64) if v >> 63 else v
    if not -(1 << (bits - 1)) <= v < (1 << (bits - 1)):
        raise MalformedInput(f"int{bits} field out of range: {v}")
    return v


def _expect(wire: int, want: int, field: int, what: str) -> None:
    if wire != want:
        raise MalformedInput(f"malformed {what} protobuf: field {field} has wire type {wire}, expected {want}")


@dataclass
class Header:
    num_shards: int = 0
    endianness: int = 0
    producer: int = 0
    min_consumer: int = 0
    bad_consumers: tuple[int, ...] = ()  # the first few, for messages
    num_bad_consumers: int = 0
    rejected_consumers: frozenset = frozenset()  # which of the versions asked about are listed


@dataclass
class Entry:
    dtype: int = 0
    shape: tuple[int, ...] = ()
    unknown_rank: bool = False
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None
    num_slices: int = 0


def parse_header(buf: bytes, consumers: "tuple[int, ...]" = (1,)) -> Header:
    """`consumers`: versions whose presence in bad_consumers is recorded; a hostile header may
    list millions, which are counted, not kept."""
    h = Header()
    bad: list[int] = []
    rejected: set[int] = set()

    def add_bad(x: int) -> None:
        h.num_bad_consumers += 1
        if len(bad) < _SHOWN_BAD_CONSUMERS:
            bad.append(x)
        if x in consumers:
            rejected.add(x)

    for field, wire, value in _fields(buf, "BundleHeaderProto"):
        if field in (1, 2):
            _expect(wire, _VARINT, field, "BundleHeaderProto")
            if field == 1:
                h.num_shards = _signed(value, 32)
            else:
                h.endianness = _signed(value, 32)
        elif field == 3:
            _expect(wire, _LEN, field, "BundleHeaderProto")
            for f2, w2, v2 in _fields(value, "VersionDef"):
                if f2 == 3 and w2 == _LEN:  # packed repeated int32
                    p = 0
                    while p < len(v2):
                        x, p = read_varint(v2, p, len(v2))
                        add_bad(_signed(x, 32))
                    continue
                if f2 in (1, 2, 3):
                    _expect(w2, _VARINT, f2, "VersionDef")
                    x = _signed(v2, 32)
                    if f2 == 1:
                        h.producer = x
                    elif f2 == 2:
                        h.min_consumer = x
                    else:
                        add_bad(x)
    h.bad_consumers = tuple(bad)
    h.rejected_consumers = frozenset(rejected)
    return h


def _parse_shape(buf: bytes, e: Entry, dims: list[int]) -> None:
    """Append buf's dims to `dims` (a repeated occurrence of a message field merges, as in
    protobuf; one shared list keeps 100k repeated shape fields linear). The rank is bounded here,
    while parsing, not after."""
    for field, wire, value in _fields(buf, "TensorShapeProto"):
        if field == 2:
            _expect(wire, _LEN, field, "TensorShapeProto")
            size = 0
            for f2, w2, v2 in _fields(value, "TensorShapeProto.Dim"):
                if f2 == 1:
                    _expect(w2, _VARINT, f2, "TensorShapeProto.Dim")
                    size = _signed(v2, 64)
            if len(dims) >= MAX_RANK:
                raise MalformedInput(f"impossibly large shape (rank above {MAX_RANK})")
            dims.append(size)
        elif field == 3:
            _expect(wire, _VARINT, field, "TensorShapeProto")
            e.unknown_rank = bool(value)


def parse_entry(buf: bytes) -> Entry:
    e = Entry()
    dims: list[int] = []
    for field, wire, value in _fields(buf, "BundleEntryProto"):
        if field == 1:
            _expect(wire, _VARINT, field, "BundleEntryProto")
            e.dtype = _signed(value, 32)
        elif field == 2:
            _expect(wire, _LEN, field, "BundleEntryProto")
            _parse_shape(value, e, dims)
        elif field in (3, 4, 5):
            _expect(wire, _VARINT, field, "BundleEntryProto")
            v = _signed(value, 32 if field == 3 else 64)
            if field == 3:
                e.shard_id = v
            elif field == 4:
                e.offset = v
            else:
                e.size = v
        elif field == 6:
            _expect(wire, _FIXED32, field, "BundleEntryProto")
            e.crc32c = value
        elif field == 7:
            _expect(wire, _LEN, field, "BundleEntryProto")
            e.num_slices += 1
    e.shape = tuple(dims)
    return e


# ---------------------------------------------------------------- encoding (proto3: zeros omitted)
def _key(field: int, wire: int) -> bytes:
    return put_varint(field << 3 | wire)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + put_varint(len(payload)) + payload


def _varint_field(field: int, v: int) -> bytes:
    return _key(field, _VARINT) + put_varint(v) if v else b""


def encode_header(num_shards: int = 1, producer: int = 1) -> bytes:
    """Header as BundleWriter::Finish writes it: num_shards, LITTLE (omitted), version{producer}."""
    return _varint_field(1, num_shards) + _len_field(3, _varint_field(1, producer))


def encode_entry(dtype: int, shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    """BundleEntryProto for shard 0, fields in number order like protobuf's serializer."""
    dims = b"".join(_len_field(2, _varint_field(1, d)) for d in shape)
    return (_varint_field(1, dtype) + _len_field(2, dims) + _varint_field(4, offset)
            + _varint_field(5, size) + _key(6, _FIXED32) + struct.pack("<I", crc))
