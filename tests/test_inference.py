"""`bert_port.inference.prepack`: linears on weights packed once, for batch-1 latency.

Every test runs once per packing this torch build has (MKL's packed sgemm, oneDNN's reordered
weights; BERT_PORT_PACKING), whichever this machine would choose. References are independent of the
packed path: pytorch_pretrained_bert 0.6.2 on the same weights, and the same model on the plain
F.linear path (BERT_PORT_LINEAR=torch).
"""
import copy

import pytest
import torch
from torch import nn

import bert_port as bp
from bert_port import kernels
from bert_port import inference
from bert_port.inference import prepack
from bert_port.model import BertSelfAttention, BertSelfOutput
from tests.conftest import TINY, make_inputs, scale_weights_

# Wide enough that every GEMM has >= MIN_ROWS rows and real work; 3 layers, so weights differ per layer.
CFG = dict(TINY, hidden_size=64, num_attention_heads=4, intermediate_size=96, num_hidden_layers=3)
needs_packing = pytest.mark.skipif(not kernels.can_pack(), reason="this torch build cannot pack weights")


def model(head=bp.BertModel, *args):
    torch.manual_seed(0)
    m = head(bp.BertConfig(**CFG), *args)
    scale_weights_(m, std=0.1)
    return m.eval()


def packed_choices():
    return {k: v for k, v in kernels.choices().items() if k[-1]}


@pytest.fixture(autouse=True, params=kernels.packings() or ["auto"])
def fresh_choices(monkeypatch, request):
    monkeypatch.delenv("BERT_PORT_LINEAR", raising=False)
    monkeypatch.setenv("BERT_PORT_PACKING", request.param)
    kernels.reset()
    yield
    kernels.reset()


def plain(m, *args, monkeypatch, **kwargs):
    """m(*args, **kwargs) on F.linear (BERT_PORT_LINEAR is restored afterwards)."""
    with monkeypatch.context() as patch:
        patch.setenv("BERT_PORT_LINEAR", "torch")
        kernels.reset()
        with torch.no_grad():
            out = m(*args, **kwargs)
    kernels.reset()
    return out


@needs_packing
@pytest.mark.parametrize("batch,seq_len", [(1, 32), (1, 48), (1, 5), (3, 40)])
def test_matches_pytorch_pretrained_bert(batch, seq_len, monkeypatch):
    """Every layer and the pooled output, padding included, within 1e-5 of ppb on the same weights;
    the packed kernel really ran (for every GEMM of >= 16 rows: forced, so that a busy machine's
    timings cannot hand these tiny GEMMs to F.linear)."""
    ppb = pytest.importorskip("pytorch_pretrained_bert")
    monkeypatch.setenv("BERT_PORT_LINEAR", "packed")
    torch.manual_seed(0)
    theirs = ppb.BertModel(ppb.BertConfig(**CFG))
    scale_weights_(theirs, std=0.1)
    ours = bp.BertModel(bp.BertConfig(**CFG))
    ours.load_pretrained_state_dict(theirs.state_dict())
    ids, types, mask = make_inputs(batch=batch, seq_len=seq_len, vocab=CFG["vocab_size_or_config_json_file"])
    with torch.no_grad():
        want, want_pooled = theirs.eval()(ids, types, mask)
    layers, pooled = prepack(ours)(ids, types, mask)
    for ref, out in zip(want, layers):
        assert (out - ref).abs().max() <= 1e-5
    assert (pooled - want_pooled).abs().max() <= 1e-5
    chosen = packed_choices()
    if batch * seq_len >= kernels.MIN_ROWS:
        assert "packed" in chosen.values(), chosen
        assert any(k[3] == "group/3" and v == "packed" for k, v in chosen.items()), chosen  # query, key, value


@needs_packing
def test_heads_and_jagged_input(monkeypatch):
    tagger = model(bp.BertForTokenClassification, 5)
    ids, types, mask = make_inputs(batch=2, seq_len=30, vocab=CFG["vocab_size_or_config_json_file"])
    want = plain(tagger, ids, types, mask, monkeypatch=monkeypatch)
    assert (prepack(tagger)(ids, types, mask) - want).abs().max() <= 1e-5
    encoder = model()
    seqs = [ids[0, :30], ids[1, :17]]
    jag = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    got = prepack(encoder)(jag, output_all_encoded_layers=False)[0].unbind()
    for seq, out in zip(seqs, got):
        ref = plain(encoder, seq[None], output_all_encoded_layers=False, monkeypatch=monkeypatch)[0][0]
        assert (out - ref).abs().max() <= 1e-5


@needs_packing
def test_the_model_is_left_as_it_was(monkeypatch):
    m = model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(1, 99, (1, 24))
    fast = prepack(m)
    fast(ids)
    assert all(type(x) is nn.Linear for x in m.modules() if isinstance(x, nn.Linear))
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    kernels.reset()
    with torch.no_grad():
        m(ids)  # called directly: the plain path, no packed kernel
    assert not packed_choices()
    twin = copy.deepcopy(m)  # the packed copies belong to `fast`, not to the model: copying is safe
    assert (plain(twin, ids, monkeypatch=monkeypatch)[1] - fast(ids)[1]).abs().max() <= 1e-5


@needs_packing
def test_weights_changed_in_place_are_packed_again_and_repack_sees_data_writes(monkeypatch):
    monkeypatch.setenv("BERT_PORT_LINEAR", "packed")  # every GEMM on the packed copies, whatever is faster here
    m, other = model(), model()
    scale_weights_(other, std=0.1, seed=5)
    ids = torch.randint(1, 99, (1, 32))
    fast = prepack(m)
    before = fast(ids)[1]
    m.load_state_dict(other.state_dict())  # in place: versions change, packed again on the next call
    after = fast(ids)[1]
    assert (after - plain(other, ids, monkeypatch=monkeypatch)[1]).abs().max() <= 1e-5
    assert (after - before).abs().max() > 1e-2
    q = m.encoder.layer[0].attention.self.query
    q.weight = nn.Parameter(torch.zeros_like(q.weight))  # replaced: packed again too
    assert (fast(ids)[1] - plain(m, ids, monkeypatch=monkeypatch)[1]).abs().max() <= 1e-5
    with torch.no_grad():
        m.encoder.layer[2].attention.self.value.bias.add_(0.5)  # a bias of the QKV group, packed beside the others
    assert (fast(ids)[1] - plain(m, ids, monkeypatch=monkeypatch)[1]).abs().max() <= 1e-5
    fast(ids)  # kernels chosen (and checked against F.linear) before the next change, not after it
    dense = m.encoder.layer[0].output.dense
    dense.weight.data = dense.weight.data * 3  # new storage through .data: seen without repack()
    with torch.no_grad():
        want = m(ids)[1]  # the model itself: no packed copies (and the choices above are kept)
    assert (fast(ids)[1] - want).abs().max() <= 1e-5
    with torch.no_grad():
        m.encoder.layer[1].output.dense.weight.data.mul_(2)  # written through .data: invisible until repack()
    fast.repack()
    assert (fast(ids)[1] - plain(m, ids, monkeypatch=monkeypatch)[1]).abs().max() <= 1e-5


@needs_packing
def test_an_input_of_the_wrong_width_fails_as_on_the_plain_path(monkeypatch):
    """The packed op would read past a too-narrow input: the width is checked before it runs."""
    monkeypatch.setenv("BERT_PORT_LINEAR", "packed")
    m = model()
    fast = prepack(m)
    dense = m.encoder.layer[0].intermediate.dense
    with torch.no_grad(), kernels.using_packed(fast.packed):
        assert (kernels.linear(dense, torch.ones(32, dense.in_features)) - dense(torch.ones(32, dense.in_features))
                ).abs().max() <= 1e-5
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            kernels.linear(dense, torch.ones(32, dense.in_features - 1))


@needs_packing
def test_a_packed_kernel_that_disagrees_is_not_used(monkeypatch):
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    want = plain(m, ids, monkeypatch=monkeypatch)[1]
    real = kernels.run_packed
    monkeypatch.setattr(kernels, "run_packed", lambda *a: real(*a) * 1.01)
    assert (prepack(m)(ids)[1] - want).abs().max() <= 1e-5
    assert packed_choices() and "packed" not in packed_choices().values()


def test_without_mkl_packing_the_plain_path_runs(monkeypatch):
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    want = plain(m, ids, monkeypatch=monkeypatch)[1]
    monkeypatch.setattr(kernels, "can_pack", lambda: False)
    fast = prepack(m)
    assert fast.packed == {} and (fast(ids)[1] - want).abs().max() <= 1e-5


@needs_packing
@pytest.mark.parametrize("forced", ["torch", "packed"])
def test_forced_choice(monkeypatch, forced):
    monkeypatch.setenv("BERT_PORT_LINEAR", forced)
    prepack(model())(torch.randint(1, 99, (1, 32)))
    assert set(packed_choices().values()) == {forced}


@needs_packing
def test_bf16_models_and_grad_stay_on_their_own_path():
    m = model()
    fast = prepack(m)
    assert fast.packed and all(w.data.dtype == torch.float32 for w in fast.packed.values())
    m.to(torch.bfloat16)  # new weight tensors, not fp32: the packed copies are not used
    out = fast(torch.randint(1, 99, (1, 32)))[1]
    assert out.dtype == torch.bfloat16 and not packed_choices()


@needs_packing
def test_weights_moved_off_the_cpu_are_not_packed_again():
    """The per-call layer checks see a model moved to another device (here "meta": no GPU needed)
    and leave it to the module path instead of handing MKL a tensor it cannot pack."""
    m = model()
    fast = prepack(m)
    assert len(fast.layers) == CFG["num_hidden_layers"]
    m.to("meta")
    table = fast.table_now()  # raised inside MKL's packing before the device check
    assert not any(isinstance(v, inference.PackedLayer) for v in table.values())


@needs_packing
def test_hooks_still_run_under_prepack(monkeypatch):
    """A forward hook on one of query/key/value takes that group off the packed GEMM: the hook runs
    and what it returns is used, as on the plain path."""
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    calls = []

    def halve(module, args, out):
        calls.append(module)
        return out * 0.5

    m.encoder.layer[1].attention.self.key.register_forward_hook(halve)
    want = plain(m, ids, monkeypatch=monkeypatch)[1]
    calls.clear()
    got = prepack(m)(ids)[1]
    assert calls and (got - want).abs().max() <= 1e-5


@needs_packing
def test_a_global_forward_hook_sees_every_linear_under_prepack():
    """torch's global hooks (register_module_forward_hook) take the packed path off: they run for every linear."""
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    fast = prepack(m)
    fast(ids)  # kernels chosen first: the hook must win over an existing decision
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(module) if isinstance(module, nn.Linear) else None)
    try:
        fast(ids)
    finally:
        handle.remove()
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert len(seen) == len(linears) and set(map(id, seen)) == set(map(id, linears))


def _module_path_off(monkeypatch):
    """Make the module path fail (its attention calls `kernels.linears`; PackedLayer does not): only a
    layer that runs as one PackedLayer gets through."""
    def refuse(*args, **kwargs):
        raise AssertionError("the module path ran")
    monkeypatch.setattr(kernels, "linears", refuse)


@needs_packing
@pytest.mark.parametrize("padded", [False, True])
def test_packed_layers_give_the_module_paths_numbers_bit_for_bit(monkeypatch, padded):
    """prepack runs each stock BertLayer as straight-line code (inference.PackedLayer): the same ops on
    the same packed weights as the module path, so the same numbers to the bit, padding included."""
    monkeypatch.setenv("BERT_PORT_LINEAR", "packed")
    m = model()
    ids, types, mask = make_inputs(batch=2, seq_len=24, vocab=CFG["vocab_size_or_config_json_file"])
    if not padded:
        mask = torch.ones_like(mask)
    fast = prepack(m)
    with torch.no_grad(), kernels.using_packed(fast.packed):  # the module path on the packed weights
        want, want_pooled = m(ids, types, mask)
    with monkeypatch.context() as patch:
        _module_path_off(patch)
        layers, pooled = fast(ids, types, mask)
        with torch.inference_mode():  # also under inference_mode
            assert torch.equal(fast(ids, types, mask)[1], pooled)
    assert all(torch.equal(a, b) for a, b in zip(layers, want)) and torch.equal(pooled, want_pooled)


@needs_packing
@pytest.mark.parametrize("change", ["layernorm hook", "linear swapped", "a submodule in train mode", "act changed",
                                    "forward replaced on an instance", "forward replaced on the class",
                                    "transpose_for_scores replaced on the class"])
def test_packed_layers_step_aside_for_what_they_do_not_reproduce(monkeypatch, change):
    """A hook, a swapped-in module, train mode or a replaced forward after packing: that layer runs its
    modules (the hook runs, the new module or forward is used) and the result is the plain model's;
    another activation is computed on the packed path, with the same result."""
    monkeypatch.setenv("BERT_PORT_LINEAR", "packed")  # packed wherever it may run, whatever is faster here
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    fast = prepack(m)
    fast(ids)  # packed: the change comes afterwards
    layer = m.encoder.layer[1]
    calls = []
    if change == "layernorm hook":
        layer.output.LayerNorm.register_forward_hook(lambda mod, args, out: calls.append(mod) or out * 2)
    elif change == "linear swapped":
        torch.manual_seed(3)
        layer.intermediate.dense = nn.Linear(CFG["hidden_size"], CFG["intermediate_size"])
    elif change == "a submodule in train mode":
        layer.attention.output.train()
        layer.attention.output.dropout.p = 0.0  # train mode without random numbers: comparable
    elif change == "act changed":
        layer.intermediate.intermediate_act_fn = torch.tanh
    elif change == "forward replaced on an instance":  # as accelerate's hooks do
        norm = layer.output.LayerNorm
        norm.forward = lambda x: calls.append(norm) or nn.LayerNorm.forward(norm, x) * 2
    elif change == "forward replaced on the class":  # as a patching library does: every layer runs its modules
        real_forward = BertSelfOutput.forward
        monkeypatch.setattr(BertSelfOutput, "forward",
                            lambda self, h, x: calls.append(self) or real_forward(self, h, x) * 2)
    else:  # another head layout, e.g. a library that visualises or prunes heads
        monkeypatch.setattr(BertSelfAttention, "transpose_for_scores",
                            lambda self, x: calls.append(self) or x.view(*x.shape[:-1], self.num_attention_heads,
                                                                        -1).transpose(-3, -2).flip(-1))
    want = plain(m, ids, monkeypatch=monkeypatch)
    fast(ids)  # kernels chosen again (`plain` forgot them)
    calls.clear()
    with monkeypatch.context() as patch:  # the other layers still run packed
        real, ran = kernels.linears, []
        every = change.endswith("on the class")
        patch.setattr(kernels, "linears", lambda modules, x: ran.append(modules) or real(modules, x)
                      if every or modules[0] is layer.attention.self.query else _fail())
        got = fast(ids)
    assert (got[1] - want[1]).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(got[0], want[0]))
    assert calls or change in ("linear swapped", "a submodule in train mode", "act changed")
    assert len(ran) == (0 if change == "act changed" else CFG["num_hidden_layers"] if every else 1)


def _fail():
    raise AssertionError("a layer that could run packed ran its modules")


@needs_packing
def test_torch_inference_mode_first_call_and_model_built_under_it(monkeypatch):
    """Tensors made under torch.inference_mode have no version counter: neither the kernel measurement
    of a first call under it nor a model built under it may read one."""
    m = model()
    ids = torch.randint(1, 99, (1, 32))
    want = plain(m, ids, monkeypatch=monkeypatch)[1]
    fast = prepack(m)
    with torch.inference_mode():
        assert (fast(ids)[1] - want).abs().max() <= 1e-5
        built = model()
        built.load_state_dict(m.state_dict())
        assert (prepack(built)(ids)[1] - want).abs().max() <= 1e-5
