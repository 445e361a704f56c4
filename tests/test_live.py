"""Live parity: real TensorFlow and real MegEngine read and run what our converters export.

Each test starts from a PyTorch model (random, well-scaled weights, or a converted fixture),
exports it through the command-line converter, and then asks the real framework (a side venv:
tools/live-envs, $BERT_PORT_TF_PYTHON / $BERT_PORT_MGE_PYTHON) for two things:

* its own reading of the export, compared bit for bit with the tensors we meant to write, taken
  from the torch model and renamed / transposed by the small table below (not by converters.mapping
  and not by our readers);
* its forward pass on the export (TF: Google's modeling.py math in TF ops on the weights TF restored;
  MegEngine: load_state_dict(strict=True) into Models' module tree), compared with our forward
  pass, max |diff| <= 1e-5 at every position, padding included.

Without the variables (and without the framework importable here) the tests skip; with a variable
set to a python that cannot import the framework they FAIL, so a broken CI env is not a silent skip.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bert_port as bp
from converters.convert import tf_to_torch
from tests.conftest import FIXTURES, ROOT, make_inputs, scale_weights_

TF, MGE = FIXTURES / "tf", FIXTURES / "mge"
TOOLS = ROOT / "tools" / "fixtures"
TOL = 1e-5

pytestmark = pytest.mark.live


def framework_python(module: str, env_var: str) -> str:
    exe = os.environ.get(env_var)
    if exe:
        r = subprocess.run([exe, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert r.returncode == 0, f"{env_var}={exe} cannot import {module}: {r.stderr[-1500:]}"
        return exe
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    pytest.skip(f"{module} not importable and {env_var} not set (tools/live-envs makes one)")


def run(*cmd, timeout=600) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert r.returncode == 0, f"{cmd[:3]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def worst(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float((ours - torch.from_numpy(np.asarray(theirs, dtype=np.float32))).abs().max())


# --------------------------------------------------------------------------------- TensorFlow
# torch name -> Google's TF1 name; True = the value is a Linear weight stored transposed ([in, out]).
GOOGLE = [
    (r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight", r"bert/embeddings/\1_embeddings", False),
    (r"(.*)\.LayerNorm\.weight", r"\1/LayerNorm/gamma", False),
    (r"(.*)\.LayerNorm\.bias", r"\1/LayerNorm/beta", False),
    (r"(.*)\.(query|key|value|dense)\.weight", r"\1/\2/kernel", True),
    (r"(.*)\.(query|key|value|dense)\.bias", r"\1/\2/bias", False),
    (r"cls\.predictions\.bias", r"cls/predictions/output_bias", False),
    (r"cls\.seq_relationship\.weight", r"cls/seq_relationship/output_weights", False),
    (r"cls\.seq_relationship\.bias", r"cls/seq_relationship/output_bias", False),
]


def google_tensors(state: dict) -> dict:
    out = {}
    for name, value in state.items():
        if name == "cls.predictions.decoder.weight" or name.endswith("position_ids"):
            continue  # tied to word_embeddings / a buffer: not in Google's checkpoints
        for pattern, target, transpose in GOOGLE:
            if re.fullmatch(pattern, name):
                tf_name = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", re.sub(pattern, target, name)).replace(".", "/")
                array = value.detach().numpy()
                out[tf_name] = np.ascontiguousarray(array.T if transpose else array)
                break
        else:
            raise AssertionError(f"no Google name for {name}")
    return out


def pretraining_model(source: str, tmp_path) -> bp.BertForPreTraining:
    if source == "tf1 fixture":
        tf_to_torch(TF / "tf1/bert_model.ckpt", TF / "bert_config.json", tmp_path / "src")
        model = bp.BertForPreTraining.from_pretrained(tmp_path / "src")
    else:
        config = bp.BertConfig.from_json_file(TF / "bert_config.json")
        config.hidden_act = "gelu_new"  # the tanh GELU that Google's "gelu" computes
        model = bp.BertForPreTraining(config)
        scale_weights_(model, std=0.15, seed=7)
    return model.eval()


@pytest.mark.parametrize("source", ["random weights", "tf1 fixture"])
def test_tensorflow_reads_and_runs_our_export(tmp_path, source):
    python = framework_python("tensorflow", "BERT_PORT_TF_PYTHON")
    model = pretraining_model(source, tmp_path)
    model.save_pretrained(tmp_path / "torch")
    prefix = tmp_path / "tf" / "bert_model.ckpt"
    run(sys.executable, "-m", "converters.torch2tf", tmp_path / "torch", "--out", prefix)

    expected = google_tensors(model.state_dict())
    assert len(expected) == 46
    np.savez(tmp_path / "expected.npz", **expected)
    ids, types, mask = make_inputs(batch=3, seq_len=17, vocab=model.config.vocab_size, seed=3)
    np.savez(tmp_path / "inputs.npz", input_ids=ids.int().numpy(), token_type_ids=types.int().numpy(),
             input_mask=mask.int().numpy())
    out = run(python, TOOLS / "check_tf_load.py", prefix, tmp_path / "expected.npz", "--saver",
              "--forward", tmp_path / "torch/config.json", tmp_path / "inputs.npz", tmp_path / "tf_out.npz")
    assert "OK: 46 tensors via load_checkpoint, Saver.restore" in out, out

    theirs = np.load(tmp_path / "tf_out.npz")
    with torch.no_grad():
        layers, pooled = model.bert(ids, types, mask)
        mlm, nsp = model(ids, types, mask)
    diffs = {f"encoder_layer_{i}": worst(layer, theirs[f"encoder_layer_{i}"]) for i, layer in enumerate(layers)}
    diffs.update(pooled_output=worst(pooled, theirs["pooled_output"]), nsp_logits=worst(nsp, theirs["nsp_logits"]),
                 mlm_logits=worst(mlm, theirs["mlm_logits"]))
    assert max(diffs.values()) <= TOL, diffs
    assert float(np.abs(theirs["pooled_output"]).max()) > 0.1  # not a degenerate comparison


# ---------------------------------------------------------------------------------- MegEngine
def mge_model(kind: str) -> torch.nn.Module:
    config = bp.BertConfig.from_json_file(MGE / "bert_config.json")
    config.hidden_act = "gelu_new"  # MegEngine/Models' "gelu" is the tanh approximation
    model = bp.BertModel(config) if kind == "bert" else bp.BertForSequenceClassification(config, num_labels=3)
    scale_weights_(model, std=0.15, seed=11)
    return model.eval()


@pytest.mark.parametrize("kind", ["bert", "cls"])
def test_megengine_reads_and_runs_our_export(tmp_path, kind):
    python = framework_python("megengine", "BERT_PORT_MGE_PYTHON")
    model = mge_model(kind)
    model.save_pretrained(tmp_path / "torch")
    run(sys.executable, "-m", "converters.torch2mge", tmp_path / "torch", "--out", tmp_path / "hub.pkl")

    ids, types, mask = make_inputs(batch=3, seq_len=17, vocab=model.config.vocab_size, seed=5)
    np.savez(tmp_path / "inputs.npz", input_ids=ids.int().numpy(), token_type_ids=types.int().numpy(),
             attention_mask=mask.float().numpy())
    out = run(python, TOOLS / "check_mge_load.py", tmp_path / "hub.pkl", MGE / "bert_config.json",
              "--model", kind, "--num-labels", "3" if kind == "cls" else "0", "--inputs", tmp_path / "inputs.npz",
              "--out", tmp_path / "mge_out.npz", "--dump", tmp_path / "mge_state.npz")
    assert "strict=True" in out, out

    # MegEngine/Models' keys are exactly the torch names (BertModel: no prefix; classifier: bert.* + classifier.*)
    want = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    with np.load(tmp_path / "mge_state.npz") as got:
        assert sorted(got.files) == sorted(want)
        for name, value in want.items():
            assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
            assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), f"{name}: MegEngine read other values"

    theirs = np.load(tmp_path / "mge_out.npz")
    with torch.no_grad():
        if kind == "bert":
            layers, pooled = model(ids, types, mask)
            diffs = {f"encoded_layer_{i}": worst(t, theirs[f"encoded_layer_{i}"]) for i, t in enumerate(layers)}
            diffs["pooled_output"] = worst(pooled, theirs["pooled_output"])
        else:
            logits = model(ids, types, mask)
            logits = logits[0] if isinstance(logits, tuple) else logits
            diffs = {"logits": worst(logits, theirs["logits"])}
    assert max(diffs.values()) <= TOL, diffs
