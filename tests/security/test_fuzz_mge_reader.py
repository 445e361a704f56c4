"""Hardening: mutated MegEngine pickles may only ever raise ConversionError, never run code or hang.

Starting from the real MegEngine-written fixtures (protocols 4 and 5, hub and keep_var forms),
hypothesis flips, deletes and inserts bytes, truncates, and splices pickle opcodes that import
or call things (GLOBAL/STACK_GLOBAL/REDUCE/BUILD/INST/OBJ/NEWOBJ) with names of dangerous
functions. Each example has a deadline; a sentinel file that a successful `os.system` would
create is checked after every example.

Budget: 1000 examples by default (well under a minute); BERT_PORT_FUZZ=long runs 25x more.
"""
from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters import ConversionError
from converters.mge_pickle import load_mge_pickle

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "mge"
ORIGINAL = {name: (FIX / name).read_bytes() for name in ("hub_bert.pkl", "hub_bert_proto5.pkl", "keep_var_bert.pkl")}
SENTINEL = Path(tempfile.gettempdir()) / "bert_port_fuzz_pwned"
LONG = os.environ.get("BERT_PORT_FUZZ") == "long"
SETTINGS = settings(max_examples=(25 if LONG else 1) * 500, deadline=timedelta(seconds=5 if LONG else 2),
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_CMD = f"touch {SENTINEL}".encode()
SPLICES = [
    b"cos\nsystem\n(V" + _CMD + b"\ntR.",  # GLOBAL os.system, call
    b"\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(_CMD)]) + _CMD + b"\x85R",  # STACK_GLOBAL + REDUCE
    b"cbuiltins\neval\n(Vprint(1)\ntR",
    b"(cos\nsystem\nV" + _CMD + b"\ni",  # INST
    b"csubprocess\nPopen\n",
    b"cnumpy.testing._private.utils\nrunstring\n",
    b"cbuiltins\ngetattr\n",
    b"}(V__class__\ncos\nsystem\nsb",  # BUILD with a hostile state
    b"\x80\x05", b"(" * 64, b"]" * 64, b"\x94" * 8, b"h\xff", b"j\xff\xff\xff\x7f",  # PROTO, MARK/list floods, memo abuse
    b"\x8a\x08" + b"\xff" * 8, b"B\xff\xff\xff\x7f", b"\x8e" + b"\xff" * 8,  # huge LONG/BINBYTES/BINBYTES8 lengths
]


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzzed.pkl"
        path.write_bytes(data)
        try:
            tensors = load_mge_pickle(path)
        except ConversionError as e:
            assert "fuzzed.pkl" in str(e), e
        else:
            assert isinstance(tensors, dict)
    assert not SENTINEL.exists(), "a mutated pickle executed code"


@SETTINGS
@given(name=st.sampled_from(sorted(ORIGINAL)), data=st.data())
def test_byte_mutations(name, data):
    blob = bytearray(ORIGINAL[name])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "set"]))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "delete":
            del blob[at:at + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            blob[at] = data.draw(st.sampled_from(b"cR.b(tsi\x93\x94\x81\x85\x8c"))
        if not blob:
            break
    check(bytes(blob))


@SETTINGS
@given(name=st.sampled_from(sorted(ORIGINAL)), data=st.data())
def test_opcode_splices_and_truncation(name, data):
    blob = ORIGINAL[name]
    at = data.draw(st.integers(0, len(blob)))
    splice = data.draw(st.sampled_from(SPLICES))
    keep_tail = data.draw(st.booleans())
    check(blob[:at] + splice + (blob[at:] if keep_tail else b""))


def teardown_module():
    SENTINEL.unlink(missing_ok=True)
