"""Issue 12, readers: small hostile files that used to cost minutes, gigabytes or a hang.

Each file is generated here, large enough that the old quadratic or amplifying path blows the
budget (measured before the fix: colliding keys 40k -> 17 s; memo'd huge-int shape 128 KB -> 69 s;
shared memo buffer 1 MB -> 1.5 GB; 100k repeated shape fields (400 KB) -> 33 s; 20M empty strings
-> 2.9 GB; /dev/zero index -> MemoryError; FIFO shard -> hang; truncated shard -> SIGBUS), and
loaded in a child process (tests/security/child.py) under a wall-time and peak-RSS budget.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import ConversionError
from converters import _tf_proto as proto
from converters._leveldb_table import build_table, crc32c, mask_crc, put_varint
from converters.mge_pickle import load_mge_pickle
from converters.tf_checkpoint import data_filename, load_tf_checkpoint, write_tf_checkpoint
from tests.security.child import MiB, expect, run_limited
from tests.security.test_hostile_pickles import binbytes, call, f4_dtype, glob, integer, p4, text, tup

MGE_SETUP = "from converters.mge_pickle import load_mge_pickle"
TF_SETUP = "from converters.tf_checkpoint import load_tf_checkpoint"
M61 = 2 ** 61 - 1  # hash(1 + i * M61) == 1 for every i: all keys land in one bucket


def long1(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def long4(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(data)) + data  # LONG4


def colliding_keys(n: int) -> bytes:
    return b"".join(long1(1 + i * M61) + b"N" for i in range(n))


N_KEYS = 60_000  # ~0.7 MB; the old reader needed ~25 s for 40k of them (17 s measured on the machine)
COLLISIONS = {
    "setitems": p4(glob("collections", "OrderedDict") + b")R(" + colliding_keys(N_KEYS) + b"u"),
    "dict": p4(b"(" + colliding_keys(N_KEYS) + b"d"),
    "setitem": p4(b"}" + b"".join(long1(1 + i * M61) + b"Ns" for i in range(N_KEYS))),
    "ordereddict-pairs": p4(call(glob("collections", "OrderedDict"),
                                 b"(" + b"".join(b"(" + long1(1 + i * M61) + b"Nt" for i in range(N_KEYS)) + b"l")),
    "frozenset": p4(b"(" + b"".join(long1(1 + i * M61) for i in range(N_KEYS)) + b"\x91"),
}


@pytest.mark.parametrize("kind", sorted(COLLISIONS))
def test_hash_colliding_keys_are_refused_before_insertion(tmp_path, kind):
    path = tmp_path / "keys.pkl"
    path.write_bytes(COLLISIONS[kind])
    r = run_limited(f"load_mge_pickle({str(path)!r})", setup=MGE_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=100)
    assert ("state-dict key of type int" in r["message"] or "sets are not allowed" in r["message"]
            or "OrderedDict" in r["message"]), r["message"]


def test_dict_size_is_bounded(tmp_path):
    from converters.mge_pickle import MAX_DICT_ITEMS

    path = tmp_path / "big.pkl"
    path.write_bytes(p4(b"}(" + b"".join(text(f"k{i}") + b"N" for i in range(MAX_DICT_ITEMS + 1)) + b"u"))
    with pytest.raises(ConversionError, match=f"more than {MAX_DICT_ITEMS} entries"):
        load_mge_pickle(path)


def huge_shape_pickle(digits_bytes: int, rank: int = 32) -> bytes:
    """An array whose shape is `rank` memo copies of one ~8*digits_bytes-bit integer."""
    huge = long4(1 << (8 * digits_bytes - 2)) + b"q\x00"  # BINPUT 0
    shape = tup(*([b"h\x00"] * rank))  # BINGET 0, rank times
    array = (call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), b"C\x01b")
             + tup(integer(1), shape, f4_dtype(), b"\x89", binbytes(b"")) + b"b")
    return p4(huge + b"0" + glob("collections", "OrderedDict") + b")R" + text("w") + array + b"s")  # POP the int


def test_memo_copies_of_a_huge_int_as_shape(tmp_path):
    path = tmp_path / "shape.pkl"
    path.write_bytes(huge_shape_pickle(120_000))  # 120 KB; the old reader: ~69 s of bignum products
    r = run_limited(f"load_mge_pickle({str(path)!r})", setup=MGE_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="dimension outside")
    assert len(r["message"]) < 500


def shared_buffer_pickle(buffer_bytes: int, arrays: int) -> bytes:
    """One buffer (memo 0) shared by `arrays` arrays through numpy's _frombuffer."""
    n = buffer_bytes // 4
    head = binbytes(b"\x00" * buffer_bytes) + b"q\x00" + b"0" + f4_dtype() + b"q\x01" + b"0"
    body = b"".join(text(f"a{i}") + call(glob("numpy.core.numeric", "_frombuffer"), b"h\x00", b"h\x01",
                                         tup(integer(n)), text("C")) for i in range(arrays))
    return p4(head + glob("collections", "OrderedDict") + b")R(" + body + b"u")


def test_one_buffer_shared_by_many_arrays(tmp_path):
    path = tmp_path / "shared.pkl"
    path.write_bytes(shared_buffer_pickle(1 * MiB, 1500))  # ~1.1 MB file; the old reader: 1.5 GB
    size = path.stat().st_size
    r = run_limited(f"load_mge_pickle({str(path)!r})", setup=MGE_SETUP, wall=10)
    expect(r, "ConversionError", peak_mb=3 * size / MiB + 32, match="more bytes than the input justifies")


def shared_array_pickle(buffer_bytes: int, references: int) -> bytes:
    """One array (memo 2) referenced by `references` keys through BINGET: one object, many names."""
    n = buffer_bytes // 4
    array = call(glob("numpy.core.numeric", "_frombuffer"), binbytes(b"\x01" * buffer_bytes), f4_dtype(),
                 tup(integer(n)), text("C")) + b"q\x02"
    body = text("a0") + array + b"".join(text(f"a{i}") + b"h\x02" for i in range(1, references))
    return p4(glob("collections", "OrderedDict") + b")R(" + body + b"u")


def test_one_array_referenced_many_times_is_one_array(tmp_path):
    """1 MiB file, 1200 references to its one array: one copy (the old reader made 1200, 1.2 GB)."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(shared_array_pickle(1 * MiB, 1200))
    size = path.stat().st_size
    body = (f"d = load_mge_pickle({str(path)!r})\n"
            "assert len(d) == 1200 and len({id(v) for v in d.values()}) == 1 and float(d['a7'][0]) != 0\n")
    r = run_limited(body, setup=MGE_SETUP, wall=10)
    assert r["error"] is None, r["message"][:500]
    assert r["peak_growth"] < 3 * size + 32 * MiB, r["peak_growth"]


def test_honest_arrays_fill_the_budget_exactly(tmp_path):
    """The budget is the file size: a real state dict (arrays + pickle overhead) stays under it."""
    import pickle

    path = tmp_path / "ok.pkl"
    arrays = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(20)}
    path.write_bytes(pickle.dumps(arrays, protocol=4))
    got = load_mge_pickle(path)
    assert all(np.array_equal(got[k], v) for k, v in arrays.items())


ESCAPES = "\x1b[2J\x1b[H\x1b]0;owned\x07\rOK: conversion finished\u202e"


@pytest.mark.parametrize("where", ["key", "global"])
def test_escape_sequences_never_reach_messages(tmp_path, where):
    path = tmp_path / "esc.pkl"
    if where == "key":
        path.write_bytes(p4(glob("collections", "OrderedDict") + b")R" + text(ESCAPES) + integer(1) + b"s"))
    else:
        path.write_bytes(p4(b"\x8c" + bytes([len(ESCAPES.encode())]) + ESCAPES.encode()
                            + b"\x8c\x01x\x93"))  # SHORT_BINUNICODE x2 + STACK_GLOBAL
    with pytest.raises(ConversionError) as err:
        load_mge_pickle(path)
    message = str(err.value)
    assert message.isprintable() and message.isascii(), message
    assert "\\x1b[2J" in message


# ------------------------------------------------------------------------------------------ TF
def write_index(prefix, entries, header=None) -> None:
    """`entries`: {name: BundleEntryProto bytes}; header defaults to one shard, version 1."""
    items = [(b"", header if header is not None else proto.encode_header(num_shards=1, producer=1))]
    items += sorted((k.encode(), v) for k, v in entries.items())
    with open(str(prefix) + ".index", "wb") as f:
        f.write(build_table(items))


def test_repeated_shape_fields_stay_linear(tmp_path):
    """100k entry-level `shape` fields, each adding one empty dim: the old parser copied the dim
    list for every field (quadratic, 33 s for 400 KB); the rank is now bounded while parsing."""
    prefix = tmp_path / "m"
    one_empty_dim = b"\x12\x02\x12\x00"  # shape { dim { } }
    entry = b"\x08\x01" + b"\x12\x04\x12\x02\x08\x01" + one_empty_dim * 100_000
    write_index(prefix, {"w": entry})
    open(data_filename(str(prefix), 0, 1), "wb").close()
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="rank above 64")


def test_many_empty_dims_in_one_shape(tmp_path):
    prefix = tmp_path / "m"
    entry = b"\x08\x01" + b"\x12" + put_varint(200_000) + b"\x12\x00" * 100_000
    write_index(prefix, {"w": entry})
    open(data_filename(str(prefix), 0, 1), "wb").close()
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="rank above 64")


def string_checkpoint(prefix, count: int) -> None:
    """A DT_STRING vector of `count` empty strings with correct checksums."""
    packed_crc = crc32c(b"\x00" * (4 * count))  # lengths as u32s, as TF checksums them
    length_crc = struct.pack("<I", mask_crc(packed_crc))
    payload = b"\x00" * count + length_crc
    crc = mask_crc(crc32c(length_crc, packed_crc))
    with open(data_filename(str(prefix), 0, 1), "wb") as f:
        f.write(payload)
    entry = (b"\x08\x07" + b"\x12" + put_varint(len(proto._len_field(2, proto._varint_field(1, count))))
             + proto._len_field(2, proto._varint_field(1, count)) + b"\x28" + put_varint(len(payload))
             + b"\x35" + struct.pack("<I", crc))
    write_index(prefix, {"s": entry})


def test_huge_string_tensor_is_not_materialised(tmp_path):
    prefix = tmp_path / "m"
    string_checkpoint(prefix, 20_000_000)  # 20 MB; the old reader built 20M objects (2.9 GB)
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=10)
    expect(r, "ConversionError", peak_mb=64, match="20000000 elements")


def test_small_string_tensors_still_read(tmp_path):
    prefix = tmp_path / "m"
    string_checkpoint(prefix, 3)
    assert list(load_tf_checkpoint(prefix)["s"]) == [b"", b"", b""]


def small_checkpoint(tmp_path, with_empty=True):
    prefix = tmp_path / "m"
    tensors = {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}
    if with_empty:
        tensors["empty"] = np.zeros((0,), np.float32)
    write_tf_checkpoint(prefix, tensors)
    return prefix


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory"])
def test_index_must_be_a_regular_file(tmp_path, target):
    prefix = small_checkpoint(tmp_path)
    index = tmp_path / "m.index"
    index.unlink()
    if target == "fifo":
        os.mkfifo(index)
    elif target == "directory":
        index.mkdir()
    else:
        index.symlink_to(target)
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="expected a regular file")


def test_fifo_shard_does_not_hang(tmp_path):
    """Only a zero-size tensor: the old reader opened the FIFO to checksum it and blocked forever."""
    prefix = tmp_path / "m"
    write_tf_checkpoint(prefix, {"empty": np.zeros((0,), np.float32)})
    shard = tmp_path / "m.data-00000-of-00001"
    shard.unlink()
    os.mkfifo(shard)
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="a FIFO")


def test_arrays_survive_a_truncated_shard(tmp_path):
    """Arrays handed out are private copies: truncating the shard afterwards cannot SIGBUS."""
    prefix = small_checkpoint(tmp_path, with_empty=False)
    shard = tmp_path / "m.data-00000-of-00001"
    body = f"""
        arrays = load_tf_checkpoint({str(prefix)!r})
        os.truncate({str(shard)!r}, 0)
        total = float(sum(a.sum() for a in arrays.values()))
        assert total == float(sum(range(4096))), total
        raise SystemExit(0)
    """
    r = run_limited(body, setup=TF_SETUP, wall=5)
    assert r["error"] == "SystemExit", r


def test_bad_consumers_message_is_bounded(tmp_path):
    prefix = tmp_path / "m"
    bad = b"\x02" * 1_000_000 + b"\x01"  # packed bad_consumers: 1M x version 2, then version 1
    version = proto._varint_field(1, 1) + proto._len_field(3, bad)
    header = proto._varint_field(1, 1) + proto._len_field(3, version)
    write_index(prefix, {}, header=header)
    open(data_filename(str(prefix), 0, 1), "wb").close()
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=5)
    expect(r, "ConversionError", peak_mb=64, match="1000001 in all")
    assert len(r["message"]) < 1000, len(r["message"])


def test_tf_names_are_escaped_in_messages(tmp_path):
    prefix = tmp_path / "m"
    write_index(prefix, {"w" + ESCAPES: b"\x08\x63"})  # unknown dtype 99
    open(data_filename(str(prefix), 0, 1), "wb").close()
    with pytest.raises(ConversionError) as err:
        load_tf_checkpoint(prefix)
    assert str(err.value).isprintable() and str(err.value).isascii(), str(err.value)


@settings(max_examples=150, deadline=2000, database=None)
@given(st.lists(st.sampled_from([b"\x12\x00", b"\x12\x02\x12\x00", b"\x12\x04\x12\x02\x08\x05", b"\x08\x01",
                                 b"\x28\x10", b"\x3a\x00"]), max_size=400))
def test_fuzz_entry_field_sequences_parse_linearly(fields):
    """Any sequence of (repeated) entry fields parses in bounded time, or fails with MalformedInput."""
    from converters.errors import MalformedInput

    try:
        e = proto.parse_entry(b"".join(fields))
    except MalformedInput as err:
        assert "rank above" in str(err)
    else:
        assert len(e.shape) <= proto.MAX_RANK


def test_millions_of_tiny_index_entries_are_counted_not_parsed(tmp_path):
    """An index of 300k empty-tensor entries (~6 MB, under the byte cap): refused at the record cap
    after a bounded amount of work (the old reader parsed all of them: seconds and hundreds of MB)."""
    prefix = tmp_path / "many"
    entry = proto.encode_entry(1, (0,), 0, 0, mask_crc(crc32c(b"")))
    write_index(prefix, {f"v{i:07d}": entry for i in range(300_000)})
    (tmp_path / "many.data-00000-of-00001").write_bytes(b"")
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=10)
    expect(r, "ConversionError", peak_mb=96, match="more entries than the table may hold")
    assert r["seconds"] < 3, r["seconds"]


def test_millions_of_vocab_lines_are_capped(tmp_path):
    """4 MB of one-character lines (under the 64 MiB cap): refused at the line cap, bounded."""
    from converters.files import MAX_VOCAB_LINES

    path = tmp_path / "vocab.txt"
    path.write_bytes(b"a\n" * (2 * MAX_VOCAB_LINES))
    r = run_limited(f"load_vocab({str(path)!r})", setup="from bert_port.tokenization import load_vocab", wall=10)
    expect(r, "ValueError", peak_mb=256, match=f"more than {MAX_VOCAB_LINES} lines")


def test_many_index_entries_naming_one_region_are_charged_per_read(tmp_path):
    """2000 entries all naming the same 1 MiB of the shard: 2 GB of reads from a 1 MiB file, refused."""
    prefix = tmp_path / "overlap"
    data = bytes(range(256)) * 4096
    entry = proto.encode_entry(1, (len(data) // 4,), 0, len(data), mask_crc(crc32c(data)))
    write_index(prefix, {f"v{i:05d}": entry for i in range(2000)})
    (tmp_path / "overlap.data-00000-of-00001").write_bytes(data)
    r = run_limited(f"load_tf_checkpoint({str(prefix)!r})", setup=TF_SETUP, wall=10)
    expect(r, "ConversionError", peak_mb=160, match="more bytes than the input justifies")
