"""The torch/safetensors reader and `converters.weights` read every container variant to the numbers
the reference reader gives (`torch.load(weights_only=True)`, safetensors' own loader), or refuse it
with one ConversionError naming the file. Oracles are the reference libraries, never our code.

Variants: torch zip (stored records), the same zip re-packed with deflated records (which the
mmap path once read as compressed bytes: a silent wrong value), legacy non-zip serialization,
big-endian zip (byteorder record "big"), safetensors; views with offsets and strides, transposes,
expanded (stride 0) tensors, shared storages, fp16/bf16/int64/bool, empty and 0-d tensors.
"""
from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from converters import ConversionError  # noqa: E402
from converters.mge_pickle import MgePickleReader  # noqa: E402
from converters.reader import CheckpointReader  # noqa: E402
from converters.tf_checkpoint import TFCheckpointReader  # noqa: E402
from converters.torch_checkpoint import TorchCheckpointReader  # noqa: E402
from converters.weights import load_weights  # noqa: E402
from tests.security.child import MiB, expect, run_limited  # noqa: E402
from tests.security.test_hostile_pickles import call, glob, integer, text, tup  # noqa: E402

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"
MGE, TF = FIXTURES / "mge", FIXTURES / "tf"


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {"view": base[1:4, 2:7], "t": base.t(), "same": base, "half": torch.randn(3, 5, generator=g).half(),
            "bf": torch.randn(4, 3, generator=g).bfloat16(), "i64": torch.arange(10) - 3,
            "exp": torch.randn(3, 1, generator=g).expand(3, 4), "empty": torch.zeros(0, 3),
            "b": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "i8": torch.tensor([-1, 2], dtype=torch.int8)}


def repack(src, dst, compression=zipfile.ZIP_DEFLATED, edit=lambda name, data: data) -> None:
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", compression) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, edit(info.filename, zi.read(info)))


def big_endian(src, dst) -> None:
    """What torch.save writes on a big-endian host: byteorder "big", storages byte-swapped."""
    def edit(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name and not name.endswith(".pkl"):
            return np.frombuffer(data, "<f4").astype(">f4").tobytes()
        return data
    repack(src, dst, zipfile.ZIP_STORED, edit)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    sd = state()
    torch.save(sd, d / "zip.bin")
    repack(d / "zip.bin", d / "deflated.bin")
    torch.save(sd, d / "legacy.bin", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items() if k != "same"}, str(d / "model.safetensors"))
    floats = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    floats["c"] = floats["a"][1:, ::2]
    torch.save(floats, d / "little.bin")
    big_endian(d / "little.bin", d / "big.bin")
    return d


def reference(path):
    return load_file(str(path)) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)


VARIANTS = ["zip.bin", "deflated.bin", "legacy.bin", "model.safetensors", "big.bin"]


@pytest.mark.parametrize("name", VARIANTS)
def test_reader_reads_what_the_reference_reads(variants, name):
    ref = reference(variants / name)
    with TorchCheckpointReader(variants / name) as reader:
        assert isinstance(reader, CheckpointReader)
        assert sorted(reader.names()) == sorted(ref)
        for key, want in ref.items():
            shape, dtype = reader.shape_dtype(key)
            assert shape == tuple(want.shape) and dtype == str(want.dtype).split(".")[1], key
            got = reader.read(key)
            expected = want.float().numpy() if want.dtype == torch.bfloat16 else want.numpy()
            assert got.dtype == expected.dtype and np.array_equal(got, expected), (name, key)
            assert got.flags.c_contiguous and got.flags.writeable and got.dtype.isnative


@pytest.mark.parametrize("name", VARIANTS)
def test_load_weights_reads_what_the_reference_reads(variants, name):
    ref, ours = reference(variants / name), load_weights(variants / name)
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), (name, key)


def test_the_big_endian_variant_really_differs_in_bytes(variants):
    """Guards the oracle: the swapped file is not byte-identical data the little path would also read."""
    assert (variants / "big.bin").read_bytes() != (variants / "little.bin").read_bytes()
    for key, want in torch.load(variants / "little.bin", weights_only=True).items():
        assert torch.equal(reference(variants / "big.bin")[key], want)


def test_every_reader_implements_the_interface(variants):
    for reader in (TorchCheckpointReader(variants / "zip.bin"), MgePickleReader(MGE / "hub_bert.pkl"),
                   TFCheckpointReader(TF / "tf1/bert_model.ckpt")):
        with reader:
            assert isinstance(reader, CheckpointReader)
            name = reader.names()[0]
            shape, _ = reader.shape_dtype(name)
            assert reader.read(name).shape == shape


# ------------------------------------------------------------------------------ refused variants
def torch_zip(path, pickle_body: bytes, storages: dict, prefix="a") -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", b"\x80\x02" + pickle_body + b".")
        z.writestr(f"{prefix}/byteorder", b"little")
        z.writestr(f"{prefix}/version", b"3\n")
        for key, data in storages.items():
            z.writestr(f"{prefix}/data/{key}", data)


def number(value: int) -> bytes:
    return integer(value) if value < 1 << 31 else b"\x8a\x08" + value.to_bytes(8, "little", signed=True)  # LONG1


def tensor_op(key: str, numel: int, offset: int, size, stride, storage="FloatStorage") -> bytes:
    pid = tup(text("storage"), glob("torch", storage), text(key), text("cpu"), number(numel)) + b"Q"
    return call(glob("torch._utils", "_rebuild_tensor_v2"), pid, number(offset), tup(*map(number, size)),
                tup(*map(number, stride)), b"\x89", call(glob("collections", "OrderedDict")))


def one_tensor(op: bytes) -> bytes:
    return b"}" + text("w") + op + b"s"


def test_a_crafted_zip_that_torch_reads_is_read_the_same(tmp_path):
    """Our hand-built archive is a real torch file: the reference agrees with it (guards the helpers)."""
    data = np.arange(6, dtype="<f4").tobytes()
    torch_zip(tmp_path / "ok.bin", one_tensor(tensor_op("0", 6, 1, (2, 2), (1, 2))), {"0": data})
    want = torch.load(tmp_path / "ok.bin", weights_only=True)["w"]
    assert np.array_equal(TorchCheckpointReader(tmp_path / "ok.bin").read("w"), want.numpy())


@pytest.mark.parametrize("case,match", [
    ((6, 5, (2,), (1,)), "runs past its storage"),  # the view ends beyond the storage
    ((6, 0, (3,), (3,)), "runs past its storage"),
    ((7, 0, (2,), (1,)), "no record of that size"),  # the storage claims more than its record holds
    ((1 << 40, 0, (1 << 40,), (1,)), "no record of that size"),  # a shape no bytes back
])
def test_views_and_storages_no_bytes_back_are_refused(tmp_path, case, match):
    numel, offset, size, stride = case
    torch_zip(tmp_path / "bad.bin", one_tensor(tensor_op("0", numel, offset, size, stride)),
              {"0": np.zeros(6, "<f4").tobytes()})
    with pytest.raises(ConversionError, match=match):
        TorchCheckpointReader(tmp_path / "bad.bin").read("w")


def test_a_huge_expanded_view_is_refused_before_allocation(tmp_path):
    """Stride 0 lets 4 bytes stand for 2**40 elements: refused by the budget, never np.empty'd."""
    torch_zip(tmp_path / "exp.bin", one_tensor(tensor_op("0", 1, 0, (1 << 20, 1 << 20), (0, 0))),
              {"0": b"\0\0\0\0"})
    r = run_limited(f"TorchCheckpointReader({str(tmp_path / 'exp.bin')!r}).read('w')",
                    setup="from converters.torch_checkpoint import TorchCheckpointReader", wall=5)
    expect(r, "ConversionError", peak_mb=64, match="justif")


def test_one_storage_behind_many_tensors_is_charged_per_read(tmp_path):
    """1 MiB storage, 2000 names viewing all of it: the 2 GB of copies are refused, bounded."""
    n = MiB // 4
    op = tensor_op("0", n, 0, (n,), (1,))
    body = b"}(" + text("t0") + op + b"q\x09" + b"".join(text(f"t{i}") + b"h\x09" for i in range(1, 2000)) + b"u"
    torch_zip(tmp_path / "shared.bin", body, {"0": bytes(MiB)})
    code = f"r = TorchCheckpointReader({str(tmp_path / 'shared.bin')!r})\nfor k in r.names(): r.read(k)\n"
    r = run_limited(code, setup="from converters.torch_checkpoint import TorchCheckpointReader", wall=10)
    expect(r, "ConversionError", peak_mb=160, match="justif")


@pytest.mark.parametrize("global_", [("os", "system"), ("builtins", "eval"), ("torch", "load"),
                                     ("torch._utils", "_rebuild_sparse_tensor")])
def test_globals_outside_the_allow_list_are_refused(tmp_path, global_):
    torch_zip(tmp_path / "evil.bin", one_tensor(call(glob(*global_), text("x"))), {})
    with pytest.raises(ConversionError, match="refusing to load global"):
        TorchCheckpointReader(tmp_path / "evil.bin")


def test_other_compressions_and_tar_archives_are_refused(tmp_path, variants):
    repack(variants / "zip.bin", tmp_path / "bz.bin", zipfile.ZIP_BZIP2)
    with pytest.raises(ConversionError, match="compressed with method 12"):
        TorchCheckpointReader(tmp_path / "bz.bin")
    tar = bytearray(1024)
    tar[257:262] = b"ustar"
    (tmp_path / "old.tar").write_bytes(bytes(tar))
    with pytest.raises(ConversionError, match="tar archive"):
        TorchCheckpointReader(tmp_path / "old.tar")


def test_a_corrupt_deflated_record_is_refused_not_misread(tmp_path, variants):
    data = bytearray((variants / "deflated.bin").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo(next(n for n in z.namelist() if n.endswith("/data/0")))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 2
    data[start] ^= 0xFF
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(ConversionError):
        r = TorchCheckpointReader(tmp_path / "bad.bin")
        for k in r.names():
            r.read(k)


def test_safetensors_headers_that_do_not_tile_the_data_are_refused(tmp_path):
    def write(header: bytes, data: bytes) -> object:
        path = tmp_path / "m.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path
    gap = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    with pytest.raises(ConversionError, match="do not tile"):
        TorchCheckpointReader(write(gap, bytes(8)))
    twice = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(ConversionError, match="twice"):
        TorchCheckpointReader(write(twice, bytes(4)))
    huge = b'{"a":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4]}}'
    with pytest.raises(ConversionError, match="do not tile"):
        TorchCheckpointReader(write(huge, bytes(4)))


@pytest.mark.parametrize("name", VARIANTS)
def test_mutated_files_end_in_a_conversion_error_or_a_clean_read(tmp_path, variants, name):
    """Bytes flipped, cut or inserted anywhere: a ConversionError, never another exception type."""
    import random

    rng = random.Random(name)
    original = (variants / name).read_bytes()
    for _ in range(60):
        data = bytearray(original)
        p = rng.randrange(len(data))
        if rng.random() < 0.6:
            data[p] = rng.randrange(256)
        else:
            del data[p:p + rng.randint(1, 16)]
        (tmp_path / "m.bin").write_bytes(bytes(data))
        try:
            with TorchCheckpointReader(tmp_path / "m.bin") as reader:
                for key in reader.names():
                    reader.read(key)
        except ConversionError as e:
            assert "\n" not in str(e) and str(e).isascii(), str(e)


def test_ambiguous_zips_are_refused(tmp_path, variants):
    """Archives two zip readers may read differently: a record name twice, bytes before the archive."""
    import warnings

    with zipfile.ZipFile(variants / "zip.bin") as zi, zipfile.ZipFile(tmp_path / "dup.bin", "w") as zo:
        infos = zi.infolist()
        for info in infos:
            zo.writestr(info.filename, zi.read(info))
        storage = next(i for i in infos if "/data/" in i.filename)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            zo.writestr(storage.filename, bytes(storage.file_size))
    (tmp_path / "prefixed.bin").write_bytes(b"PK\x03\x04" + bytes(60) + (variants / "zip.bin").read_bytes())
    for name in ("dup.bin", "prefixed.bin"):
        with pytest.raises(ConversionError):
            TorchCheckpointReader(tmp_path / name)
