"""LevelDB-format table (the `.index` file of a TF tensor bundle): varints, masked crc32c,
block parse/build, footer.

Pure Python; every failure raises `MalformedInput` (no file name: `tf_checkpoint` adds it), and every
size read from the file is checked against the real buffer length before it is used, so a
hostile file can neither make us loop forever nor allocate more than the file's own size.

Layout (tsl/lib/io/format.h, block_builder.cc, table_builder.cc):
    file   = data_block* metaindex_block index_block footer
    block  = content[size] type:u8 masked_crc32c(content + type):u32le        (5-byte trailer)
    content= entry* restart:u32le[num_restarts] num_restarts:u32le
    entry  = shared:varint32 non_shared:varint32 value_len:varint32 key_delta value
    footer = 48 bytes: varint64 x4 (metaindex off,size, index off,size), zero pad to 40,
             magic 0xdb4775248b80fb57 as u64le
"""
from __future__ import annotations

import struct
from typing import Iterable

import google_crc32c

from converters.errors import MalformedInput

FOOTER_LEN = 48
TABLE_MAGIC = 0xDB4775248B80FB57
BLOCK_TRAILER_LEN = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


# ---------------------------------------------------------------- crc32c (Castagnoli)
def crc32c(data: bytes, crc: int = 0) -> int:
    """Unmasked crc32c; `data` must be `bytes` (google_crc32c rejects memoryviews)."""
    return google_crc32c.extend(crc, data) if crc else google_crc32c.value(data)


def mask_crc(crc: int) -> int:
    """LevelDB's Mask(): rotate right 15 and add a constant, so crcs of crcs stay strong."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


# ---------------------------------------------------------------- varints
def read_varint(buf: bytes, pos: int, end: int, max_bytes: int = 10) -> tuple[int, int]:
    """Decode a little-endian base-128 varint in buf[pos:end]; returns (value, new_pos).

    `max_bytes` 5 => varint32, 10 => varint64; the value must also fit the width.
    """
    result = shift = 0
    for i in range(max_bytes):
        if pos >= end:
            raise MalformedInput("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >> (32 if max_bytes == 5 else 64):
                raise MalformedInput("varint overflows its width")
            return result, pos
        shift += 7
    raise MalformedInput(f"varint longer than {max_bytes} bytes")


def put_varint(value: int) -> bytes:
    """Encode a non-negative int (< 2**64) as a varint."""
    if value < 0 or value >> 64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---------------------------------------------------------------- reading
def _read_block(data: bytes, offset: int, size: int, limit: int, what: str) -> bytes:
    """Return the content of the block at (offset, size), checking bounds, crc and type."""
    if offset > limit or size > limit - offset or BLOCK_TRAILER_LEN > limit - offset - size:
        raise MalformedInput(f"{what} (offset {offset}, size {size}) extends beyond the end of the table "
                      f"({limit} bytes before the footer); file truncated?")
    end = offset + size
    content = data[offset:end]
    btype = data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if stored != mask_crc(crc32c(data[end:end + 1], crc32c(content))):
        raise MalformedInput(f"block crc mismatch in {what} (offset {offset}, size {size})")
    if btype == SNAPPY_COMPRESSION:
        raise MalformedInput(f"{what} is snappy-compressed; TF never writes that for checkpoints "
                      "and this reader does not decompress it")
    if btype != NO_COMPRESSION:
        raise MalformedInput(f"{what} has unknown compression type {btype}")
    return content


def _block_entries(block: bytes, what: str, max_entries: int = 1 << 62) -> list[tuple[bytes, bytes]]:
    """Decode all (key, value) pairs of a block, validating the restart array; more than
    `max_entries` is refused as soon as it is seen (each entry costs Python objects)."""
    n = len(block)
    if n < 4:
        raise MalformedInput(f"{what} is {n} bytes, too short for its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, n - 4)
    if num_restarts > (n - 4) // 4:
        raise MalformedInput(f"{what} claims {num_restarts} restart points; it has room for {(n - 4) // 4}")
    limit = n - 4 - 4 * num_restarts
    restarts = struct.unpack_from(f"<{num_restarts}I", block, limit)
    out: list[tuple[bytes, bytes]] = []
    shared_at: dict[int, int] = {}
    key = b""
    pos = 0
    # Prefix compression lets a few bytes stand for a long key; cap the total key bytes we
    # materialize (real tables expand < 10x) so a crafted block cannot cost gigabytes.
    key_budget = 64 * n + 4096
    while pos < limit:  # every iteration consumes >= 3 bytes
        start = pos
        shared, pos = read_varint(block, pos, limit, 5)
        non_shared, pos = read_varint(block, pos, limit, 5)
        value_len, pos = read_varint(block, pos, limit, 5)
        if shared > len(key):
            raise MalformedInput(f"{what}: entry at {start} shares {shared} bytes of a {len(key)}-byte key")
        if non_shared > limit - pos or value_len > limit - pos - non_shared:
            raise MalformedInput(f"{what}: entry at {start} runs past the end of the block")
        new_key = key[:shared] + block[pos:pos + non_shared]
        if out and new_key <= key:
            raise MalformedInput(f"{what}: keys out of order or duplicated at entry {start}")
        key_budget -= len(new_key)
        if key_budget < 0:
            raise MalformedInput(f"{what}: prefix-compressed keys expand implausibly")
        key = new_key
        pos += non_shared
        if len(out) >= max_entries:
            raise MalformedInput(f"{what}: more entries than the table may hold (the record limit is reached)")
        out.append((key, block[pos:pos + value_len]))
        pos += value_len
        shared_at[start] = shared
    if out and (not restarts or restarts[0] != 0):
        raise MalformedInput(f"{what}: first restart point is not 0")
    for r in restarts:
        if out and shared_at.get(r) != 0:
            raise MalformedInput(f"{what}: restart point {r} is not the start of an unshared entry")
        if not out and r != 0:
            raise MalformedInput(f"{what}: empty block with restart point {r}")
    return out


def read_table(data: bytes, max_entries: int = 1 << 62) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB table held in `data`, in (checked) sorted order.

    At most `max_entries` data entries (and as many data blocks): the work is charged per record
    and stops at the cap, whatever the bytes allow."""
    if len(data) < FOOTER_LEN:
        raise MalformedInput(f"truncated: {len(data)} bytes, shorter than the {FOOTER_LEN}-byte footer")
    limit = len(data) - FOOTER_LEN
    footer = data[limit:]
    if struct.unpack_from("<Q", footer, 40)[0] != TABLE_MAGIC:
        raise MalformedInput("not a TensorFlow checkpoint index (bad footer magic)")
    try:
        meta_off, p = read_varint(footer, 0, 40)
        meta_size, p = read_varint(footer, p, 40)
        index_off, p = read_varint(footer, p, 40)
        index_size, p = read_varint(footer, p, 40)
    except MalformedInput as e:
        raise MalformedInput(f"bad footer: {e}") from e
    _block_entries(_read_block(data, meta_off, meta_size, limit, "metaindex block"), "metaindex block")
    index = _block_entries(_read_block(data, index_off, index_size, limit, "index block"), "index block", max_entries)
    out: list[tuple[bytes, bytes]] = []
    prev_end = 0
    for separator, handle in index:
        try:
            off, p = read_varint(handle, 0, len(handle))
            size, p = read_varint(handle, p, len(handle))
        except MalformedInput as e:
            raise MalformedInput(f"bad block handle in index block: {e}") from e
        if p != len(handle):
            raise MalformedInput("bad block handle in index block: trailing bytes")
        if off < prev_end:  # blocks must not overlap: bounds total work by the file size
            raise MalformedInput(f"data block at offset {off} overlaps the previous block")
        what = f"data block at offset {off}"
        for key, value in _block_entries(_read_block(data, off, size, limit, what), what, max_entries - len(out)):
            if out and key <= out[-1][0]:
                raise MalformedInput(f"keys out of order or duplicated at {key[:80]!r}")
            if key > separator:
                raise MalformedInput(f"key {key[:80]!r} sorts after its index separator")
            out.append((key, value))
        prev_end = off + size + BLOCK_TRAILER_LEN
    return out


# ---------------------------------------------------------------- writing
def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """Shortest key k with start <= k < limit (LevelDB BytewiseComparator::FindShortestSeparator)."""
    n = min(len(start), len(limit))
    i = 0
    while i < n and start[i] == limit[i]:
        i += 1
    if i < n:
        b = start[i]
        if b < 0xFF and b + 1 < limit[i]:
            return start[:i] + bytes([b + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """Short key >= `key` (FindShortSuccessor): bump the first non-0xff byte, drop the rest."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def _build_block(entries: Iterable[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    """Block content with prefix-compressed keys and a restart point every `restart_interval`."""
    buf = bytearray()
    restarts = [0]
    prev = b""
    for count, (key, value) in enumerate(entries):
        shared = 0
        if count % restart_interval == 0:
            if count:
                restarts.append(len(buf))
        else:
            n = min(len(prev), len(key))
            while shared < n and prev[shared] == key[shared]:
                shared += 1
        buf += put_varint(shared) + put_varint(len(key) - shared) + put_varint(len(value))
        buf += key[shared:] + value
        prev = key
    buf += struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))
    return bytes(buf)


def _with_trailer(content: bytes) -> bytes:
    """Append type byte 0 (no compression) and the masked crc32c of content + type."""
    return content + b"\x00" + struct.pack("<I", mask_crc(crc32c(b"\x00", crc32c(content))))


def build_table(items: list[tuple[bytes, bytes]], block_size: int = 262144,
                restart_interval: int = 16) -> bytes:
    """Serialize strictly-sorted (key, value) pairs as TF's TableBuilder would (no compression)."""
    out = bytearray()
    index: list[tuple[bytes, bytes]] = []
    block: list[tuple[bytes, bytes]] = []
    est = 0

    def flush(next_key: bytes | None) -> None:
        nonlocal block, est
        last = block[-1][0]
        sep = _short_successor(last) if next_key is None else _shortest_separator(last, next_key)
        content = _build_block(block, restart_interval)
        index.append((sep, put_varint(len(out)) + put_varint(len(content))))
        out.extend(_with_trailer(content))
        block, est = [], 0

    for i, (key, value) in enumerate(items):
        if i and key <= items[i - 1][0]:
            raise ValueError(f"keys not strictly sorted at {key!r}")
        if block and est >= block_size:
            flush(key)
        block.append((key, value))
        est += len(key) + len(value) + 12
    if block:
        flush(None)
    meta = _build_block([], 1)
    meta_handle = put_varint(len(out)) + put_varint(len(meta))
    out += _with_trailer(meta)
    index_content = _build_block(index, 1)
    index_handle = put_varint(len(out)) + put_varint(len(index_content))
    out += _with_trailer(index_content)
    footer = meta_handle + index_handle
    out += footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)
    return bytes(out)
