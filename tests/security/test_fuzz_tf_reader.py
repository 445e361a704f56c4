"""Hardening: mutated TF checkpoints may only ever raise ConversionError (naming a file).

Starting from the real TF-written fixtures, hypothesis flips/sets/deletes bytes, truncates,
appends and splices huge varints into `.index` and `.data` files, and rewrites index entries
with *valid* block crcs (so mutations reach the proto/shape/offset checks instead of stopping at
the block checksum): odd dtype codes, huge/negative shapes, offsets, sizes, shard ids, slices,
non-UTF-8 or NUL keys, and crafted DT_STRING payloads. Each example has a deadline, so a hang
or quadratic blow-up fails too.

Budget: profile "tf-fuzz-default" runs 2000 examples in total (well under a minute);
BERT_PORT_FUZZ=long selects "tf-fuzz-long" (25x the examples, longer deadline).
"""
from __future__ import annotations

import os
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from converters import ConversionError
from converters._leveldb_table import build_table, crc32c, mask_crc, put_varint, read_table
from converters.tf_checkpoint import load_tf_checkpoint

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
TARGETS = ["tf1/bert_model.ckpt", "tf2/ckpt-1", "tf2_encoder/ckpt-1", "dtypes/ckpt", "sharded/ckpt-1", "sliced/ckpt"]

settings.register_profile("tf-fuzz-default", deadline=timedelta(seconds=2), database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("tf-fuzz-long", parent=settings.get_profile("tf-fuzz-default"),
                          deadline=timedelta(seconds=10))
LONG = os.environ.get("BERT_PORT_FUZZ") == "long"
PROFILE = settings.get_profile("tf-fuzz-long" if LONG else "tf-fuzz-default")
SCALE = 25 if LONG else 1
EXAMPLES = {"index_bytes": 600, "data_bytes": 400, "entries": 600, "strings": 400}  # 2000 in total


def fuzz_settings(test: str) -> settings:
    return settings(PROFILE, max_examples=EXAMPLES[test] * SCALE)


def _files(target: str) -> dict[str, bytes]:
    """suffix ('.index', '.data-00000-of-00001', ...) -> bytes of the pristine fixture."""
    prefix = FIX / target
    return {f.name[len(prefix.name):]: f.read_bytes() for f in prefix.parent.iterdir()
            if f.name.startswith(prefix.name + ".")}


ORIGINAL = {t: _files(t) for t in TARGETS}
INTERESTING = [b"\xff" * 10 + b"\x01", b"\xff" * 9 + b"\x7f", b"\x80" * 20, put_varint(2**63), put_varint(2**64 - 1),
               put_varint(2**31), b"\x00" * 8, b"\xff" * 8, struct.pack("<Q", 0xDB4775248B80FB57)]
SPLICE = st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=16))


def check(files: dict[str, bytes]) -> None:
    """Write the files under a fresh prefix; loading must succeed or raise ConversionError naming it."""
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "m")
        for suffix, data in files.items():
            with open(prefix + suffix, "wb") as f:
                f.write(data)
        try:
            tensors = load_tf_checkpoint(prefix)
        except ConversionError as e:
            msg = str(e)
            assert prefix in msg and "\n" not in msg, msg
            return
        for value in tensors.values():  # touch everything that loaded
            if not isinstance(value, bytes):
                value.tobytes()


# ------------------------------------------------------------------ raw byte mutations
position = st.one_of(st.integers(0, 2**20), st.integers(-60, -1))  # anywhere, or near the footer
op = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("set"), position, st.integers(0, 255)),
    st.tuples(st.just("truncate"), position, st.just(0)),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("splice"), position, SPLICE),
    st.tuples(st.just("overwrite"), position, SPLICE),
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        n = len(buf)
        i = (pos % (n + 1)) if pos >= 0 else max(0, n + pos)
        if kind in ("flip", "set") and i < n:
            buf[i] = buf[i] ^ arg if kind == "flip" else arg
        elif kind == "truncate":
            del buf[i:]
        elif kind == "delete":
            del buf[i:i + arg]
        elif kind == "append":
            buf += arg
        elif kind == "splice":
            buf[i:i] = arg
        elif kind == "overwrite":
            buf[i:i + len(arg)] = arg
    return bytes(buf)


@fuzz_settings("index_bytes")
@given(target=st.sampled_from(TARGETS), ops=st.lists(op, min_size=1, max_size=4))
def test_fuzz_index_bytes(target, ops):
    files = dict(ORIGINAL[target])
    files[".index"] = mutate(files[".index"], ops)
    check(files)


@fuzz_settings("data_bytes")
@given(target=st.sampled_from(TARGETS), shard=st.integers(0, 7), ops=st.lists(op, min_size=1, max_size=4))
def test_fuzz_data_bytes(target, shard, ops):
    files = dict(ORIGINAL[target])
    data_names = sorted(k for k in files if k.startswith(".data-"))
    name = data_names[shard % len(data_names)]
    files[name] = mutate(files[name], ops)
    check(files)


# ------------------------------------------------------------------ structured index rewrites
def field(num: int, wire: int, payload: bytes) -> bytes:
    return put_varint(num << 3 | wire) + payload


def varint_field(num: int, v: int) -> bytes:
    return field(num, 0, put_varint(v % 2**64))


def len_field(num: int, payload: bytes) -> bytes:
    return field(num, 2, put_varint(len(payload)) + payload)


VALID_DTYPES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 17, 18, 19, 22, 23])
huge = st.sampled_from([2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63])
small_or_huge = st.one_of(st.integers(-3, 300), huge)
dims = st.lists(small_or_huge, max_size=6)
proto_field = st.one_of(
    st.builds(lambda v: varint_field(1, v), st.one_of(VALID_DTYPES, st.integers(0, 130), huge)),     # dtype
    st.builds(lambda ds: len_field(2, b"".join(len_field(2, varint_field(1, d)) for d in ds)), dims),  # shape
    st.builds(lambda v: len_field(2, varint_field(3, v)), st.integers(0, 2)),                        # unknown_rank
    st.builds(lambda v: varint_field(3, v), small_or_huge),                                          # shard_id
    st.builds(lambda v: varint_field(4, v), st.one_of(st.integers(0, 200000), huge)),                # offset
    st.builds(lambda v: varint_field(5, v), st.one_of(st.integers(0, 200000), huge)),                # size
    st.builds(lambda v: field(6, 5, struct.pack("<I", v)), st.integers(0, 2**32 - 1)),               # crc32c
    st.builds(lambda b: len_field(7, b), st.binary(max_size=12)),                                    # slices
    st.builds(lambda n, w, b: field(n, w, b), st.integers(1, 40), st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
              st.binary(max_size=12)),                                                               # anything
)
key_change = st.one_of(
    st.none(),
    st.builds(lambda b: b"\x00" + b, st.binary(max_size=8)),         # looks like a slice key
    st.binary(min_size=1, max_size=12),                              # arbitrary, maybe non-UTF-8
)


@fuzz_settings("entries")
@given(target=st.sampled_from(TARGETS), which=st.integers(0, 10**6), replace=st.booleans(),
       fields=st.lists(proto_field, min_size=1, max_size=4), new_key=key_change,
       drop=st.one_of(st.none(), st.integers(0, 10**6)), block_size=st.integers(1, 4096))
@example(target="dtypes/ckpt", which=907, replace=False, new_key=None, drop=None, block_size=1,  # found by "long"
         fields=[b"\x12\x10\x12\x06\x08\xff\xff\xff\xff\x07\x12\x06\x08\xff\xff\xff\xff\x07"])
def test_fuzz_index_entries(target, which, replace, fields, new_key, drop, block_size):
    files = dict(ORIGINAL[target])
    items = read_table(files[".index"])
    k = which % len(items)  # 0 is the header entry
    key, value = items[k]
    value = b"".join(fields) if replace else value + b"".join(fields)
    items[k] = (key if new_key is None or k == 0 else new_key, value)
    if drop is not None:
        del items[drop % len(items)]
    uniq = dict(sorted(items))  # build_table needs strictly sorted keys
    files[".index"] = build_table(list(uniq.items()), block_size=block_size)  # small: many blocks
    check(files)


MOSTLY_TRUE = st.sampled_from([True, True, True, False])


@st.composite
def string_case(draw):
    """Lengths, body and shape that mostly agree (to reach the deep paths), sometimes not."""
    lengths = draw(st.lists(st.one_of(st.integers(0, 300), huge), max_size=8))
    lengths = [n % 2**64 for n in lengths]
    if draw(st.booleans()) and all(n <= 300 for n in lengths):
        body = draw(st.binary(min_size=sum(lengths), max_size=sum(lengths)))
    else:
        body = draw(st.binary(max_size=400))
    if draw(st.booleans()):
        shape = [len(lengths)] if len(lengths) != 1 or draw(st.booleans()) else []
    else:
        shape = draw(dims)
    return lengths, body, shape


@fuzz_settings("strings")
@given(name=st.sampled_from(["string_vector", "string_scalar"]), case=string_case(),
       good_length_crc=MOSTLY_TRUE, good_crc=MOSTLY_TRUE)
@example(name="string_vector", case=([], b"", [0, 2**31 - 1, 2**31 - 1]), good_length_crc=True, good_crc=True)
def test_fuzz_string_payloads(name, case, good_length_crc, good_crc):
    """Crafted DT_STRING payloads with consistent checksums, so the string parser itself is exercised."""
    lengths, body, shape = case
    files = dict(ORIGINAL["dtypes/ckpt"])
    data_name = ".data-00000-of-00001"
    packed = b"".join(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n) for n in lengths)
    crc = crc32c(packed)
    length_crc = struct.pack("<I", mask_crc(crc) if good_length_crc else mask_crc(crc) ^ 1)
    payload = b"".join(put_varint(n) for n in lengths) + length_crc + body
    entry_crc = mask_crc(crc32c(body, crc32c(length_crc, crc))) if good_crc else 0
    offset = len(files[data_name])
    files[data_name] += payload
    shape_msg = b"".join(len_field(2, varint_field(1, d)) for d in shape)
    entry = (varint_field(1, 7) + len_field(2, shape_msg) + varint_field(4, offset) + varint_field(5, len(payload))
             + field(6, 5, struct.pack("<I", entry_crc)))
    items = [(k, entry if k == name.encode() else v) for k, v in read_table(files[".index"])]
    files[".index"] = build_table(items)
    check(files)
