"""converters.mge_pickle against pickles written by real MegEngine 1.13 (tests/fixtures/mge/).

The fixtures come from tools/fixtures/make_mge_fixtures.py; outputs.npz holds MegEngine's own
outputs, which a float64 numpy BERT recomputed from the loaded weights must reproduce (that ties
the loader, the key names and the recorded numbers together without MegEngine installed).
"""
import collections
import importlib.util
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from converters.errors import ConversionError
from converters.mge_pickle import MgePickleReader, load_mge_pickle, save_mge_pickle

ROOT = pathlib.Path(__file__).resolve().parents[1]
MGE = ROOT / "tests" / "fixtures" / "mge"
DEMO = ROOT / "bert_port" / "demo_data"
CHECK_SCRIPT = ROOT / "tools" / "fixtures" / "check_mge_load.py"


def expected_shapes(config: dict, prefix: str = "") -> "dict[str, tuple]":
    """Key -> shape of MegEngine Models' BertModel (see shared/reference/megengine.md)."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,),
    }
    for layer in range(n):
        p = f"encoder.layer.{layer}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (i, h), (i,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, i), (h,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (h,), (h,)
    return {prefix + k: v for k, v in shapes.items()}


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((MGE / "bert_config.json").read_text())


@pytest.fixture(scope="module")
def hub() -> "dict[str, np.ndarray]":
    return load_mge_pickle(MGE / "hub_bert.pkl")


def check_state(state: dict, shapes: dict) -> None:
    assert set(state) == set(shapes)
    for key, shape in shapes.items():
        value = state[key]
        assert type(value) is np.ndarray and value.shape == shape and value.dtype == np.float32, key
        assert value.flags.writeable and value.flags.c_contiguous, key


# ----------------------------------------------------------------------------- the MegEngine files
def test_config_is_googles_layout(config):
    assert sorted(config) == sorted([
        "attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size", "initializer_range",
        "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
        "type_vocab_size", "vocab_size"])
    assert config["hidden_act"] == "gelu"


@pytest.mark.parametrize("name", ["hub_bert.pkl", "keep_var_bert.pkl", "hub_bert_proto5.pkl"])
def test_bert_pickles_have_the_39_bertmodel_keys(name, config):
    state = load_mge_pickle(MGE / name)
    assert len(state) == 39
    check_state(state, expected_shapes(config))


def test_pickles_use_the_formats_megengine_writes():
    """Guards the fixtures: protocol 4 hub, Parameter objects for keep_var, protocol 5 + _frombuffer."""
    hub, keep, proto5 = ((MGE / n).read_bytes() for n in ("hub_bert.pkl", "keep_var_bert.pkl", "hub_bert_proto5.pkl"))
    assert hub[:2] == b"\x80\x04" and b"megengine" not in hub and b"_reconstruct" in hub
    assert keep[:2] == b"\x80\x04" and b"megengine.tensor" in keep and b"Parameter" in keep
    assert proto5[:2] == b"\x80\x05" and b"numpy.core.numeric" in proto5 and b"_frombuffer" in proto5


def test_keep_var_and_protocol5_forms_equal_the_hub_form(hub):
    for name in ("keep_var_bert.pkl", "hub_bert_proto5.pkl"):
        other = load_mge_pickle(MGE / name)
        assert list(other) == list(hub)
        for key in hub:
            assert np.array_equal(other[key], hub[key]), (name, key)


def test_classifier_pickle_has_41_keys(config, hub):
    state = load_mge_pickle(MGE / "cls_bert.pkl")
    assert len(state) == 41
    shapes = expected_shapes(config, "bert.")
    shapes.update({"classifier.weight": (3, config["hidden_size"]), "classifier.bias": (3,)})
    check_state(state, shapes)
    for key in hub:  # the generator reuses the BertModel weights under bert.
        assert np.array_equal(state["bert." + key], hub[key])


def test_demo_tagger_pickle():
    config = json.loads((DEMO / "bert_config.json").read_text())
    state = load_mge_pickle(DEMO / "demo_tagger.pkl")
    shapes = expected_shapes(config, "bert.")
    shapes.update({"classifier.weight": (5, config["hidden_size"]), "classifier.bias": (5,)})
    check_state(state, shapes)
    assert len(state) == 5 + 16 * config["num_hidden_layers"] + 2 + 2


# ------------------------------------------------------- recorded MegEngine outputs vs a numpy BERT
def numpy_bert(w, c, ids, types, mask, gelu="tanh", eps=1e-12, prefix=""):
    w = {k[len(prefix):]: v.astype(np.float64) for k, v in w.items() if k.startswith(prefix)}
    from math import erf
    act = {"tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
           "erf": lambda x: 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))}[gelu]

    def ln(x, n):
        u = x.mean(-1, keepdims=True)
        return w[n + ".weight"] * (x - u) / np.sqrt(((x - u) ** 2).mean(-1, keepdims=True) + eps) + w[n + ".bias"]

    def lin(x, n):
        return x @ w[n + ".weight"].T + w[n + ".bias"]

    b, s = ids.shape
    a = c["num_attention_heads"]
    d = c["hidden_size"] // a
    x = ln(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s]
           + w["embeddings.token_type_embeddings.weight"][types], "embeddings.LayerNorm")
    add = (1.0 - mask)[:, None, None, :] * -10000.0
    layers = []
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).reshape(b, s, a, d).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + add
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(0, 2, 1, 3).reshape(b, s, a * d)
        att = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        x = ln(lin(act(lin(att, p + "intermediate.dense")), p + "output.dense") + att, p + "output.LayerNorm")
        layers.append(x)
    return layers, np.tanh(lin(x[:, 0], "pooler.dense"))


@pytest.fixture(scope="module")
def recorded() -> dict:
    with np.load(MGE / "outputs.npz") as f:
        return dict(f)


def test_outputs_npz_layout(recorded, config):
    ids, types, mask = recorded["input_ids"], recorded["token_type_ids"], recorded["attention_mask"]
    assert ids.dtype == np.int32 and types.dtype == np.int32 and mask.dtype == np.float32
    assert ids.shape[0] >= 2 and ids.shape == types.shape == mask.shape
    assert (mask == 0).any() and (mask.sum(1) == mask.shape[1]).any()  # padding, and a full row
    n = int(recorded["num_layers"])
    assert n == config["num_hidden_layers"]
    for i in range(n):
        assert recorded[f"encoded_layer_{i}"].shape == ids.shape + (config["hidden_size"],)
    assert recorded["pooled_output"].shape == (ids.shape[0], config["hidden_size"])
    assert recorded["cls_logits"].shape == (ids.shape[0], 3)


def _max_diff(hub, config, recorded, **kw):
    layers, pooled = numpy_bert(hub, config, recorded["input_ids"], recorded["token_type_ids"],
                                recorded["attention_mask"].astype(np.float64), **kw)
    mine = layers + [pooled]
    theirs = [recorded[f"encoded_layer_{i}"] for i in range(len(layers))] + [recorded["pooled_output"]]
    return max(float(np.abs(a - b).max()) for a, b in zip(mine, theirs))


def test_loaded_weights_reproduce_megengine_outputs(hub, config, recorded):
    assert _max_diff(hub, config, recorded) < 1e-4


def test_classifier_logits_reproduce_megengine(config, recorded):
    state = load_mge_pickle(MGE / "cls_bert.pkl")
    _, pooled = numpy_bert(state, config, recorded["input_ids"], recorded["token_type_ids"],
                           recorded["attention_mask"].astype(np.float64), prefix="bert.")
    logits = pooled @ state["classifier.weight"].T.astype(np.float64) + state["classifier.bias"]
    np.testing.assert_allclose(logits, recorded["cls_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mistake, kw", [("erf GELU", dict(gelu="erf")), ("LayerNorm eps 1e-5", dict(eps=1e-5))])
def test_fixtures_expose_wrong_math(hub, config, recorded, mistake, kw):
    """The fixtures are only useful if a port with the wrong GELU or eps fails against them."""
    assert _max_diff(hub, config, recorded, **kw) > 1e-3, mistake


def test_demo_reference_matches_weights_and_vocab():
    config = json.loads((DEMO / "bert_config.json").read_text())
    ref = json.loads((DEMO / "reference.json").read_text(encoding="utf-8"))
    vocab = (DEMO / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == config["vocab_size"]
    assert [vocab[i] for i in ref["input_ids"]] == ref["tokens"]
    assert ref["tokens"][0] == "[CLS]" and ref["tokens"][-1] == "[SEP]" and "[UNK]" not in ref["tokens"]
    assert any(t.startswith("##") for t in ref["tokens"])
    state = load_mge_pickle(DEMO / "demo_tagger.pkl")
    ids = np.array([ref["input_ids"]])
    layers, _ = numpy_bert(state, config, ids, np.zeros_like(ids), np.ones(ids.shape), prefix="bert.")
    logits = layers[-1][0] @ state["classifier.weight"].T.astype(np.float64) + state["classifier.bias"]
    np.testing.assert_allclose(logits, np.array(ref["logits"]), atol=1e-4, rtol=0)


def test_demo_tokens_match_pytorch_pretrained_bert_tokenizer():
    tokenization = pytest.importorskip("pytorch_pretrained_bert.tokenization")
    ref = json.loads((DEMO / "reference.json").read_text(encoding="utf-8"))
    tok = tokenization.BertTokenizer(str(DEMO / "vocab.txt"), do_lower_case=True)
    tokens = ["[CLS]"] + tok.tokenize(ref["sentence"]) + ["[SEP]"]
    assert tokens == ref["tokens"]
    assert tok.convert_tokens_to_ids(tokens) == ref["input_ids"]


# ---------------------------------------------------------------------------- protocols and saving
def _sample() -> "collections.OrderedDict[str, np.ndarray]":
    rng = np.random.default_rng(0)
    return collections.OrderedDict([
        ("a.weight", rng.standard_normal((3, 4)).astype(np.float32)),
        ("a.bias", rng.standard_normal(4).astype(np.float32)),
        ("scalar", np.array(1.5, np.float32)),
        ("empty", np.zeros((0, 3), np.float32)),
        ("fortran", np.asfortranarray(rng.standard_normal((5, 2)).astype(np.float32))),
        ("big_endian", rng.standard_normal(6).astype(">f4")),
        ("f16", rng.standard_normal(3).astype(np.float16)),
        ("f64", rng.standard_normal(3)),
        ("ids", np.arange(5, dtype=np.int32)),
    ])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_protocols_round_trip(tmp_path, protocol, hub):
    for name, state in (("sample", _sample()), ("hub", hub)):
        path = tmp_path / f"{name}{protocol}.pkl"
        path.write_bytes(pickle.dumps(state, protocol=protocol))
        loaded = load_mge_pickle(path)
        assert list(loaded) == list(state)
        for key, value in state.items():
            got = loaded[key]
            assert got.dtype == value.dtype.newbyteorder("=") and got.shape == value.shape, key
            assert np.array_equal(got, value), key
            assert got.flags.writeable and got.flags.c_contiguous and got.dtype.isnative, key


def test_plain_dict_is_accepted(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": np.ones((2, 2), np.float32)}, protocol=4))
    assert np.array_equal(load_mge_pickle(path)["w"], np.ones((2, 2), np.float32))


def test_save_load_round_trip_is_bit_exact(tmp_path, hub):
    path = tmp_path / "out.pkl"
    save_mge_pickle(hub, path)
    loaded = load_mge_pickle(path)
    assert list(loaded) == list(hub)
    for key in hub:
        assert loaded[key].tobytes() == hub[key].tobytes() and loaded[key].shape == hub[key].shape
    data = path.read_bytes()
    assert data[:2] == b"\x80\x04" and b"numpy.core.multiarray\n_reconstruct" in data
    assert pickle.loads(data).__class__ is collections.OrderedDict  # stock pickle reads it too
    assert os.listdir(tmp_path) == ["out.pkl"]  # no temp file left


def test_save_converts_to_float32_c_contiguous(tmp_path):
    path = tmp_path / "conv.pkl"
    save_mge_pickle({"x": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "y": [1, 2]}, path)
    loaded = load_mge_pickle(path)
    assert loaded["x"].dtype == np.float32 and np.array_equal(loaded["x"], np.arange(6.0).reshape(2, 3))
    assert np.array_equal(loaded["y"], np.array([1.0, 2.0], np.float32))


def test_save_is_atomic_on_error(tmp_path, hub):
    path = tmp_path / "keep.pkl"
    save_mge_pickle(hub, path)
    before = path.read_bytes()
    with pytest.raises(ConversionError, match="keep.pkl"):
        save_mge_pickle({"ok": np.ones(2), 3: np.ones(2)}, path)
    with pytest.raises(ConversionError, match="keep.pkl"):
        save_mge_pickle({"bad": object()}, path)
    with pytest.raises(ConversionError, match="keep.pkl"):
        save_mge_pickle({"bad\udc80key": np.ones(2)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["keep.pkl"]


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(ConversionError, match="no/such/dir/x.pkl"):
        save_mge_pickle({"w": np.ones(2)}, tmp_path / "no" / "such" / "dir" / "x.pkl")


# ------------------------------------------------------------------------------------- bad inputs
def _bad(tmp_path, name: str, data: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("cut", [0, 1, 2, 100, 5000, -2, -1])
def test_truncated_pickle(tmp_path, cut):
    data = (MGE / "hub_bert.pkl").read_bytes()
    path = _bad(tmp_path, "cut.pkl", data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(ConversionError, match="cut.pkl"):
        load_mge_pickle(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConversionError, match="nope.pkl"):
        load_mge_pickle(tmp_path / "nope.pkl")


def test_directory(tmp_path):
    with pytest.raises(ConversionError, match=str(tmp_path.name)):
        load_mge_pickle(tmp_path)


@pytest.mark.parametrize("name, data, message", [
    ("text.pkl", b"hello world, this is a text file\n", "text.pkl"),
    ("json.pkl", b'{"a": [1, 2, 3]}\n', "json.pkl"),
    ("list.pkl", pickle.dumps([np.ones(2, np.float32)], protocol=4), "list.pkl: expected a dict"),
    ("ints.pkl", pickle.dumps({"a": 1, "b": 2}, protocol=4), "ints.pkl: value of 'a' is int"),
    ("keys.pkl", pickle.dumps({1: np.ones(2, np.float32)}, protocol=4), "keys.pkl: state-dict key of type int"),
    ("none.pkl", pickle.dumps(None, protocol=2), "none.pkl: expected a dict"),
    ("obj.pkl", pickle.dumps({"o": np.array([1, "x"], dtype=object)}, protocol=4), "obj.pkl: unsupported numpy dtype"),
    ("cplx.pkl", pickle.dumps({"c": np.ones(2, np.complex64)}, protocol=4), "cplx.pkl: unsupported numpy dtype"),
    ("rec.pkl", pickle.dumps({"r": np.zeros(2, "i4,f4")}, protocol=4), "rec.pkl"),
])
def test_not_a_state_dict(tmp_path, name, data, message):
    with pytest.raises(ConversionError, match=message):
        load_mge_pickle(_bad(tmp_path, name, data))


@pytest.mark.parametrize("opcode", [b"\x8e", b"\x8d", b"\x96"])  # BINBYTES8, BINUNICODE8, BYTEARRAY8
def test_a_terabyte_length_claim_is_refused_before_any_allocation(tmp_path, opcode):
    """2**40 claimed bytes in a 27-byte file: refused as truncated, in a child whose address space
    is capped 1 GiB above its size (below the claim, below free RAM), so allocating first would
    end in MemoryError ("needs more memory") instead of the truncation message."""
    from tests.security.child import expect, run_limited

    path = _bad(tmp_path, "claim.pkl", b"\x80\x04" + opcode + struct.pack("<Q", 2 ** 40) + b"\x00" * 16)
    r = run_limited(f"load_mge_pickle({str(path)!r})", setup="from converters.mge_pickle import load_mge_pickle",
                    wall=5, as_extra=1 << 30)
    expect(r, "ConversionError", peak_mb=64, match="claim.pkl: truncated pickle")
    assert str(2 ** 40) in r["message"] and "memory" not in r["message"], r["message"]


def test_conversion_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_mge_pickle(tmp_path / "missing.pkl")


# --------------------------------------------------------------------------- live: real MegEngine
def _mge_python() -> str:
    if importlib.util.find_spec("megengine") is not None:
        return sys.executable
    candidate = os.environ.get("BERT_PORT_MGE_PYTHON", "")
    if candidate:
        ok = subprocess.run([candidate, "-c", "import megengine"], capture_output=True, timeout=300)
        if ok.returncode == 0:
            return candidate
    pytest.skip("megengine not importable; set BERT_PORT_MGE_PYTHON to a python that has it")


@pytest.mark.live
@pytest.mark.parametrize("model, source, num_labels, keys", [
    ("bert", "hub_bert.pkl", 0, ["encoded_layer_0", "encoded_layer_1", "pooled_output"]),
    ("cls", "cls_bert.pkl", 3, ["logits"]),
])
def test_megengine_loads_what_we_save(tmp_path, recorded, model, source, num_labels, keys):
    """save_mge_pickle output -> megengine.load + load_state_dict(strict=True) -> same outputs."""
    python = _mge_python()
    saved = tmp_path / "saved.pkl"
    save_mge_pickle(load_mge_pickle(MGE / source), saved)
    out = tmp_path / "out.npz"
    proc = subprocess.run(
        [python, str(CHECK_SCRIPT), str(saved), str(MGE / "bert_config.json"), "--model", model,
         "--num-labels", str(num_labels), "--inputs", str(MGE / "outputs.npz"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "strict=True" in proc.stdout
    with np.load(out) as got:
        for key in keys:
            want = recorded["cls_logits"] if key == "logits" else recorded[key]
            # recorded by Models' model.py; check_mge_load runs the in-repo mirror of it unless
            # $BERT_PORT_MGE_MODELS_DIR names a Models checkout (the generator keeps them within 1e-6)
            np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-6)


def test_variants_megengine_writes_read_as_megengine_reads_them():
    """Recorded: megengine.save of one array under two names (memo), a transposed array, a big-endian
    array, one Parameter under two names, float16, int64 (tools/fixtures/make_mge_variants.py); the
    oracle is megengine.load's own output, recorded beside it."""
    folder = ROOT / "tests" / "fixtures" / "mge_variants"
    ref = np.load(folder / "variants_ref.npz")
    got = load_mge_pickle(folder / "variants.pkl")
    assert sorted(got) == sorted(ref.files)
    for key in ref.files:
        assert got[key].dtype == ref[key].dtype.newbyteorder("=") and np.array_equal(got[key], ref[key]), key
        assert got[key].flags.c_contiguous and got[key].flags.writeable
    with MgePickleReader(folder / "variants.pkl") as reader:
        assert reader.shape_dtype("t") == ((4, 3), "float32")
        assert np.array_equal(reader.read("be"), ref["be"])
