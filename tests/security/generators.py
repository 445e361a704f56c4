"""Structure-aware generators of hostile inputs, one per format (issue 18.6).

Each generator takes a seeded `random.Random`, a `box()` that makes a fresh sandbox directory,
and a count; it writes each case's files into its sandbox and returns harness cases (see
`tests/security/harness.py`). Mutations follow each format's structure, not random bytes: pickle
opcodes (lengths, ints used as shapes, memo references, nesting, globals), TF index entries
re-encoded with valid block checksums (shapes, offsets, sizes, dtypes, counts), safetensors header
fields, torch archive members, JSON field types and depth, line counts and encodings, manifest
records. `MARK` runs are planted where a reader might echo text.
"""
from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from pathlib import Path
from random import Random
from typing import Callable, List

from tests.security.harness import MARK

ROOT = Path(__file__).resolve().parents[2]
MGE = ROOT / "tests" / "fixtures" / "mge"
TF = ROOT / "tests" / "fixtures" / "tf"
Box = Callable[[], Path]
HOSTILE_TEXT = MARK * 5000 + "\x1b[2J\x07\u202e"
JSON_VALUES = ["x", "", 1.5, -1, 0, 2 ** 70, 1e308, True, None, [], {}, [[[[1]]]], {"a": {"b": 1}}, HOSTILE_TEXT,
               "NaN", 10 ** 400]


def call(box: Path, cid: str, target: str, *args, **extra) -> dict:
    return {"id": cid, "kind": "call", "sandbox": str(box), "target": target, "args": [str(a) for a in args], **extra}


def cli(box: Path, cid: str, module: str, *argv, **extra) -> dict:
    return {"id": cid, "kind": "cli", "sandbox": str(box), "module": module, "argv": [str(a) for a in argv], **extra}


# ------------------------------------------------------------------------------ MegEngine pickle
def _ops(data: bytes):
    return list(pickletools.genops(data))


def mutate_pickle(data: bytes, rng: Random) -> bytes:
    ops = _ops(data)
    op, arg, pos = rng.choice(ops)
    kind = rng.randrange(8)
    b = bytearray(data)
    wanted = {0: ("BININT1", "BININT", "BININT2"), 1: ("SHORT_BINBYTES", "BINBYTES", "SHORT_BINUNICODE", "BINUNICODE"),
              2: ("BINGET",), 3: ("MEMOIZE",)}.get(kind)
    if wanted and not any(o.name in wanted for o, _, _ in ops) or kind == 6 and not any(
            a in ("_reconstruct", "ndarray", "dtype") for _, a, _ in ops):
        kind = 4  # this pickle has nothing of that kind: truncate instead
    if kind == 0:  # an int (shape dim, dtype flag, protocol field) to an extreme
        ints = [(o, a, p) for o, a, p in ops if o.name in ("BININT1", "BININT", "BININT2")]
        o, a, p = rng.choice(ints)
        width = {"BININT1": 1, "BININT2": 2, "BININT": 4}[o.name]
        b[p + 1:p + 1 + width] = rng.choice([b"\xff" * width, b"\x00" * width, b"\x7f" + b"\xff" * (width - 1)])
    elif kind == 1:  # a byte string's length
        blobs = [(o, p) for o, a, p in ops if o.name in ("SHORT_BINBYTES", "BINBYTES", "SHORT_BINUNICODE", "BINUNICODE")]
        o, p = rng.choice(blobs)
        width = 1 if o.name.startswith("SHORT") else 4
        b[p + 1:p + 1 + width] = rng.choice([b"\xff" * width, b"\x00" * width, bytes([1] * width)])
    elif kind == 2:  # a memo reference to another object (type confusion) or to none
        gets = [p for o, a, p in ops if o.name == "BINGET"]
        b[rng.choice(gets) + 1] = rng.randrange(256)
    elif kind == 3:  # drop a MEMOIZE: every later reference shifts by one
        memos = [p for o, a, p in ops if o.name == "MEMOIZE"]
        del b[rng.choice(memos)]
    elif kind == 4:  # truncate at an opcode boundary
        del b[pos:]
    elif kind == 5:  # swap one opcode for another
        b[pos] = rng.choice(b"()][}lNtuesdabRqhjJKM\x85\x86\x87\x88\x89\x8c\x93\x94\x95")
    elif kind == 6:  # a global: anything but the allow-list must be refused
        names = [p for o, a, p in ops if o.name == "SHORT_BINUNICODE" and a in ("_reconstruct", "ndarray", "dtype")]
        p = rng.choice(names)
        new = rng.choice([b"system", b"eval", b"__reduce__", b"frombuffer", b"load"])
        b[p:p + 2 + b[p + 1]] = b"\x8c" + bytes([len(new)]) + new
    else:  # nesting: a deep stack of lists in front of the real content
        depth = rng.choice([1000, 100_000, 900_000])
        b[2:2] = b"]" * depth
    return bytes(b)


def shared_array_pickle(references: int, side: int = 256) -> bytes:
    """One float32 (side, side) array memoised once, then referenced under `references` keys:
    an amplification bomb for a reader that copies per reference (1 MiB file -> GBs)."""
    nbytes = side * side * 4
    array = (b"\x8c\x15numpy.core.multiarray\x8c\x0c_reconstruct\x93\x8c\x05numpy\x8c\x07ndarray\x93K\x00\x85C\x01b\x87R"
             b"(K\x01M" + struct.pack("<H", side) + b"M" + struct.pack("<H", side) + b"\x86\x8c\x05numpy\x8c\x05dtype\x93"
             b"\x8c\x02f4\x89\x88\x87R(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89\x8e"
             + struct.pack("<Q", nbytes) + b"\x00" * nbytes + b"tb")
    out = [b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R(\x8c\x01a", array, b"r\x00\x00\x00\x00"]
    for i in range(references):
        key = f"k{i}".encode()
        out.append(b"\x8c" + bytes([len(key)]) + key + b"j\x00\x00\x00\x00")
    out.append(b"u.")
    return b"".join(out)


def gen_mge_pickle(rng: Random, box: Box, n: int) -> List[dict]:
    base = {name: (MGE / name).read_bytes() for name in ("hub_bert.pkl", "hub_bert_proto5.pkl", "keep_var_bert.pkl")}
    cases = []
    for i in range(n):
        d = box()
        name = rng.choice(sorted(base))
        if i % 10 == 0:  # amplification: through the reader, so that the budget under test is the reader's
            (d / "w.pkl").write_bytes(shared_array_pickle(2000))
            cases.append(call(d, f"mge-shared-{i}", "converters.mge_pickle:load_mge_pickle", d / "w.pkl"))
            continue
        (d / "w.pkl").write_bytes(mutate_pickle(base[name], rng))
        cases.append(reader_or_cli(d, i, "mge", d / "w.pkl", "converters.mge_pickle:load_mge_pickle",
                                   ("converters.mge2torch", MGE / "bert_config.json")))
    return cases


def reader_or_cli(d: Path, i: int, tag: str, src: Path, reader: str, command: tuple) -> dict:
    """Every fourth case goes through the command line `(module, config)` (which may accept what
    it reads), the rest through the reader."""
    if i % 4 == 0:
        module, config = command
        return cli(d, f"{tag}-cli-{i}", module, src, "--config", config, "--out", d / "out", must_fail=False)
    return call(d, f"{tag}-{i}", reader, src)


# ------------------------------------------------------------------------------ TF bundle
def gen_tf_bundle(rng: Random, box: Box, n: int) -> List[dict]:
    from converters import _tf_proto as proto
    from converters._leveldb_table import build_table, read_table

    prefix = TF / "tf1" / "bert_model.ckpt"
    index = Path(str(prefix) + ".index").read_bytes()
    data = Path(str(prefix) + ".data-00000-of-00001").read_bytes()
    items = read_table(index)
    cases = []
    for i in range(n):
        d = box()
        entries = [(k, v) for k, v in items]
        kind = rng.randrange(7)
        j = rng.randrange(1, len(entries))
        e = proto.parse_entry(entries[j][1])
        shape, offset, size, dtype = list(e.shape), e.offset, e.size, e.dtype
        if kind == 0:  # a dimension nothing backs
            shape = (shape or [1])[:-1] + [rng.choice([2 ** 40, 2 ** 31, 0, 10 ** 6])]
        elif kind == 1:  # rank
            shape = [1] * rng.choice([33, 64, 65, 1000])
        elif kind == 2:  # offset / size past the data file, or inconsistent with the shape
            offset, size = rng.choice([(len(data), size), (2 ** 62, size), (offset, size + 4), (offset, 0)])
        elif kind == 3:  # dtype codes: string, resource, unknown, negative
            dtype = rng.choice([7, 20, 0, 999, 2 ** 31 - 1])
        elif kind == 4:  # count: many tiny entries (stays under the index byte cap)
            extra = [(f"v{k:07d}".encode() + MARK.encode() * 4, proto.encode_entry(1, (0,), 0, 0, 0))
                     for k in range(rng.choice([10_000, 200_000]))]
            entries = sorted(entries + extra)
        elif kind == 5:  # header: shard count
            entries[0] = (b"", proto.encode_header(num_shards=rng.choice([0, 2, 2 ** 31])))
        else:  # a key of escape sequences and a long name
            entries[j] = ((HOSTILE_TEXT[-6:] + MARK * 400).encode(), entries[j][1])
            entries = sorted(entries)
        if kind in (0, 1, 2, 3):
            entries[j] = (entries[j][0], proto.encode_entry(dtype, tuple(shape), offset, size, e.crc32c or 0))
        (d / "ckpt.index").write_bytes(build_table(entries))
        (d / "ckpt.data-00000-of-00001").write_bytes(data)
        cases.append(reader_or_cli(d, i, "tf", d / "ckpt", "converters.tf_checkpoint:load_tf_checkpoint",
                                   ("converters.tf2torch", TF / "bert_config.json")))
    return cases


# ------------------------------------------------------------------------------ safetensors
def _safetensors(header: object, body: bytes, length: int = None) -> bytes:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(blob) if length is None else length) + blob + body


def gen_safetensors(rng: Random, box: Box, n: int) -> List[dict]:
    cases = []
    good = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    for i in range(n):
        d = box()
        h = json.loads(json.dumps(good))
        kind = rng.randrange(8)
        length = None
        if kind == 0:
            h["a"]["shape"] = rng.choice([[2 ** 62, 2 ** 62], [-1, 3], [2 ** 40], ["2", 3], [2.5, 3], None])
        elif kind == 1:
            h["a"]["data_offsets"] = rng.choice([[0, 2 ** 60], [24, 0], [0, 23], [-8, 16], [0], "x"])
        elif kind == 2:
            h["a"]["dtype"] = rng.choice(["F8_E4M3", "X", "", 1, HOSTILE_TEXT])
        elif kind == 3:
            length = rng.choice([2 ** 63, 2 ** 40, 3, 0])
        elif kind == 4:
            h["__metadata__"] = rng.choice([{"k": 1}, [], HOSTILE_TEXT, {"k": HOSTILE_TEXT}])
        elif kind == 5:
            h = {f"t{k}{MARK * 3}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for k in range(50_000)}
        elif kind == 6:
            h = b"[" * 100_000 + b"]" * 100_000
        else:
            h[HOSTILE_TEXT] = h.pop("a")
        (d / "model.safetensors").write_bytes(_safetensors(h, bytes(24), length))
        cases.append(call(d, f"st-{i}", "converters.weights:load_weights", d / "model.safetensors"))
    return cases


# ------------------------------------------------------------------------------ torch archives
def _torch_bytes(state, **kw) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf, **kw)
    return buf.getvalue()


def torch_variants() -> List[tuple]:
    """(name, bytes) of legitimate container variants torch.load reads: each must load to the same numbers."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    state = {"w": base, "b": torch.randn(4, generator=g), "h": torch.randn(3, generator=g).half(),
             "i": torch.arange(5)}
    shared = {"w": base, "view": base[2:4], "t": base.t()}  # views of one storage, at offsets, non-contiguous
    stored = _torch_bytes(state)
    out = [("zip-stored", stored), ("zip-shared-views", _torch_bytes(shared)),
           ("legacy", _torch_bytes(state, _use_new_zipfile_serialization=False))]
    src = zipfile.ZipFile(io.BytesIO(stored))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    out.append(("zip-deflated", deflated.getvalue()))
    return out


def mutate_torch_zip(data: bytes, rng: Random) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    out = io.BytesIO()
    victim = rng.choice(names)
    kind = rng.randrange(4)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in names:
            member = src.read(name)
            if name == victim:
                if name.endswith("data.pkl"):
                    member = mutate_pickle(member, rng)
                elif kind == 0:
                    member = member[: len(member) // 2]  # a storage shorter than its tensor
                elif kind == 1:
                    member = member * 3
                elif kind == 2:
                    continue  # a missing member
                else:
                    member = b"big" if name.endswith("byteorder") else member[::-1]
            z.writestr(name, member)
    return out.getvalue()


def gen_torch(rng: Random, box: Box, n: int) -> List[dict]:
    import torch

    variants = torch_variants()
    cases = []
    for name, data in variants:  # legitimate variants: the same numbers as torch.load, or a clean refusal
        d = box()
        (d / "pytorch_model.bin").write_bytes(data)
        ref = torch.load(io.BytesIO(data), weights_only=True)
        cases.append(call(d, f"torch-variant-{name}", "converters.weights:load_weights", d / "pytorch_model.bin",
                          expect_digest=reference_digest(ref)))
    zips = [data for name, data in variants if name.startswith("zip")]
    legacy = dict(variants)["legacy"]
    for i in range(n):
        d = box()
        if i % 3 == 2:
            data = mutate_pickle_anywhere(legacy, rng)
        else:
            data = mutate_torch_zip(rng.choice(zips), rng)
        (d / "pytorch_model.bin").write_bytes(data)
        cases.append(call(d, f"torch-{i}", "converters.weights:load_weights", d / "pytorch_model.bin"))
    return cases


def mutate_pickle_anywhere(data: bytes, rng: Random) -> bytes:
    """Legacy torch files are several pickles back to back, then raw storages: flip one int or length."""
    b = bytearray(data)
    pos = rng.randrange(2, min(len(b), 2000))
    b[pos] = rng.choice([0, 0xFF, 0x7F, b[pos] ^ 0x40])
    return bytes(b)


def reference_digest(state) -> str:
    """The harness's digest of a state dict read by the reference library."""
    from tests.security.harness import _digest

    return _digest({k: v.contiguous() for k, v in state.items()})


# ------------------------------------------------------------------------------ JSON files
def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def gen_config(rng: Random, box: Box, n: int) -> List[dict]:
    base = json.loads((MGE / "bert_config.json").read_text())
    cases = []
    for i in range(n):
        d = box()
        cfg = dict(base)
        kind = rng.randrange(5)
        if kind < 3:
            cfg[rng.choice(sorted(base))] = rng.choice(JSON_VALUES)
        elif kind == 3:
            cfg[HOSTILE_TEXT] = rng.choice(JSON_VALUES)
        text = json.dumps(cfg) if kind < 4 else rng.choice([deep_json(100_000), "[]", '"x"', "nul", "{" * 50])
        (d / "config.json").write_text(text)
        if i % 3 == 0:
            cases.append(cli(d, f"config-cli-{i}", "converters.mge2torch", MGE / "hub_bert.pkl", "--config",
                             d / "config.json", "--out", d / "out", must_fail=False))
        else:
            cases.append(call(d, f"config-{i}", "bert_port.config:BertConfig.from_json_file", d / "config.json"))
    return cases


def gen_tokenizer_config(rng: Random, box: Box, n: int) -> List[dict]:
    cases = []
    for i in range(n):
        d = box()
        (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
        key = rng.choice(["do_lower_case", "max_len", "never_split", "tokenize_chinese_chars", HOSTILE_TEXT])
        value = rng.choice(JSON_VALUES)
        text = json.dumps({key: value}) if i % 5 else deep_json(rng.choice([50, 100_000]))
        (d / "tokenizer_config.json").write_text(text)
        cases.append(call(d, f"tokcfg-{i}", "bert_port.tokenization:BertTokenizer.from_pretrained", d))
    return cases


VOCABS = [
    lambda rng: b"a\n" * rng.choice([1_000_000, 3_000_000]),  # millions of tiny records under the byte cap
    lambda rng: b"[PAD]\n\xff\xfe\x00bad\n",
    lambda rng: (MARK * 10_000_000).encode()[: rng.choice([1 << 20, 8 << 20])],  # one long line
    lambda rng: b"[PAD]\r\n[UNK]\r\nx\x00y\n" * 1000,
    lambda rng: ("\n".join(["[PAD]", "[UNK]"] + ["dup"] * 10_000) + "\n").encode(),
]


def _file_case(d: Path, name: str, data: bytes, cid: str, target: str) -> dict:
    (d / name).write_bytes(data)
    return call(d, cid, target, d / name)


def gen_vocab(rng: Random, box: Box, n: int) -> List[dict]:
    return [_file_case(box(), "vocab.txt", rng.choice(VOCABS)(rng), f"vocab-{i}", "bert_port.tokenization:load_vocab")
            for i in range(n)]


def gen_manifest(rng: Random, box: Box, n: int) -> List[dict]:
    cases = []
    for i in range(n):
        d = box()
        entry = d / "cache" / "tiny_L-2_H-32_A-4"
        entry.mkdir(parents=True)
        (entry / "config.json").write_text("{}")
        rec = {"size": 2, "mtime_ns": 0, "sha256": "0" * 64}
        kind = rng.randrange(5)
        files: object = {"config.json": rec}
        if kind == 0:
            files = {"config.json": {k: rng.choice(JSON_VALUES) for k in rec}}
        elif kind == 1:
            files = {rng.choice([HOSTILE_TEXT, "/etc/passwd", "../../x", "a/../../b", "", "\x00"]): rec}
        elif kind == 2:
            files = {f"f{k}{MARK}": rec for k in range(rng.choice([1000, 15_000]))}
        elif kind == 3:
            files = rng.choice(JSON_VALUES)
        manifest = {"format": 1, "name": "tiny_L-2_H-32_A-4", "source": {}, "files": files}
        text = json.dumps(manifest) if kind < 4 else deep_json(rng.choice([1000, 200_000]))
        (entry / "bert_port_manifest.json").write_text(text)
        if i % 2:
            cases.append(cli(d, f"manifest-cli-{i}", "bert_port.cache", "--cache-dir", d / "cache",
                             rng.choice(["verify", "list"]), must_fail=False, report=True))
        else:
            cases.append(call(d, f"manifest-{i}", "bert_port.cache:check_entry", entry))
    return cases


# ------------------------------------------------------------------------------ fine-tuning data
DATA = [
    lambda rng: b"w O\n" * rng.choice([100_000, 300_000]),  # one long sentence; ~300 B of Python objects per token
    lambda rng: b"EU B-ORG\n\xff\xfe rejects O\n",
    lambda rng: ("w " + " ".join([MARK] * 50_000) + "\n").encode(),
    lambda rng: ("w B-" + HOSTILE_TEXT + "\n\n").encode(),
    lambda rng: b"a\tb\tc\n" + b"x\x00y\t1\n" * 1000,
    lambda rng: b"-DOCSTART- -X- O O\n\n" * 10_000,
]


def gen_finetune_data(rng: Random, box: Box, n: int) -> List[dict]:
    readers = [rng.choice(["read_conll", "read_glue_tsv", "read_text"]) for _ in range(n)]
    return [_file_case(box(), "data.txt", rng.choice(DATA)(rng), f"data-{r}-{i}", f"bert_port.data:{r}")
            for i, r in enumerate(readers)]


GENERATORS = {"mge_pickle": gen_mge_pickle, "tf_bundle": gen_tf_bundle, "safetensors": gen_safetensors,
              "torch": gen_torch, "config": gen_config, "tokenizer_config": gen_tokenizer_config,
              "vocab": gen_vocab, "manifest": gen_manifest, "finetune_data": gen_finetune_data}
