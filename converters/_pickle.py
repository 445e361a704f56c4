"""The restricted, counted, pure-Python unpickler every pickle-based reader builds on.

`pickle.load` runs any callable a file names; these readers allow exact global names only, each
mapped to a stand-in that records plain data (the allow-list is the format's: `mge_pickle`,
`torch_checkpoint`). What every format shares lives here: opcodes counted, reads bounded by the
file, dict keys str-only and counted before insertion, sets refused, BYTEARRAY8 checked first.
"""
from __future__ import annotations

import collections
import pickle
import struct
from typing import Any, Dict, Tuple

from converters.errors import ConversionError, MalformedInput

MAX_OPCODES = 1_000_000  # BERT-large needs ~15k; 1M bounds a crafted file to ~70 MB of objects
MAX_DICT_ITEMS = 1 << 14  # entries per dict: a BERT-large state dict (with optimizer state) has ~1.2k
MAX_KEY_CHARS = 1024  # dict keys: BERT's longest state-dict name is ~60 characters



class Frozen:
    """Base of the stand-in objects handed to the pickle machinery: BUILD on them is refused.

    Without this a BUILD opcode on a global (say `_reconstruct`) would set attributes on it that
    outlive this load, e.g. a function's __defaults__.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise MalformedInput("BUILD on a global is not allowed")



class Function(Frozen):
    """An allowed global that is called (REDUCE) with positional arguments only."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)



def codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocols 0-2 spell bytes as _codecs.encode(str, 'latin1'); nothing else is allowed."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise MalformedInput("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin-1")


def check_key(target: Any, key: Any) -> None:
    """Before a dict insertion: int/tuple/float keys hash predictably (1 + i*(2**61-1) all collide,
    making insertion quadratic), str keys use the per-process random hash, so only str is allowed."""
    if type(target) not in (dict, collections.OrderedDict):
        raise MalformedInput(f"SETITEM on a {type(target).__name__} (only dicts take items)")
    if type(key) is not str:
        raise MalformedInput(f"state-dict key of type {type(key).__name__} (expected str: a weight file's dicts have str keys only)")
    if len(key) > MAX_KEY_CHARS:
        raise MalformedInput(f"dict key of {len(key)} characters (limit {MAX_KEY_CHARS})")
    if len(target) >= MAX_DICT_ITEMS and key not in target:
        raise MalformedInput(f"a dict with more than {MAX_DICT_ITEMS} entries")


def ordered_dict(*args: Any) -> "collections.OrderedDict[str, Any]":
    """OrderedDict() (Python 3's pickles), or OrderedDict([[key, value], ...]) (Python 2's)."""
    d: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
    if len(args) > 1 or (args and type(args[0]) not in (list, tuple)):
        raise MalformedInput("OrderedDict(...) takes only a list of (key, value) pairs")
    for pair in args[0] if args else ():
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise MalformedInput("OrderedDict(...) takes only a list of (key, value) pairs")
        check_key(d, pair[0])
        d[pair[0]] = pair[1]
    return d


def empty_bytes(*args: Any) -> bytes:
    """Protocols 0-2 spell b'' (an empty array's data) as bytes(); bytes(n) would allocate n."""
    if args:
        raise MalformedInput("bytes(...) with arguments is not allowed")
    return b""



class BoundedFile:
    """read(n) never asks the OS for more than the file still holds: a length field claiming
    10**12 bytes fails at once as a truncated file instead of reserving memory."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._left = f, size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            if n == 1 and self._left == 0:
                return b""  # the unpickler turns this into EOFError ("ran out of input")
            raise MalformedInput(f"truncated pickle: an opcode needs {n} bytes, only {self._left} are left")
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._f.readline()
        self._left -= len(line)
        return line


def _counted(op: Any) -> Any:
    def run(self: "RestrictedUnpickler") -> None:
        self._ops += 1
        if self._ops > MAX_OPCODES:
            raise MalformedInput(f"more than {MAX_OPCODES} pickle opcodes (a weight file needs a few per tensor)")
        op(self)
    return run


def _load_setitem(self: "RestrictedUnpickler") -> None:
    value, key = self.stack.pop(), self.stack.pop()
    check_key(self.stack[-1], key)
    self.stack[-1][key] = value


def _load_setitems(self: "RestrictedUnpickler") -> None:
    items = self.pop_mark()
    target = self.stack[-1]
    if len(items) % 2:
        raise MalformedInput("SETITEMS with an odd number of stack items")
    for i in range(0, len(items), 2):
        check_key(target, items[i])
        target[items[i]] = items[i + 1]


def _load_dict(self: "RestrictedUnpickler") -> None:
    items = self.pop_mark()
    if len(items) % 2:
        raise MalformedInput("DICT with an odd number of stack items")
    d: "dict[str, Any]" = {}
    self.append(d)
    for i in range(0, len(items), 2):
        check_key(d, items[i])
        d[items[i]] = items[i + 1]


def _no_sets(self: "RestrictedUnpickler") -> None:
    raise MalformedInput("sets are not allowed in a weight file (their items would hash predictably)")


def _load_bytearray8(self: "RestrictedUnpickler") -> None:
    # the stock loader allocates (and zero-fills) the claimed size before reading anything
    (n,) = struct.unpack("<Q", self.read(8))
    if n > self._size:
        raise MalformedInput(f"truncated pickle: BYTEARRAY8 claims {n} bytes, the file has {self._size}")
    buf = bytearray(n)
    self.readinto(buf)
    self.append(buf)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, restricted.

    Not the C one: its memo is an array that a 9-byte pickle (LONG_BINPUT 2**31) resizes to
    16 GiB and zero-fills. Here the memo is a dict, every opcode is counted, and BYTEARRAY8
    checks its length first. Speed is no issue: a weight file has a few dozen opcodes per tensor.
    """

    dispatch = {code: _counted(op) for code, op in pickle._Unpickler.dispatch.items()}  # type: ignore[attr-defined]
    dispatch[pickle.BYTEARRAY8[0]] = _counted(_load_bytearray8)
    dispatch[pickle.SETITEM[0]] = _counted(_load_setitem)
    dispatch[pickle.SETITEMS[0]] = _counted(_load_setitems)
    dispatch[pickle.DICT[0]] = _counted(_load_dict)
    for _op in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_op[0]] = _counted(_no_sets)

    allowed: "Dict[Tuple[str, str], Any]" = {}  # exact (module, name) -> stand-in; set by each format
    kind = "pickle"  # what the file is, for messages
    allowed_text = "nothing"  # what the allow-list admits, for messages

    def __init__(self, f: Any, size: int, path: str) -> None:
        super().__init__(BoundedFile(f, size))
        self._size, self._path, self._ops = size, path, 0

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            what = ascii(f"{module[:100]}.{name[:100]}")
            raise ConversionError(
                f"{self._path}: refusing to load global {what} (only {self.allowed_text} are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise ConversionError(f"{self._path}: persistent ids are not allowed in a {self.kind}")


def run_unpickler(unpickler: RestrictedUnpickler, where: str) -> Any:
    """`unpickler.load()`, every failure a ConversionError naming the file (MalformedInput too)."""
    kind = unpickler.kind
    try:
        return unpickler.load()
    except ConversionError:
        raise
    except MalformedInput as e:
        raise ConversionError(f"{where}: {e}") from e
    except RecursionError as e:
        raise ConversionError(f"{where}: not a {kind} (nested too deeply)") from e
    except MemoryError as e:
        raise ConversionError(f"{where}: not a {kind} (it needs more memory than is available)") from e
    except EOFError as e:
        raise ConversionError(f"{where}: truncated or empty pickle (no STOP opcode)") from e
    except Exception as e:  # UnpicklingError, KeyError, struct.error, ... from malformed data
        detail = ascii(str(e)[:200])[1:-1]  # may quote file bytes: escapes spelled out
        raise ConversionError(f"{where}: not a readable {kind} ({type(e).__name__}: {detail})") from e
