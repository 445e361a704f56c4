"""`bert_port.inference.compile_for_inference`: compiled batch-1 inference, and its eager fallback.

The reference is the eager model on the plain F.linear path (BERT_PORT_LINEAR=torch).
"""
import pytest
import torch
from torch import nn

import bert_port as bp
from bert_port import kernels
from bert_port.inference import compile_for_inference
from tests.conftest import TINY, scale_weights_


def tiny():
    torch.manual_seed(0)
    model = bp.BertModel(bp.BertConfig(**TINY))
    scale_weights_(model, std=0.1, seed=0)
    return model.eval()


def reference(model, ids, monkeypatch):
    monkeypatch.setenv("BERT_PORT_LINEAR", "torch")
    kernels.reset()
    with torch.no_grad():
        out = model(ids, output_all_encoded_layers=False)
    monkeypatch.delenv("BERT_PORT_LINEAR")
    kernels.reset()
    return out


def test_falls_back_to_eager_when_compiling_fails(monkeypatch):
    model = tiny()
    ids = torch.randint(1, TINY["vocab_size_or_config_json_file"], (1, 12))
    ref = reference(model, ids, monkeypatch)

    def broken(module, dynamic, options):
        assert options["freezing"] and module is model and dynamic is False
        def run(*args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    fast = bp.inference.CompiledInference(model, compile_fn=broken)
    with pytest.warns(RuntimeWarning, match="compiling failed .*no working C\\+\\+ compiler.*eager"):
        seq, pooled = fast(ids, output_all_encoded_layers=False)
    assert "InvalidCxxCompiler" in fast.failed
    assert (seq - ref[0]).abs().max() <= 1e-6 and (pooled - ref[1]).abs().max() <= 1e-6
    fast(ids, output_all_encoded_layers=False)  # no second warning, no second try
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.slow
def test_compiled_matches_eager_within_1e_5(monkeypatch):
    """A real compile (inductor, freezing, C++ wrapper): outputs within 1e-5, modules untouched."""
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(1, TINY["vocab_size_or_config_json_file"], (1, 24))
    ref = reference(model, ids, monkeypatch)
    fast = compile_for_inference(model)
    try:
        seq, pooled = fast(ids, None, torch.ones_like(ids), output_all_encoded_layers=False)
        assert fast.failed is None, fast.failed
        assert (seq - ref[0]).abs().max() <= 1e-5 and (pooled - ref[1]).abs().max() <= 1e-5
        assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    finally:
        fast.reset()
