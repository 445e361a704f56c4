"""Converters against outputs recorded by the real frameworks (fixtures made by tools/fixtures/)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bert_port as bp
from converters.convert import mge_to_torch, tf_to_torch, torch_to_mge, torch_to_tf
from tests.conftest import FIXTURES, ROOT

TF = FIXTURES / "tf"
MGE = FIXTURES / "mge"
HIDDEN_TOL, MLM_TOL = 1e-5, 3e-5


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def assert_close(ours, ref, mask=None, tol=HIDDEN_TOL):
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32)
    diff = (ours - ref) if mask is None else (ours - ref)[mask]
    worst = diff.abs().max().item()
    assert worst < tol, f"max abs diff {worst:.3g} >= {tol}"
    return worst


# --- TensorFlow -------------------------------------------------------------------------------

def tf_inputs():
    rec = np.load(TF / "outputs.npz")
    ids, types, mask = (torch.as_tensor(rec[k]).long() for k in ("input_ids", "token_type_ids", "input_mask"))
    return rec, ids, types, mask


@pytest.mark.parametrize("prefix", ["tf1/bert_model.ckpt", "tf2/ckpt-1"])
def test_tf_checkpoint_reproduces_tensorflow(tmp_path, prefix):
    summary = tf_to_torch(TF / prefix, TF / "bert_config.json", tmp_path / "out")
    assert summary["architecture"] == "BertForPreTraining" and not summary["unknown"]
    model = bp.BertForPreTraining.from_pretrained(tmp_path / "out").eval()
    rec, ids, types, mask = tf_inputs()
    with torch.no_grad():
        layers, pooled = model.bert(ids, types, mask)
        mlm, nsp = model(ids, types, mask)
    for i, layer in enumerate(layers):  # every position, padding included
        assert_close(layer, rec[f"encoder_layer_{i}"])
    assert_close(pooled, rec["pooled_output"])
    assert_close(nsp, rec["nsp_logits"])
    assert_close(mlm, rec["mlm_logits"], tol=MLM_TOL)


def test_tf1_optimizer_slots_are_skipped_and_counted(tmp_path):
    summary = tf_to_torch(TF / "tf1/bert_model.ckpt", TF / "bert_config.json", tmp_path / "out")
    # 46 weights, each with adam_m and adam_v, plus global_step
    assert summary["tensors_converted"] == 46 and summary["skipped"] == 2 * 46 + 1


def test_tf2_encoder_naming(tmp_path):
    tf_to_torch(TF / "tf2_encoder/ckpt-1", TF / "bert_config.json", tmp_path / "out")
    model = bp.BertModel.from_pretrained(tmp_path / "out").eval()
    rec, ids, types, mask = tf_inputs()
    with torch.no_grad():
        layers, pooled = model(ids, types, mask)
    for i, layer in enumerate(layers):
        assert_close(layer, rec[f"encoder_layer_{i}"])
    assert_close(pooled, rec["pooled_output"])


def test_exact_gelu_is_opt_in_and_visible(tmp_path):
    tf_to_torch(TF / "tf1/bert_model.ckpt", TF / "bert_config.json", tmp_path / "erf", gelu="erf")
    assert json.loads((tmp_path / "erf/config.json").read_text())["hidden_act"] == "gelu"
    model = bp.BertModel.from_pretrained(tmp_path / "erf").eval()
    rec, ids, types, mask = tf_inputs()
    with torch.no_grad():
        last = model(ids, types, mask, False)[0]
    worst = (last - torch.as_tensor(rec["sequence_output"]))[mask.bool()].abs().max()
    assert worst > 30 * HIDDEN_TOL  # exact GELU does NOT reproduce Google's tanh GELU


def test_converted_tf_directory_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tf_to_torch(TF / "tf1/bert_model.ckpt", TF / "bert_config.json", tmp_path / "out")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "out").eval()
    rec, ids, types, mask = tf_inputs()
    with torch.no_grad():
        out = hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    assert_close(out.seq_relationship_logits, rec["nsp_logits"])
    assert_close(out.prediction_logits, rec["mlm_logits"], mask.bool(), MLM_TOL)


def test_torch_tf_torch_round_trip_is_bit_exact(tmp_path):
    tf_to_torch(TF / "tf1/bert_model.ckpt", TF / "bert_config.json", tmp_path / "a")
    torch_to_tf(tmp_path / "a", tmp_path / "tf/bert_model.ckpt")
    tf_to_torch(tmp_path / "tf/bert_model.ckpt", TF / "bert_config.json", tmp_path / "b")
    a = bp.io.load_weights(tmp_path / "a/model.safetensors")
    b = bp.io.load_weights(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- MegEngine --------------------------------------------------------------------------------

def mge_inputs():
    rec = np.load(MGE / "outputs.npz")
    ids, types = (torch.as_tensor(rec[k]).long() for k in ("input_ids", "token_type_ids"))
    return rec, ids, types, torch.as_tensor(rec["attention_mask"]).float()


@pytest.mark.parametrize("pkl", ["hub_bert.pkl", "keep_var_bert.pkl", "hub_bert_proto5.pkl"])
def test_mge_hub_pickle_reproduces_megengine(tmp_path, pkl):
    if not (MGE / pkl).exists():
        pytest.skip(f"{pkl} not generated")
    summary = mge_to_torch(MGE / pkl, MGE / "bert_config.json", tmp_path / "out")
    assert summary["architecture"] == "BertModel" and summary["tensors_converted"] == 39
    model = bp.BertModel.from_pretrained(tmp_path / "out").eval()
    rec, ids, types, mask = mge_inputs()
    with torch.no_grad():
        layers, pooled = model(ids, types, mask)
    for i, layer in enumerate(layers):  # every position, padding included
        assert_close(layer, rec[f"encoded_layer_{i}"])
    assert_close(pooled, rec["pooled_output"])


def test_mge_classifier_reproduces_megengine(tmp_path):
    summary = mge_to_torch(MGE / "cls_bert.pkl", MGE / "bert_config.json", tmp_path / "out")
    assert summary["architecture"] == "BertForSequenceClassification"
    model = bp.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert model.num_labels == 3
    rec, ids, types, mask = mge_inputs()
    with torch.no_grad():
        assert_close(model(ids, types, mask), rec["cls_logits"])


def test_torch_mge_torch_round_trip_is_bit_exact(tmp_path):
    mge_to_torch(MGE / "cls_bert.pkl", MGE / "bert_config.json", tmp_path / "a")
    torch_to_mge(tmp_path / "a", tmp_path / "back.pkl")
    mge_to_torch(tmp_path / "back.pkl", MGE / "bert_config.json", tmp_path / "b")
    a = bp.io.load_weights(tmp_path / "a/model.safetensors")
    b = bp.io.load_weights(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_form_export_has_models_keys(tmp_path):
    from converters.mge_pickle import load_mge_pickle

    mge_to_torch(MGE / "hub_bert.pkl", MGE / "bert_config.json", tmp_path / "a")
    torch_to_mge(tmp_path / "a", tmp_path / "hub.pkl")
    ours, theirs = load_mge_pickle(tmp_path / "hub.pkl"), load_mge_pickle(MGE / "hub_bert.pkl")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == np.float32 for k in ours)


# --- live: the real frameworks read and run what we export: tests/test_live.py ---------------------


# --- bad input: one line naming the file, non-zero exit, no traceback, nothing written --------

def copy_checkpoint(tmp_path, src_prefix, name="ckpt"):
    out = tmp_path / "bad"
    out.mkdir()
    for f in src_prefix.parent.iterdir():
        if f.name.startswith(src_prefix.name):
            (out / f.name.replace(src_prefix.name, name)).write_bytes(f.read_bytes())
    return out / name


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at(len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


BAD_TF = {
    "truncated index": (lambda p: _truncate(p.with_name(p.name + ".index"), lambda n: n - 30), ".index"),
    "truncated data": (lambda p: _truncate(p.with_name(p.name + ".data-00000-of-00001"), lambda n: n // 2), ".data-00000-of-00001"),
    "flipped data byte": (lambda p: _flip(p.with_name(p.name + ".data-00000-of-00001"), lambda n: n // 3), "crc"),
    "flipped index byte": (lambda p: _flip(p.with_name(p.name + ".index"), lambda n: n // 2), ".index"),
    "missing shard": (lambda p: p.with_name(p.name + ".data-00000-of-00001").unlink(), ".data-00000-of-00001"),
    "not a TF index": (lambda p: p.with_name(p.name + ".index").write_bytes(b"PK\x03\x04" + b"\x00" * 200), ".index"),
}


@pytest.mark.parametrize("case", sorted(BAD_TF))
def test_bad_tf_checkpoints_fail_cleanly(tmp_path, case):
    damage, expect = BAD_TF[case]
    prefix = copy_checkpoint(tmp_path, TF / "tf1/bert_model.ckpt")
    damage(prefix)
    r = run_cli("converters.tf2torch", prefix, "--config", TF / "bert_config.json", "--out", tmp_path / "out")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "ckpt" in r.stderr and (expect in r.stderr or expect == "crc" and "crc" in r.stderr.lower()), r.stderr
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_config_shape_mismatch_names_key_and_both_shapes(tmp_path):
    cfg = json.loads((TF / "bert_config.json").read_text())
    cfg["intermediate_size"] += 1
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = run_cli("converters.tf2torch", TF / "tf1/bert_model.ckpt", "--config", tmp_path / "cfg.json", "--out", tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    n = cfg["intermediate_size"]
    assert f"intermediate.dense.weight has shape ({n - 1}, 24)" in r.stderr and f"({n}, 24)" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    args = ("converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json", "--out", tmp_path / "out")
    r = run_cli(*args)
    assert r.returncode == 1 and "already exists" in r.stderr and (tmp_path / "out/keep.txt").exists()
    # --force replaces converter outputs only: a foreign file makes it refuse, and nothing is deleted
    r = run_cli(*args, "--force")
    assert r.returncode == 1 and "'keep.txt'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "out/keep.txt").read_text() == "mine"
    (tmp_path / "out/keep.txt").unlink()
    (tmp_path / "out/config.json").write_text("{}")  # a previous conversion's output is replaced
    r = run_cli(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert "39 converted" in r.stdout


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.sentinel}",))


@pytest.mark.parametrize("payload", ["os.system", "wrong structure"])
def test_bad_pickles_fail_cleanly(tmp_path, payload):
    import pickle

    _Evil.sentinel = tmp_path / "pwned"
    obj = {"embeddings.word_embeddings.weight": _Evil()} if payload == "os.system" else [1, 2, 3]
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(obj, protocol=4))
    r = run_cli("converters.mge2torch", tmp_path / "bad.pkl", "--config", MGE / "bert_config.json", "--out", tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "bad.pkl" in r.stderr, r.stderr
    assert not _Evil.sentinel.exists() and not (tmp_path / "out").exists()


def test_usage_errors_exit_2_and_help_explains_gelu():
    assert run_cli("converters.tf2torch").returncode == 2
    help_text = run_cli("converters.mge2torch", "--help").stdout
    assert "gelu_new" in help_text and "tanh" in help_text
    for module in ("converters.torch2mge", "converters.torch2tf"):
        assert run_cli(module, "--help").returncode == 0


@pytest.mark.parametrize("architecture", ["BertModel", "BertForPreTraining", "BertForMaskedLM",
                                          "BertForNextSentencePrediction", "BertForSequenceClassification",
                                          "BertForQuestionAnswering"])
def test_shape_table_matches_the_models(architecture):
    from converters.mapping import canonical_shapes
    from bert_port.pretrained import TIED_KEYS
    from tests.conftest import TINY

    config = bp.BertConfig(**TINY)
    with torch.device("meta"):
        model = getattr(bp, architecture)(config, 5) if architecture == "BertForSequenceClassification" \
            else getattr(bp, architecture)(config)
    real = {("bert." + k if architecture == "BertModel" else k): tuple(v.shape)
            for k, v in model.state_dict().items() if k not in TIED_KEYS}
    assert canonical_shapes(config, architecture, 5) == real


def test_converting_needs_no_torch(tmp_path):
    code = ("import sys; from converters.tf2torch import convert; "
            f"convert({str(TF / 'tf1/bert_model.ckpt')!r}, {str(TF / 'bert_config.json')!r}, {str(tmp_path / 'o')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_public_readers():
    import converters

    assert converters.load_mge_pickle(MGE / "hub_bert.pkl")["pooler.dense.weight"].shape == (32, 32)
    tf = converters.load_tf_checkpoint(TF / "tf1/bert_model.ckpt")
    assert tf["cls/seq_relationship/output_weights"].shape == (2, 24) and "global_step" in tf
    assert issubclass(converters.ConversionError, ValueError)


# ------------------------------------------------------------------ one options value, one conversion
def test_options_are_one_frozen_value_checked_when_made(tmp_path):
    import dataclasses

    from converters import ConversionError
    from converters.convert import ConvertOptions

    options = ConvertOptions(MGE / "bert_config.json", tmp_path / "out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.force = True
    with pytest.raises(ConversionError, match="--gelu must be one of"):
        ConvertOptions(MGE / "bert_config.json", tmp_path / "out", gelu="swish")
    with pytest.raises(ConversionError, match="--format must be"):
        ConvertOptions(MGE / "bert_config.json", tmp_path / "out", fmt="onnx")


def test_labels_reach_the_config_default_label_i(tmp_path):
    from converters.convert import ConvertOptions, convert_file

    convert_file("megengine", MGE / "cls_bert.pkl", ConvertOptions(MGE / "bert_config.json", tmp_path / "a"))
    assert json.loads((tmp_path / "a/config.json").read_text())["id2label"] == {"0": "LABEL_0", "1": "LABEL_1",
                                                                              "2": "LABEL_2"}
    r = run_cli("converters.mge2torch", MGE / "cls_bert.pkl", "--config", MGE / "bert_config.json",
                "--out", tmp_path / "b", "--labels", "neg,neutral,pos")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "b/config.json").read_text())
    assert config["id2label"]["2"] == "pos" and config["label2id"]["neutral"] == 1
    r = run_cli("converters.mge2torch", MGE / "cls_bert.pkl", "--config", MGE / "bert_config.json",
                "--out", tmp_path / "c", "--labels", "neg,pos")
    assert r.returncode == 1 and "2 labels given for a classifier of 3 classes" in r.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("variant", ["legacy", "deflated"])
def test_a_torch_source_converts_through_the_same_function(tmp_path, variant):
    """A third source format through convert_file: the output holds what torch.load reads."""
    import io
    import zipfile

    from converters.convert import ConvertOptions, convert_file

    mge_to_torch(MGE / "cls_bert.pkl", MGE / "bert_config.json", tmp_path / "a", fmt="pytorch")
    src = tmp_path / "a/pytorch_model.bin"
    state = torch.load(src, weights_only=True)
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}  # pytorch_pretrained_bert's old names
    torch.save(renamed, src, _use_new_zipfile_serialization=variant != "legacy")
    if variant == "deflated":
        with zipfile.ZipFile(io.BytesIO(src.read_bytes())) as zi, zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zo:
            for info in zi.infolist():
                zo.writestr(info.filename, zi.read(info))
    summary = convert_file("torch", src, ConvertOptions(MGE / "bert_config.json", tmp_path / "b"))
    assert summary["architecture"] == "BertForSequenceClassification" and not summary["unknown"]
    out = bp.io.load_weights(tmp_path / "b/model.safetensors")
    assert sorted(out) == sorted(state)
    for key, value in state.items():
        assert torch.equal(out[key], value), key


class NpzReader:
    """A source format written for this test in a dozen lines: what ARCHITECTURE.md promises."""

    def __init__(self, path):
        self.source, self._arrays = str(path), dict(np.load(path))

    def names(self):
        return list(self._arrays)

    def shape_dtype(self, name):
        return self._arrays[name].shape, self._arrays[name].dtype.name

    def read(self, name):
        return self._arrays[name].copy()

    def close(self):
        self._arrays = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_a_new_source_format_is_a_reader_a_plan_and_one_row(tmp_path, monkeypatch):
    from converters import convert as library
    from converters import mapping
    from converters.mge_pickle import load_mge_pickle
    from converters.reader import CheckpointReader

    arrays = load_mge_pickle(MGE / "hub_bert.pkl")
    np.savez(tmp_path / "hub.npz", **arrays)
    assert isinstance(NpzReader(tmp_path / "hub.npz"), CheckpointReader)
    monkeypatch.setitem(library.SOURCES, "npz", ("tests.test_converters:NpzReader",
                                                 lambda names, config: mapping.canonical_from_mge(names)))
    library.convert_file("npz", tmp_path / "hub.npz", library.ConvertOptions(MGE / "bert_config.json", tmp_path / "a"))
    mge_to_torch(MGE / "hub_bert.pkl", MGE / "bert_config.json", tmp_path / "b")
    a = bp.io.load_weights(tmp_path / "a/model.safetensors")
    b = bp.io.load_weights(tmp_path / "b/model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_vocab_longer_than_the_embedding_is_refused(tmp_path):
    config = json.loads((MGE / "bert_config.json").read_text())
    (tmp_path / "vocab.txt").write_text("".join(f"t{i}\n" for i in range(config["vocab_size"] + 1)))
    r = run_cli("converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
                "--vocab", tmp_path / "vocab.txt", "--out", tmp_path / "out")
    assert r.returncode == 1 and f"more than the config's vocab_size {config['vocab_size']}" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "vocab.txt").write_text("".join(f"t{i}\n" for i in range(config["vocab_size"])))
    mge_to_torch(MGE / "hub_bert.pkl", MGE / "bert_config.json", tmp_path / "ok", vocab=tmp_path / "vocab.txt")
