"""The attention plan: one decision per forward, passed to every layer, each documented path taken
for its inputs (observed on real forwards through hooks on the attention modules), and the
declared `BertConfig.fast_dropout` field."""
import json

import pytest
import torch

import bert_port as bp
from tests.conftest import TINY, make_inputs

ppb = pytest.importorskip("pytorch_pretrained_bert")


def model(dropout=0.1, **cfg):
    torch.manual_seed(0)
    return bp.BertModel(bp.BertConfig(**dict(TINY, hidden_dropout_prob=dropout,
                                             attention_probs_dropout_prob=dropout, **cfg)))


def plans_of(m, *args, **kwargs):
    """The plan each layer's self-attention received in one forward."""
    seen = []
    hooks = [layer.attention.self.register_forward_pre_hook(lambda mod, a: seen.append(a[1]))
             for layer in m.encoder.layer]
    try:
        with torch.no_grad():
            m(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == TINY["num_hidden_layers"] and all(p is seen[0] for p in seen)  # one value, passed down
    return seen[0]


def soft(mask):
    return mask.float() * 0.999


def jagged(ids, mask):
    return torch.nested.nested_tensor([r[:int(n)] for r, n in zip(ids, mask.sum(1))], layout=torch.jagged)


ids, types, mask = make_inputs()
ONES = torch.ones_like(mask)

CASES = [  # (description, model config, train, call args, call kwargs, path, padded rows are 0; None: no padding)
    ("eval, padded mask", {}, False, (ids, types, mask), {}, "sdpa_masked", False),
    ("eval, no mask", {}, False, (ids, types), {}, "sdpa", None),
    ("eval, all-ones mask", {}, False, (ids, types, ONES), {}, "sdpa", None),
    ("eval, soft mask without zeros", {}, False, (ids, types, soft(ONES)), {}, "sdpa_masked", None),
    ("train, dropout: ppb's stream", {}, True, (ids, types, mask), {}, "reference", False),
    ("train, no mask: ppb's stream", {}, True, (ids, types), {}, "reference", None),
    ("train, dropout 0", {"dropout": 0.0}, True, (ids, types, mask), {}, "sdpa_masked", False),
    ("eval, skip_padding", {}, False, (ids, types, mask), {"skip_padding": True}, "unpadded_loop", True),
    ("eval, skip_padding, soft mask", {}, False, (ids, types, soft(mask)), {"skip_padding": True}, "sdpa_masked",
     False),
    ("train, skip_padding: ppb's stream wins", {}, True, (ids, types, mask), {"skip_padding": True}, "reference",
     False),
    ("train, fast_dropout", {"fast_dropout": True}, True, (ids, types, mask), {}, "unpadded_loop", True),
    ("train, fast_dropout, soft mask", {"fast_dropout": True}, True, (ids, types, soft(mask)), {}, "sdpa_masked",
     False),
    ("eval, fast_dropout", {"fast_dropout": True}, False, (ids, types, mask), {}, "sdpa_masked", False),
    ("eval, jagged", {}, False, (jagged(ids, mask),), {}, "unpadded_loop", None),
    ("train, jagged", {}, True, (jagged(ids, mask),), {}, "unpadded_loop", None),
]


@pytest.mark.parametrize("desc,cfg,train,args,kwargs,path,zeros", CASES, ids=[c[0] for c in CASES])
def test_each_path_is_taken_for_its_inputs(desc, cfg, train, args, kwargs, path, zeros):
    m = model(**cfg).train(train)
    plan = plans_of(m, *args, **kwargs)
    assert plan.path == path
    if zeros is not None:
        with torch.no_grad():
            torch.manual_seed(3)
            last = m(*args, output_all_encoded_layers=False, **kwargs)[0]
        pad = args[2] == 0
        assert pad.any() and (last[pad].abs().max() == 0) == zeros  # zeros only where an opt-in asked


@pytest.mark.filterwarnings("ignore:Encountering a list at the output of the tracer")  # ppb's API returns a list
def test_recording_a_graph_takes_the_masked_path_for_any_padding():
    m = model().eval()
    seen = []
    m.encoder.layer[0].attention.self.register_forward_pre_hook(lambda mod, a: seen.append(a[1].path))
    with torch.no_grad():
        torch.jit.trace(m, (ids, types, ONES), check_trace=False)  # an example without padding: no "sdpa" baked in
    assert seen == ["sdpa_masked"]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ppb_style_encoder_call_with_an_additive_mask(train):
    """Code written for ppb calls the encoder with its extended mask: it gets ppb's computation
    (in train mode with ppb's dropout draws)."""
    torch.manual_seed(0)
    theirs = ppb.BertModel(ppb.BertConfig(**TINY)).train(train)
    ours = bp.BertModel(bp.BertConfig(**TINY)).train(train)
    ours.load_pretrained_state_dict(theirs.state_dict())
    extended = (1.0 - mask[:, None, None, :].float()) * -10000.0
    emb = torch.randn(*ids.shape, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    runs = []
    calls = [(theirs.encoder, extended), (ours.encoder, extended), (theirs.encoder, torch.zeros_like(extended)),
             (ours.encoder, None)]
    for encoder, m in calls:
        torch.manual_seed(9)
        with torch.no_grad():
            runs.append(encoder(emb, m))
    for ref, out in (runs[:2], runs[2:]):
        assert max((a - b).abs().max().item() for a, b in zip(ref, out)) < 1e-5
    with pytest.raises(TypeError, match="AttentionPlan"):
        ours.encoder(emb, "mask")


def test_fast_dropout_is_a_declared_validated_field(tmp_path):
    assert bp.BertConfig(**TINY).fast_dropout is False
    assert "fast_dropout" not in bp.BertConfig(**TINY).to_dict()  # not written unless set
    assert bp.BertConfig(**TINY, fast_dropout=True).fast_dropout is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="BertConfig.fast_dropout must be true or false"):
            bp.BertConfig(**TINY, fast_dropout=bad)
    data = bp.BertConfig(**TINY).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(dict(data, fast_dropout="true")))
    with pytest.raises(ValueError, match="config.json: BertConfig.fast_dropout"):
        bp.BertConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(dict(data, fast_dropout=True)))
    assert bp.BertConfig.from_json_file(tmp_path / "config.json").fast_dropout is True
