"""`bert_port.kernels.prepack`: batch-1 latency mode with prepacked oneDNN weights.

The reference is independent of the code under test: the plain F.linear path (BERT_PORT_LINEAR=torch)
on the same model, whose parity with ppb/HF is tested elsewhere.
"""
import copy

import pytest
import torch
from torch import nn

import bert_port as bp
from bert_port import kernels
from tests.conftest import TINY, scale_weights_

SMALL = dict(TINY, hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
needs_onednn = pytest.mark.skipif(kernels._ONEDNN_OP is None, reason="this torch build has no oneDNN")


def small_model():
    torch.manual_seed(0)
    model = bp.BertModel(bp.BertConfig(**SMALL))
    scale_weights_(model, std=0.1, seed=0)
    return model.eval()


def single(seq_len=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, SMALL["vocab_size_or_config_json_file"], (1, seq_len), generator=g)


def run(model, ids, choice, monkeypatch):
    monkeypatch.setenv("BERT_PORT_LINEAR", choice)
    kernels.reset()
    with torch.inference_mode():
        seq, pooled = model(ids, output_all_encoded_layers=False)
    return seq.clone(), pooled.clone()


@pytest.fixture(autouse=True)
def forget_choices():
    kernels.reset()
    yield
    kernels.reset()


@needs_onednn
@pytest.mark.parametrize("seq_len", [32, 128])
def test_prepacked_matches_the_plain_linear_path(monkeypatch, seq_len):
    model, ids = small_model(), single(seq_len)
    ref = run(model, ids, "torch", monkeypatch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert kernels.prepack(model) is model
    got = run(model, ids, "onednn", monkeypatch)  # forced: the packed kernel runs for every linear
    assert {v for k, v in kernels.choices().items() if k[-1]} == {"packed"}
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5
    # the modules are untouched nn.Linear with the same parameters; state_dict is unchanged
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert run(model, ids, "auto", monkeypatch)[0].sub(ref[0]).abs().max() <= 1e-5  # measured choice


@needs_onednn
def test_weight_changed_in_place_is_repacked(monkeypatch):
    model, ids = small_model(), single()
    kernels.prepack(model)
    run(model, ids, "onednn", monkeypatch)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.5)
    ref = run(copy.deepcopy(model), ids, "torch", monkeypatch)
    got = run(model, ids, "onednn", monkeypatch)
    assert (got[0] - ref[0]).abs().max() <= 1e-5


@needs_onednn
def test_unprepack_and_training_use_the_module_weight(monkeypatch):
    model, ids = small_model(), single()
    kernels.prepack(model)
    model.train()
    monkeypatch.setenv("BERT_PORT_LINEAR", "onednn")
    seq, _ = model(ids, output_all_encoded_layers=False)
    seq.sum().backward()
    assert not any(k[-1] for k in kernels.choices())  # autograd never uses a packed copy
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, nn.Linear)
               and m is not model.pooler.dense)
    kernels.prepack(model, False)
    kernels.reset()
    model.eval()
    run(model, ids, "onednn", monkeypatch)
    assert not any(k[-1] for k in kernels.choices())


def test_without_onednn_prepack_is_a_no_op(monkeypatch):
    """Builds without oneDNN (or non-x86): prepack keeps nothing and the model runs F.linear."""
    model, ids = small_model(), single()
    ref = run(model, ids, "torch", monkeypatch)
    monkeypatch.setattr(kernels, "_ONEDNN_OP", None)
    kernels.prepack(model)
    assert not any(m in kernels._packed for m in model.modules())
    got = run(model, ids, "auto", monkeypatch)
    assert torch.equal(got[0], ref[0])
