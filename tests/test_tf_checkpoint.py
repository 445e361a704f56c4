"""converters.tf_checkpoint against checkpoints and values written/recorded by real TensorFlow.

Fixtures: tests/fixtures/tf/ (tools/fixtures/make_tf_fixtures.py, TF 2.21). Expected values come
from TF's own `tf.train.load_checkpoint` (expected_digests.json, dtypes_expected.npz), never from
our reader. Live tests run TF itself on what our writer produced.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters import ConversionError
from converters import tf_checkpoint as tfc
from converters._leveldb_table import (TABLE_MAGIC, _block_entries, _build_block, _with_trailer, build_table, crc32c,
                                  mask_crc, put_varint, read_table, read_varint)
from converters.tf_checkpoint import TFCheckpointReader, list_variables, load_tf_checkpoint, write_tf_checkpoint

FIX = Path(__file__).parent / "fixtures" / "tf"
EXPECTED = json.loads((FIX / "expected_digests.json").read_text())
TF1 = FIX / "tf1" / "bert_model.ckpt"
REPO = Path(__file__).resolve().parents[1]


def digest(value) -> list:
    """Mirror of make_tf_fixtures.digest: [dtype, shape, sha256]; bf16 as bits, strings length-prefixed."""
    if isinstance(value, bytes):
        value = np.array(value, dtype=object)
    arr = np.asarray(value)
    if arr.dtype == object:
        h = hashlib.sha256()
        for s in arr.reshape(-1):
            h.update(struct.pack("<Q", len(s)) + s)
        return ["string", list(arr.shape), h.hexdigest()]
    return [arr.dtype.name, list(arr.shape), hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()]


# ------------------------------------------------------------------ reading TF-written files
@pytest.mark.parametrize("ckpt", sorted(EXPECTED))
def test_reads_tf_fixture_exactly(ckpt):
    reader = TFCheckpointReader(FIX / ckpt)
    want = EXPECTED[ckpt]
    assert reader.keys() == sorted(want)  # bytewise order, TF's slice/header keys hidden
    for name, (dtype, shape, sha) in want.items():
        value = reader.get(name, widen_bfloat16=False)
        got = digest(value)
        if dtype == "bfloat16":
            got[0] = "bfloat16" if got[0] == "uint16" else got[0]
        assert got == [dtype, shape, sha], name
        assert reader.shape_dtype(name) == (tuple(shape), dtype)
    assert list_variables(FIX / ckpt) == [(n, want[n][1]) for n in sorted(want)]


def test_tf1_names_slots_and_global_step():
    ckpt = load_tf_checkpoint(TF1)
    assert len(ckpt) == 139  # 46 weights x (value, adam_m, adam_v) + global_step
    assert ckpt["global_step"].dtype == np.int64 and int(ckpt["global_step"]) == 1234
    assert ckpt["cls/seq_relationship/output_weights"].shape == (2, 24)
    assert ckpt["bert/encoder/layer_1/intermediate/dense/kernel"].shape == (24, 40)
    assert ckpt["bert/embeddings/word_embeddings/adam_v"].shape == (50, 24)
    arr = ckpt["bert/embeddings/word_embeddings"]
    # a private copy, never a memmap view: a shard changed or truncated later cannot touch it (no SIGBUS)
    assert arr.flags.writeable and not isinstance(arr.base, np.memmap) and not isinstance(arr, np.memmap)


def test_tf2_layouts_hold_the_same_weights_as_tf1():
    tf1, tf2 = load_tf_checkpoint(TF1), load_tf_checkpoint(FIX / "tf2" / "ckpt-1")
    enc = load_tf_checkpoint(FIX / "tf2_encoder" / "ckpt-1")
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    weights = {k: v for k, v in tf1.items() if not k.endswith(("adam_m", "adam_v")) and k != "global_step"}
    for name, value in weights.items():
        np.testing.assert_array_equal(tf2[name + suffix], value)
    assert isinstance(tf2["_CHECKPOINTABLE_OBJECT_GRAPH"], bytes) and int(tf2["save_counter" + suffix]) == 1
    q = enc["encoder/layer_with_weights-5/_attention_layer/_query_dense/kernel" + suffix]
    assert q.shape == (24, 4, 6)
    np.testing.assert_array_equal(q.reshape(24, 24), tf1["bert/encoder/layer_1/attention/self/query/kernel"])
    o = enc["encoder/layer_with_weights-4/_attention_output_dense/kernel" + suffix]
    assert o.shape == (4, 6, 24)
    np.testing.assert_array_equal(o.reshape(24, 24), tf1["bert/encoder/layer_0/attention/output/dense/kernel"])
    np.testing.assert_array_equal(enc["encoder/layer_with_weights-6/kernel" + suffix], tf1["bert/pooler/dense/kernel"])


def test_dtypes_match_tf_values_bitwise():
    want = np.load(FIX / "dtypes_expected.npz")
    reader = TFCheckpointReader(FIX / "dtypes" / "ckpt")
    assert sorted(reader.keys()) == sorted(want.files)
    for name in want.files:
        got, exp = reader.get(name), want[name]
        if exp.dtype.kind == "S":
            exp_items = [bytes(x) for x in exp.reshape(-1)]
            if exp.shape == ():
                assert isinstance(got, bytes) and got == exp_items[0]
            else:
                assert got.dtype == object and got.shape == exp.shape and list(got.reshape(-1)) == exp_items
            continue
        if name == "bfloat16":  # widened by default; raw bits on request
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), exp.astype(np.uint32) << 16)
            assert reader.get(name, widen_bfloat16=False).tobytes() == exp.tobytes()
            continue
        assert got.dtype == exp.dtype and got.shape == exp.shape, name
        assert got.tobytes() == exp.tobytes(), name  # bitwise: NaN, -0.0, denormals
    assert reader.shape_dtype("string_vector") == ((4,), "string")
    assert reader.get("string_vector")[3] == b"x" * 200  # 2-byte varint length


def test_multi_shard_checkpoint():
    prefix = FIX / "sharded" / "ckpt-1"
    reader = TFCheckpointReader(prefix)
    assert reader.num_shards == 2
    shards = {reader._infos[n].shard for n in reader.keys()}
    assert shards == {0, 1}
    assert load_tf_checkpoint(prefix)["model/v1/.ATTRIBUTES/VARIABLE_VALUE"].shape == (10,)


def test_sliced_tensor_refused_with_clear_error():
    reader = TFCheckpointReader(FIX / "sliced" / "ckpt")
    assert reader.keys() == ["part", "plain"]  # TF's OrderedCode slice key is hidden, as in TF
    assert reader.shape_dtype("part") == ((4, 6), "float32")
    np.testing.assert_array_equal(reader.get("plain"), [1.0, 2.0])
    with pytest.raises(ConversionError, match=r"ckpt\.index: tensor 'part' is a partitioned \(sliced\)"):
        reader.get("part")
    with pytest.raises(ConversionError, match="partitioned"):
        load_tf_checkpoint(FIX / "sliced" / "ckpt")


def test_unknown_name():
    with pytest.raises(ConversionError, match=r"bert_model\.ckpt\.index: no tensor named 'nope'"):
        TFCheckpointReader(TF1).get("nope")


# ------------------------------------------------------------------ writer round trips
ROUND_TRIP = {
    "float32": np.array([[1.5, -0.0, np.inf], [np.nan, 3.4e38, 1e-45]], np.float32),
    "float16": np.array([1.0, -65504.0, 6e-8, np.inf], np.float16),
    "float64": np.array([np.pi, -1e300, 5e-324]),
    "int8": np.array([-128, 0, 127], np.int8),
    "uint8": np.array([[0, 255], [7, 128]], np.uint8),
    "int16": np.array([-32768, 32767], np.int16),
    "uint16": np.array([0, 65535], np.uint16),
    "int32": np.array([-2**31, 2**31 - 1], np.int32),
    "uint32": np.array([0, 2**32 - 1], np.uint32),
    "int64": np.array([-2**63, 2**63 - 1], np.int64),
    "uint64": np.array([0, 2**64 - 1], np.uint64),
    "bool": np.array([[True, False, True]]),
    "complex64": np.array([1 + 2j, -3.5j], np.complex64),
    "complex128": np.array([1e-300 + 2j]),
    "scalar": np.float32(2.5),
    "empty": np.zeros((0, 3), np.float32),
    "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
    "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],
    "string_scalar": b"hello \xff world",
    "string_vector": np.array([b"", b"a\x00b", "\u00fcber".encode(), b"x" * 200], dtype=object),
    "string_empty": np.zeros((0,), dtype=object),
}
BF16 = np.array([1.0, -3.140625, 2.0 ** 100, -2.0 ** -126, np.nan, np.inf], np.float32)  # exact in bfloat16


def expected_round_trip(name, value):
    if name == "bf16":
        return np.where(np.isnan(BF16), np.float32(np.nan), BF16)
    if isinstance(value, bytes) or value.dtype == object:
        return value
    return np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")


def check_equal(got, want):
    if isinstance(want, bytes):
        assert isinstance(got, bytes) and got == want
    elif want.dtype == object:
        assert got.dtype == object and got.shape == want.shape and list(got.reshape(-1)) == list(want.reshape(-1))
    else:
        assert got.dtype == want.dtype.newbyteorder("=") and got.shape == want.shape
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip_each_dtype(tmp_path, name):
    write_tf_checkpoint(tmp_path / "m", {name: ROUND_TRIP[name]})
    got = load_tf_checkpoint(tmp_path / "m")
    assert list(got) == [name]
    check_equal(got[name], expected_round_trip(name, ROUND_TRIP[name]))
    assert sorted(os.listdir(tmp_path)) == ["m.data-00000-of-00001", "m.index"]


def test_round_trip_bfloat16_rounds_like_tf(tmp_path):
    x = np.array([1.0, 1.00390625, 1.005859375, -3.140625, 3.4e38, np.nan], np.float32)
    write_tf_checkpoint(tmp_path / "m", {"bf16": x}, dtypes={"bf16": "bfloat16"})
    reader = TFCheckpointReader(tmp_path / "m")
    assert reader.shape_dtype("bf16") == ((6,), "bfloat16")
    bits = reader.get("bf16", widen_bfloat16=False)
    # round-to-nearest-even on the upper 16 bits: 1+2^-8 ties to 1.0, 1+1.5*2^-8 rounds up
    assert bits[:5].tolist() == [0x3F80, 0x3F80, 0x3F81, 0xC049, 0x7F80]
    assert np.isnan(reader.get("bf16")[5])


def test_bfloat16_rounding_matches_tf_cast(tmp_path):
    """TF cast [1.0, -3.140625, 1e30, -1e-30, nan] to bfloat16 in the dtypes fixture; we must agree."""
    tf_bits = np.load(FIX / "dtypes_expected.npz")["bfloat16"]
    x = np.array([1.0, -3.140625, 1e30, -1e-30, np.nan], np.float32)
    write_tf_checkpoint(tmp_path / "m", {"x": x}, dtypes={"x": "bfloat16"})
    assert TFCheckpointReader(tmp_path / "m").get("x", widen_bfloat16=False).tolist() == tf_bits.tolist()


def test_round_trip_all_together_and_key_order(tmp_path):
    tensors = {**ROUND_TRIP, "a": np.ones(1, np.float32), "a/b": np.ones(2, np.float32), "a.b": np.ones(3, np.float32),
               "B": np.ones(4, np.float32), "\u00e9": np.ones(5, np.float32)}
    write_tf_checkpoint(tmp_path / "m", tensors)
    reader = TFCheckpointReader(tmp_path / "m")
    assert reader.keys() == sorted(tensors, key=lambda k: k.encode())
    for name, value in tensors.items():
        check_equal(reader.get(name), expected_round_trip(name, value))


def test_round_trip_many_keys_uses_several_index_blocks(tmp_path):
    tensors = {f"layer_{i:05d}/some/longish/variable/name/kernel": np.full(3, i, np.int32) for i in range(6000)}
    write_tf_checkpoint(tmp_path / "m", tensors)
    data = (tmp_path / "m.index").read_bytes()
    index_handle_size = len(data)
    assert index_handle_size > 262144  # more than one 256 KiB data block
    got = load_tf_checkpoint(tmp_path / "m")
    assert list(got) == sorted(tensors) and int(got["layer_05999/some/longish/variable/name/kernel"][0]) == 5999


def test_writer_header_and_entry_bytes_match_tf(tmp_path):
    """Byte layout TF 2.21 writes for a 32-float bias at offset 0 (reference section 3.2)."""
    write_tf_checkpoint(tmp_path / "m", {"b": np.zeros(32, np.float32)})
    items = read_table((tmp_path / "m.index").read_bytes())
    assert items[0] == (b"", bytes.fromhex("08011a020801"))
    assert items[1][1][:12] == bytes.fromhex("080112041202082028800135")
    tf_index = read_table((FIX / "dtypes" / "ckpt.index").read_bytes())
    assert tf_index[0][1] == items[0][1]  # same header as TF's BundleWriter


def test_writer_overwrites_and_leaves_no_temp_files(tmp_path):
    write_tf_checkpoint(tmp_path / "m", {"x": np.ones(3, np.float32)})
    write_tf_checkpoint(tmp_path / "m", {"y": np.zeros(2, np.int64)})
    assert list(load_tf_checkpoint(tmp_path / "m")) == ["y"]
    assert sorted(os.listdir(tmp_path)) == ["m.data-00000-of-00001", "m.index"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(items):
        raise OSError(28, "No space left on device", str(tmp_path / "m.index"))
    monkeypatch.setattr(tfc, "build_table", boom)
    with pytest.raises(ConversionError, match=r"m\.(index|data-00000-of-00001): cannot write.*\(No space left"):
        write_tf_checkpoint(tmp_path / "m", {"x": np.ones(3, np.float32)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("tensors, dtypes, match", [
    ({"x": np.array(["a"], dtype="U1")}, None, "unsupported dtype <U1"),
    ({"x": np.array([1, "a"], dtype=object)}, None, "string tensors must hold bytes"),
    ({"x": [1.0, 2.0]}, None, "expected numpy array or bytes, got list"),
    ({"": np.ones(1)}, None, "non-empty strings"),
    ({"x": np.ones(1)}, {"x": "float8"}, "unsupported dtype override"),
    ({"x": np.ones(1, np.int32)}, {"x": "bfloat16"}, "cannot store int32 as bfloat16"),
    ({"x": np.ones(1)}, {"y": "float32"}, "overrides for unknown tensors"),
])
def test_writer_rejects_bad_input(tmp_path, tensors, dtypes, match):
    with pytest.raises(ConversionError, match=match) as err:
        write_tf_checkpoint(tmp_path / "m", tensors, dtypes=dtypes)
    assert str(tmp_path / "m") in str(err.value)
    assert os.listdir(tmp_path) == []


def test_writer_missing_directory(tmp_path):
    with pytest.raises(ConversionError, match="output directory .* does not exist"):
        write_tf_checkpoint(tmp_path / "nodir" / "m", {"x": np.ones(1)})


# ------------------------------------------------------------------ corrupt inputs
def copy_ckpt(src: Path, dst_dir: Path, name: str = "m") -> Path:
    """Copy a checkpoint under a new prefix; returns the new prefix."""
    dst_dir.mkdir(exist_ok=True)
    base = src.name
    for f in src.parent.iterdir():
        if f.name.startswith(base + "."):
            shutil.copy(f, dst_dir / (name + f.name[len(base):]))
    return dst_dir / name


def rewrite_index(prefix: Path, mutate) -> None:
    """Re-encode the index with valid block crcs after `mutate(items)` so deep checks are reached."""
    path = Path(str(prefix) + ".index")
    items = read_table(path.read_bytes())
    path.write_bytes(build_table(mutate(items)))


def set_entry(items, name: str, **fields):
    """Append overriding proto fields to one entry (protobuf: the last value of a field wins)."""
    out = []
    for key, value in items:
        if key == name.encode():
            for field, raw in fields.items():
                value += raw
        out.append((key, value))
    return out


def varint_field(field: int, v: int) -> bytes:
    return put_varint(field << 3) + put_varint(v % (1 << 64))


def len_field(field: int, payload: bytes) -> bytes:
    return put_varint(field << 3 | 2) + put_varint(len(payload)) + payload


def shape_field(*dims: int) -> bytes:
    """TensorShapeProto as BundleEntryProto field 2 (merged into the existing shape by protobuf)."""
    return len_field(2, b"".join(len_field(2, varint_field(1, d)) for d in dims))


def expect_error(prefix: Path, match: str, filename: str | None = None, name: str | None = None):
    with pytest.raises(ConversionError, match=match) as err:
        load_tf_checkpoint(prefix)
    msg = str(err.value)
    assert "\n" not in msg
    assert (filename or (str(prefix) + ".index")) in msg
    if name:
        assert repr(name) in msg
    return msg


def test_missing_index(tmp_path):
    expect_error(tmp_path / "nothing", "TF checkpoint index not found")


def test_missing_shard_names_the_shard(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    os.remove(str(p) + ".data-00000-of-00001")
    expect_error(p, "data shard .* is missing", filename=str(p) + ".data-00000-of-00001")


def test_missing_one_of_several_shards(tmp_path):
    p = copy_ckpt(FIX / "sharded" / "ckpt-1", tmp_path)
    os.remove(str(p) + ".data-00001-of-00002")
    expect_error(p, "is missing", filename=str(p) + ".data-00001-of-00002")


@pytest.mark.parametrize("keep, match", [(0, "truncated"), (30, "truncated"),
                                         (100, "not a TensorFlow checkpoint index"),
                                         (-1, "not a TensorFlow checkpoint index")])
def test_truncated_index(tmp_path, keep, match):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    data = idx.read_bytes()
    idx.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    expect_error(p, match)


def test_not_an_index(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    Path(str(p) + ".index").write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    expect_error(p, "not a TensorFlow checkpoint index")


def test_truncated_data_names_the_shard(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    shard = str(p) + ".data-00000-of-00001"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    expect_error(p, "extends beyond the end of the .*-byte shard", filename=shard)


def test_block_crc_mismatch(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    data = bytearray(idx.read_bytes())
    data[20] ^= 0x01
    idx.write_bytes(bytes(data))
    expect_error(p, "block crc mismatch in data block at offset 0")


def test_tensor_crc_mismatch_names_tensor(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    name = "bert/encoder/layer_1/output/dense/kernel"
    info = TFCheckpointReader(p)._infos[name]
    shard = str(p) + ".data-00000-of-00001"
    with open(shard, "r+b") as f:
        f.seek(info.offset + info.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    reader = TFCheckpointReader(p)  # index is fine; the damage shows when reading
    reader.get("bert/encoder/layer_0/output/dense/kernel")
    with pytest.raises(ConversionError, match=f"crc32c mismatch for tensor '{name}'") as err:
        reader.get(name)
    assert shard in str(err.value)


def test_string_tensor_corruption(tmp_path):
    p = copy_ckpt(FIX / "dtypes" / "ckpt", tmp_path)
    info = TFCheckpointReader(p)._infos["string_vector"]
    shard = str(p) + ".data-00000-of-00001"
    data = bytearray(Path(shard).read_bytes())
    data[info.offset] ^= 0x01  # first varint length
    Path(shard).write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="string tensor 'string_vector': length checksum mismatch"):
        load_tf_checkpoint(p)
    data[info.offset] ^= 0x01
    data[info.offset + info.size - 1] ^= 0x01  # last string byte
    Path(shard).write_bytes(bytes(data))
    expect_error(p, "crc32c mismatch for tensor 'string_vector'", filename=shard)


W = "bert/pooler/dense/kernel"


@pytest.mark.parametrize("fields, match", [
    ({"offset": varint_field(4, 1 << 40)}, "extends beyond the end of the"),
    ({"size": varint_field(5, 1 << 62)}, "disagrees with shape"),
    ({"dtype": varint_field(1, 20)}, "unknown or unsupported dtype code 20"),
    ({"dtype": varint_field(1, 999)}, "unknown or unsupported dtype code 999"),
    ({"shape": shape_field(2, 3)}, r"disagrees with shape \[24, 24, 2, 3\]"),  # merged, like protobuf
    ({"shape": shape_field(1 << 40, 1 << 40, 1 << 62)}, "impossibly large shape"),
    ({"shape": shape_field(*[(1 << 63) - 1] * 3000)}, "impossibly large shape"),
    ({"shape": shape_field(-1)}, "unknown or negative shape"),
    ({"shape": shape_field(0, 2**31 - 1, 2**31 - 1)}, "impossibly large shape"),  # empty, but numpy refuses
    ({"shape": shape_field(*[1] * 65)}, "impossibly large shape"),
    ({"shape": len_field(2, varint_field(3, 1))}, "unknown or negative shape"),
    ({"shard": varint_field(3, 7)}, "is in shard 7, but the header says 1 shards"),
    ({"offset": varint_field(4, -5)}, "negative offset"),
    ({"bad": b"\x08" + b"\xff" * 11}, "varint longer than 10 bytes"),
    ({"bad": b"\x12\x7f"}, "runs past the end of the message"),
    ({"bad": b"\x0b"}, "unsupported wire type 3"),
    ({"bad": b"\x0d\x01\x00\x00\x00"}, "field 1 has wire type 5"),
])
def test_bad_entry_fields(tmp_path, fields, match):
    p = copy_ckpt(TF1, tmp_path)
    rewrite_index(p, lambda items: set_entry(items, W, **fields))
    in_shard = match.startswith("extends beyond")  # found when comparing with the shard's size
    expect_error(p, match, filename=str(p) + (".data-00000-of-00001" if in_shard else ".index"),
                 name=None if "bad" in fields else W)


def test_huge_string_count(tmp_path):
    p = copy_ckpt(FIX / "dtypes" / "ckpt", tmp_path)
    rewrite_index(p, lambda items: set_entry(items, "string_vector", shape=shape_field(1 << 16)))
    expect_error(p, "too small for 262144 strings", name="string_vector")


@pytest.mark.parametrize("header, match", [
    (bytes.fromhex("0801 1001 1a020801"), "big-endian"),
    (bytes.fromhex("0801 1a040801 1005"), "unsupported tensor bundle version"),
    (bytes.fromhex("0801 1a040801 1801"), "unsupported tensor bundle version"),
    (bytes.fromhex("0800 1a020801"), "header claims 0 data shards"),
    (bytes.fromhex("08ffffffffffffffffff01"), "header claims -1 data shards"),
])
def test_bad_header(tmp_path, header, match):
    p = copy_ckpt(TF1, tmp_path)
    rewrite_index(p, lambda items: [(b"", header)] + items[1:])
    expect_error(p, match)


def test_missing_header(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    rewrite_index(p, lambda items: items[1:])
    expect_error(p, "no header entry")


def test_snappy_block_refused(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    data = bytearray(idx.read_bytes())
    footer = bytes(data[-48:])
    _, q = read_varint(footer, 0, 40)
    _, q = read_varint(footer, q, 40)
    ioff, q = read_varint(footer, q, 40)
    isize, q = read_varint(footer, q, 40)
    ((_, handle),) = _block_entries(bytes(data[ioff:ioff + isize]), "index")
    off, q = read_varint(handle, 0, len(handle))
    size, _ = read_varint(handle, q, len(handle))
    # type byte -> snappy, with a recomputed trailer crc so that only the type is "wrong"
    data[off + size] = 1
    crc = mask_crc(crc32c(b"\x01", crc32c(bytes(data[off:off + size]))))
    data[off + size + 1:off + size + 5] = struct.pack("<I", crc)
    idx.write_bytes(bytes(data))
    expect_error(p, "snappy-compressed")


def test_bad_footer_varints(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    data = bytearray(idx.read_bytes())
    data[-48:-8] = b"\xff" * 40
    idx.write_bytes(bytes(data))
    expect_error(p, "bad footer: varint longer than 10 bytes")


def test_footer_handle_beyond_file(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    data = bytearray(idx.read_bytes())
    meta_off, q = read_varint(bytes(data[-48:]), 0, 40)
    meta_size, q = read_varint(bytes(data[-48:]), q, 40)
    handles = put_varint(meta_off) + put_varint(meta_size) + put_varint(1 << 50) + put_varint(10)
    data[-48:-8] = handles + b"\x00" * (40 - len(handles))
    idx.write_bytes(bytes(data))
    expect_error(p, "index block .* extends beyond the end of the table")


def test_unsorted_keys(tmp_path):
    p = copy_ckpt(TF1, tmp_path)
    idx = Path(str(p) + ".index")
    items = read_table(idx.read_bytes())
    items[3], items[4] = items[4], items[3]
    # build_table refuses unsorted input, so assemble data block, metaindex, index and footer by hand
    content = _build_block(items, 16)
    blob = _with_trailer(content)
    meta = _with_trailer(_build_block([], 1))
    index = _with_trailer(_build_block([(b"\xff", put_varint(0) + put_varint(len(content)))], 1))
    footer = (put_varint(len(blob)) + put_varint(len(meta) - 5)
              + put_varint(len(blob) + len(meta)) + put_varint(len(index) - 5))
    idx.write_bytes(blob + meta + index + footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC))
    expect_error(p, "keys out of order")


def test_errors_are_value_errors():
    assert issubclass(ConversionError, ValueError)


# ------------------------------------------------------------------ live: TensorFlow reads our output
def tf_python() -> str | None:
    try:
        import tensorflow  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    exe = os.environ.get("BERT_PORT_TF_PYTHON")
    if exe and shutil.which(exe):
        ok = subprocess.run([exe, "-c", "import tensorflow"], capture_output=True, timeout=300).returncode == 0
        return exe if ok else None
    return None


@pytest.fixture(scope="module")
def tf_exe():
    exe = tf_python()
    if exe is None:
        pytest.skip("TensorFlow not importable and BERT_PORT_TF_PYTHON not set to a python that has it")
    return exe


def run_check(exe: str, prefix: Path, npz: Path, *extra: str) -> str:
    script = REPO / "tools" / "fixtures" / "check_tf_load.py"
    res = subprocess.run([exe, str(script), str(prefix), str(npz), *extra], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return res.stdout


@pytest.mark.live
def test_live_tf_reads_our_checkpoint(tmp_path, tf_exe):
    tensors = {k: v for k, v in ROUND_TRIP.items()}
    tensors.update(load_tf_checkpoint(TF1))
    tensors["bf16"] = BF16
    write_tf_checkpoint(tmp_path / "ours", tensors, dtypes={"bf16": "bfloat16"})
    expected = {k: expected_round_trip(k, v) for k, v in tensors.items()}
    expected["string_scalar"] = np.array(expected["string_scalar"], dtype=object)
    np.savez(tmp_path / "expected.npz", **expected)
    out = run_check(tf_exe, tmp_path / "ours", tmp_path / "expected.npz", "--saver")
    assert f"OK: {len(tensors)} tensors via load_checkpoint, Saver.restore" in out


@pytest.mark.live
def test_live_tf_reads_multi_block_index(tmp_path, tf_exe):
    tensors = {f"layer_{i:05d}/some/longish/variable/name/kernel": np.full(3, i, np.int32) for i in range(6000)}
    write_tf_checkpoint(tmp_path / "many", tensors)
    np.savez(tmp_path / "expected.npz", **tensors)
    assert "OK: 6000 tensors" in run_check(tf_exe, tmp_path / "many", tmp_path / "expected.npz")
