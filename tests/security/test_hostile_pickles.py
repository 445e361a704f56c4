"""Hostile .pkl files must raise ConversionError without running or allocating anything.

Every pickle here is built in the test, either with the stock pickler from a `__reduce__` class or
opcode by opcode. Each payload would create `tmp_path / "pwned"` if it ran; the stock
`pickle.load` is used once to prove that (test_payloads_are_live), so a pass means the loader
stopped a working exploit, not a broken one.
"""
import collections
import importlib
import os
import pickle
import resource
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from converters.errors import ConversionError
from converters.mge_pickle import MAX_OPCODES, load_mge_pickle


# --------------------------------------------------------------------------- opcode-level helpers
def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL: valid in every protocol


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def integer(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def f4_dtype() -> bytes:
    return call(glob("numpy", "dtype"), text("f4"), b"\x89", b"\x88") + tup(
        integer(3), text("<"), b"N", b"N", b"N", integer(-1), integer(-1), integer(0)) + b"b"


def array(shape: "tuple[int, ...]", data: bytes) -> bytes:
    """numpy.core.multiarray._reconstruct + BUILD, exactly as numpy 1.x pickles an ndarray."""
    return (call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), b"C\x01b")
            + tup(integer(1), tup(*(integer(d) for d in shape)), f4_dtype(), b"\x89", data) + b"b")


def state_dict(*items: "tuple[str, bytes]") -> bytes:
    return glob("collections", "OrderedDict") + b")R(" + b"".join(text(k) + v for k, v in items) + b"u"


def binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


# --------------------------------------------------------------------------------------- payloads
def shell(sentinel) -> str:
    return f"touch '{sentinel}'"


def py_code(sentinel) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


class Reduce:
    """Pickles as func(*args); func may itself be a Reduce (a callable built while unpickling)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):  # the pickler insists that a reduce callable be callable
        raise AssertionError("never called in the test process")


def reduce_payloads(sentinel, tmp_path):
    """name -> object whose stock pickle creates `sentinel` on pickle.load."""
    evil_npy = tmp_path / "evil.npy"
    np.save(evil_npy, np.array([Reduce(os.system, shell(sentinel))], dtype=object), allow_pickle=True)
    getattr_chain = Reduce(Reduce(getattr, Reduce(importlib.import_module, "os"), "system"), shell(sentinel))
    return {
        "os.system": Reduce(os.system, shell(sentinel)),
        "builtins.eval": Reduce(eval, py_code(sentinel)),
        "builtins.exec": Reduce(exec, py_code(sentinel)),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(sentinel)]),
        "importlib.import_module+getattr": getattr_chain,
        "numpy.load(allow_pickle=True)": Reduce(np.load, str(evil_npy), None, True),
        "inside a state dict": collections.OrderedDict(
            [("w", np.ones(2, np.float32)), ("x", Reduce(os.system, shell(sentinel)))]),
    }


def opcode_payloads(sentinel):
    """name -> pickle bytes, for payloads the stock pickler would not write."""
    cmd = text(shell(sentinel))
    good = array((2,), binbytes(b"\0" * 8))
    param = glob("megengine.tensor", "Parameter")
    return {
        "GLOBAL os.system, protocol 0": b"cos\nsystem\n(S'" + shell(sentinel).encode() + b"'\ntR.",
        "GLOBAL posix.system": p4(call(glob("posix", "system"), cmd)),
        "STACK_GLOBAL builtins.getattr": p4(text("builtins") + text("getattr") + b"\x93"),
        "numpy.testing runstring": p4(call(glob("numpy.testing._private.utils", "runstring"),
                                           text(py_code(sentinel)), b"}")),
        "numpy.f2py os.system attribute": p4(call(text("numpy.f2py") + text("os.system") + b"\x93", cmd)),
        "numpy.f2py subprocess": p4(call(glob("numpy.f2py", "subprocess"), cmd)),
        "numpy.f2py run_main": p4(call(glob("numpy.f2py", "run_main"), b"]" + text("-h") + b"a")),
        "numpy.load": p4(call(glob("numpy", "load"), text("x.npy"), b"N", b"\x88")),
        "numpy.core getattr-like dotted name": p4(glob("numpy.core.multiarray", "_reconstruct.__globals__")),
        "os.system inside array data": p4(state_dict(("w", array((2,), call(glob("os", "system"), cmd))))),
        "os.system as array dtype": p4(state_dict(("w", call(
            glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), b"C\x01b")
            + tup(integer(1), tup(integer(2)), call(glob("os", "system"), cmd), b"\x89", binbytes(b"\0" * 8))
            + b"b"))),
        "_reconstruct of a non-ndarray class": p4(state_dict(("w", call(
            glob("numpy.core.multiarray", "_reconstruct"), glob("collections", "OrderedDict"),
            tup(integer(0)), b"C\x01b")))),
        "object dtype": p4(state_dict(("w", call(glob("numpy", "dtype"), text("O8"), b"\x89", b"\x88")))),
        "Parameter BUILD state is os.system": p4(state_dict(("w", param + tup(good) + b"\x81"
                                                               + call(glob("os", "system"), cmd) + b"b"))),
        "Parameter BUILD sets __class__/__reduce__": p4(state_dict(("w", param + tup(good) + b"\x81" + b"}"
            + text("__class__") + glob("collections", "OrderedDict") + text("__reduce__") + text("x") + b"u" + b"b"))),
        "Parameter BUILD with slot state": p4(state_dict(("w", param + tup(good) + b"\x81"
            + tup(b"N", b"}" + text("data") + text("x") + b"s") + b"b"))),
        "BUILD on the Parameter class itself": p4(param + b"}" + text("__new__") + text("x") + b"s" + b"b"),
        "BUILD on the OrderedDict class": p4(glob("collections", "OrderedDict")
                                            + tup(b"N", b"}" + text("items") + text("x") + b"s") + b"b"),
        "BUILD on _reconstruct": p4(glob("numpy.core.multiarray", "_reconstruct")
                                    + tup(b"N", b"}" + text("__defaults__") + tup(text("x")) + b"s") + b"b"),
        "BUILD on numpy.ndarray": p4(glob("numpy", "ndarray") + b"}" + b"b"),
        "_codecs.encode with another codec": p4(state_dict(("w", call(glob("_codecs", "encode"), text("x"),
                                                                     text("rot13"))))),
        "bytes(n) allocation": p4(state_dict(("w", call(glob("builtins", "bytes"), integer(10 ** 9))))),
        "persistent id": p4(text("x") + b"Q"),
        "extension code": p4(b"\x82\x01"),
        "INST os.system": b"(S'" + shell(sentinel).encode() + b"'\nios\nsystem\n.",
        "OBJ posix.system": b"\x80\x02(" + glob("posix", "system") + text(shell(sentinel)) + b"o.",
    }


@pytest.fixture
def sentinel(tmp_path):
    return tmp_path / "pwned"


def load_expecting_refusal(path, sentinel, match=None):
    with pytest.raises(ConversionError) as info:
        load_mge_pickle(path)
    assert str(path) in str(info.value)
    if match:
        assert match in str(info.value)
    assert not sentinel.exists(), "payload ran"
    return info.value


# ------------------------------------------------------------------------------------------ tests
def test_payloads_are_live(tmp_path, sentinel):
    """Sanity check of the test itself: the stock unpickler does run the os.system payload."""
    data = pickle.dumps(Reduce(os.system, shell(sentinel)), protocol=4)
    assert pickle.loads(data) == 0 and sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "importlib.import_module+getattr", "numpy.load(allow_pickle=True)",
                                  "inside a state dict"])
def test_reduce_payloads_are_refused(tmp_path, sentinel, protocol, name):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(reduce_payloads(sentinel, tmp_path)[name], protocol=protocol))
    error = load_expecting_refusal(path, sentinel, match="refusing to load global")
    assert "only numpy arrays and MegEngine tensors are allowed" in str(error)


@pytest.mark.parametrize("name", sorted(opcode_payloads("S")))
def test_opcode_payloads_are_refused(tmp_path, sentinel, name):
    path = tmp_path / "evil.pkl"
    path.write_bytes(opcode_payloads(sentinel)[name])
    load_expecting_refusal(path, sentinel)


def test_refusal_names_the_global(tmp_path, sentinel):
    path = tmp_path / "x.pkl"
    path.write_bytes(p4(call(glob("os", "system"), text(shell(sentinel)))))
    error = load_expecting_refusal(path, sentinel)
    assert str(error) == (f"{path}: refusing to load global 'os.system' "
                          "(only numpy arrays and MegEngine tensors are allowed)")


def test_builds_do_not_mutate_globals(tmp_path, sentinel):
    before = (collections.OrderedDict.__dict__.get("items"), np.ndarray.__dict__.get("shape"))
    for name in ("BUILD on the OrderedDict class", "BUILD on _reconstruct", "BUILD on the Parameter class itself"):
        path = tmp_path / "b.pkl"
        path.write_bytes(opcode_payloads(sentinel)[name])
        load_expecting_refusal(path, sentinel)
    assert (collections.OrderedDict.__dict__.get("items"), np.ndarray.__dict__.get("shape")) == before
    # and a clean file still loads normally afterwards
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(collections.OrderedDict(w=np.arange(3, dtype=np.float32)), protocol=4))
    assert load_mge_pickle(good)["w"].tolist() == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------- resource exhaustion
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


HUGE = {
    # 10**12 float32 elements claimed by shape, 8 bytes of data
    "array shape 10^6 x 10^6": p4(state_dict(("w", array((10 ** 6, 10 ** 6), binbytes(b"\0" * 8))))),
    "_frombuffer shape 10^6 x 10^6": b"\x80\x05" + state_dict(("w", call(
        glob("numpy.core.numeric", "_frombuffer"), b"\x96" + struct.pack("<Q", 8) + b"\0" * 8, f4_dtype(),
        tup(integer(10 ** 6), integer(10 ** 6)), text("C")))) + b".",
    "BINBYTES8 claims 10^12 bytes": p4(state_dict(("w", array((2,), b"\x8e" + struct.pack("<Q", 10 ** 12))))),
    "BYTEARRAY8 claims 10^12 bytes": b"\x80\x05\x96" + struct.pack("<Q", 10 ** 12) + b".",
    "BYTEARRAY8 claims 2 GB": b"\x80\x05\x96" + struct.pack("<Q", 2 * 10 ** 9) + b"\0" * 16 + b".",
    "FRAME claims 10^12 bytes": b"\x80\x04\x95" + struct.pack("<Q", 10 ** 12) + b"N.",
    "BINUNICODE8 claims 10^12 bytes": b"\x80\x04\x8d" + struct.pack("<Q", 10 ** 12) + b"x.",
    "memo index 2^31 (LONG_BINPUT)": b"\x80\x04Nr" + struct.pack("<I", 2 ** 31 - 1) + b".",
    "memo index 2^32-1 (LONG_BINPUT)": b"\x80\x04Nr" + struct.pack("<I", 2 ** 32 - 1) + b".",
    "opcode flood (empty dicts)": b"\x80\x04" + b"}\x94" * (MAX_OPCODES // 2 + 10) + b".",
}


@pytest.mark.parametrize("name", sorted(HUGE))
def test_size_claims_fail_fast_with_bounded_memory(tmp_path, sentinel, name):
    path = tmp_path / "huge.pkl"
    path.write_bytes(HUGE[name])
    peak, start = _peak_rss_mb(), time.monotonic()
    load_expecting_refusal(path, sentinel)
    assert time.monotonic() - start < 20
    assert _peak_rss_mb() - peak < 200, f"{name}: peak RSS grew by {_peak_rss_mb() - peak:.0f} MB"


@pytest.mark.parametrize("depth, opener, closer", [
    (10 ** 6, b"]", b"a"),   # 10^6 nested lists: EMPTY_LIST ... APPEND ...
    (10 ** 6, b"(", b"t"),   # 10^6 nested tuples: MARK ... TUPLE ...
    (300_000, b"(", b"l"),   # under the opcode cap: built, then rejected as not a dict
])
def test_recursion_bomb(tmp_path, sentinel, depth, opener, closer):
    path = tmp_path / "deep.pkl"
    path.write_bytes(b"\x80\x04" + opener * depth + closer * (depth - 1) + b".")
    peak = _peak_rss_mb()
    load_expecting_refusal(path, sentinel)
    assert _peak_rss_mb() - peak < 200


def test_deep_value_inside_a_state_dict(tmp_path, sentinel):
    depth = 200_000
    path = tmp_path / "deep.pkl"
    path.write_bytes(p4(state_dict(("w", b"(" * depth + b"t" * depth))))
    load_expecting_refusal(path, sentinel, match="value of 'w' is tuple")


def test_runs_with_low_recursion_limit(tmp_path, sentinel):
    """Nothing in the loader recurses: a tiny recursion limit changes nothing."""
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(w=np.ones(3, np.float32)), protocol=4))
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 60)
    try:
        assert load_mge_pickle(path)["w"].tolist() == [1.0, 1.0, 1.0]
    finally:
        sys.setrecursionlimit(old)
