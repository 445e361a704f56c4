"""Jagged input (torch.nested, layout=torch.jagged): the fast path that has no padding to compute.

The reference is independent of the code under test: pytorch_pretrained_bert 0.6.2 on the same
weights, run on the same sequences padded into a (B, S) batch with a mask, read at real tokens.
"""
import pytest
import torch

import bert_port as bp
from bert_port import attention
from tests.conftest import TINY, make_inputs, scale_weights_

ppb = pytest.importorskip("pytorch_pretrained_bert")

TOL = 1e-5


def pair(name, *args, dropout=0.0):
    cfg = dict(TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    theirs = getattr(ppb, name)(ppb.BertConfig(**cfg), *args)
    scale_weights_(theirs)
    ours = getattr(bp, name)(bp.BertConfig(**cfg), *args)
    ours.load_pretrained_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def jag(rows):
    return torch.nested.nested_tensor(rows, layout=torch.jagged)


def split(padded, lengths):
    """A (B, S, ...) tensor -> a jagged tensor of its first lengths[b] rows per sequence."""
    return jag([padded[b, :n] for b, n in enumerate(lengths)])


@pytest.fixture
def batch():
    ids, types, mask = make_inputs(batch=4, seq_len=19)  # lengths 19, 14, 11, 8
    return ids, types, mask, mask.sum(1).tolist()


@pytest.mark.parametrize("with_types", [True, False])
def test_bert_model_jagged_equals_the_padded_computation(batch, with_types):
    ids, types, mask, lengths = batch
    theirs, ours = pair("BertModel")
    types = types if with_types else None
    with torch.no_grad():
        ref_layers, ref_pooled = theirs(ids, types, mask)
        layers, pooled = ours(split(ids, lengths), None if types is None else split(types, lengths))
    assert len(layers) == len(ref_layers) and pooled.shape == ref_pooled.shape == (4, TINY["hidden_size"])
    for ref, layer in zip(ref_layers, layers):
        assert layer.is_nested and layer.layout == torch.jagged and layer.dim() == 3
        rows = layer.unbind()
        assert [tuple(r.shape) for r in rows] == [(n, TINY["hidden_size"]) for n in lengths]
        for b, (row, n) in enumerate(zip(rows, lengths)):  # positions restart at 0 in every sequence
            assert (row - ref[b, :n]).abs().max() < TOL
    assert (pooled - ref_pooled).abs().max() < TOL
    last, _ = ours(split(ids, lengths), output_all_encoded_layers=False)
    assert last.is_nested and last.shape[0] == 4


def test_one_launch_path_equals_the_per_sequence_loop(batch, monkeypatch):
    ids, types, mask, lengths = batch
    _, ours = pair("BertModel")
    with torch.no_grad():
        loop = ours(split(ids, lengths), split(types, lengths), output_all_encoded_layers=False)
        monkeypatch.setattr(attention, "PER_SEQUENCE_DEVICES", ())
        launch = ours(split(ids, lengths), split(types, lengths), output_all_encoded_layers=False)
    assert (loop[0].values() - launch[0].values()).abs().max() < TOL and (loop[1] - launch[1]).abs().max() < TOL


def test_token_tagging_logits_and_loss_with_jagged_labels(batch):
    ids, types, mask, lengths = batch
    theirs, ours = pair("BertForTokenClassification", 5)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 5, ids.shape, generator=g)
    labels[:, 0] = -100  # [CLS] and later word pieces carry no label
    labels[1, 3] = -100
    with torch.no_grad():
        ref_logits, ref_loss = theirs(ids, types, mask), theirs(ids, types, mask, labels)
        logits = ours(split(ids, lengths), split(types, lengths))
        loss = ours(split(ids, lengths), split(types, lengths), labels=split(labels, lengths))
    assert logits.is_nested and logits.shape[0] == 4 and logits.shape[-1] == 5
    for b, (row, n) in enumerate(zip(logits.unbind(), lengths)):
        assert (row - ref_logits[b, :n]).abs().max() < TOL
    assert abs(loss.item() - ref_loss.item()) < TOL * max(1.0, ref_loss.item())


def test_token_tagging_training_gradients_equal_the_padded_computation(batch):
    ids, types, mask, lengths = batch
    theirs, ours = pair("BertForTokenClassification", 5)
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(5))
    theirs.train()(ids, types, mask, labels).backward()
    ours.train()(split(ids, lengths), split(types, lengths), labels=split(labels, lengths)).backward()
    ref = {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None}
    got = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(ref) == set(got)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < TOL
    assert max(g.abs().max().item() for g in ref.values()) > 1e-2


def test_sequence_classification_logits_and_loss(batch):
    ids, types, mask, lengths = batch
    theirs, ours = pair("BertForSequenceClassification", 3)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        ref_logits, ref_loss = theirs(ids, types, mask), theirs(ids, types, mask, labels)
        logits = ours(split(ids, lengths), split(types, lengths))
        loss = ours(split(ids, lengths), split(types, lengths), labels=labels)
    assert logits.shape == (4, 3) and (logits - ref_logits).abs().max() < TOL
    assert abs(loss.item() - ref_loss.item()) < TOL * max(1.0, ref_loss.item())


def test_training_with_dropout_runs_on_real_tokens_only(batch):
    """No ppb call exists for jagged input, so dropout is drawn inside SDPA over real tokens."""
    ids, types, mask, lengths = batch
    _, ours = pair("BertModel", dropout=0.1)
    torch.manual_seed(1)
    layers, pooled = ours.train()(split(ids, lengths))
    pooled.sum().backward()
    values = layers[-1].values()
    assert torch.isfinite(values).all() and values.shape == (sum(lengths), TINY["hidden_size"])
    with torch.no_grad():
        assert (ours.eval()(split(ids, lengths))[1] - pooled).abs().max() > 1e-3  # dropout really drew


def _bad_inputs(ids, types, mask, lengths):
    nt = split(ids, lengths)
    return [
        ("layout torch.strided", dict(input_ids=torch.nested.nested_tensor([ids[0, :3], ids[1, :2]]))),
        ("1-D ids", dict(input_ids=jag([torch.ones(3, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)]))),
        ("without holes", dict(input_ids=torch.nested.nested_tensor_from_jagged(
            ids[0, :6], torch.tensor([0, 3, 6]), lengths=torch.tensor([2, 3])))),
        ("the jagged structure is the mask", dict(input_ids=nt, attention_mask=split(mask, lengths))),
        ("the jagged structure is the mask", dict(input_ids=nt, attention_mask=mask)),
        ("token_type_ids must be a jagged", dict(input_ids=nt, token_type_ids=types)),
        ("token_type_ids must be a jagged", dict(input_ids=nt, token_type_ids=split(types, [n - 1 for n in lengths]))),
        ("sequence 1 is empty", dict(input_ids=jag([ids[0, :3], ids[1, :0]]))),
        ("exceeds max_position_embeddings", dict(input_ids=jag([torch.ones(TINY["max_position_embeddings"] + 1,
                                                                           dtype=torch.long)]))),
        ("integer tensor", dict(input_ids=jag([torch.ones(3), torch.ones(2)]))),
        ("outside [0, 99)", dict(input_ids=jag([torch.tensor([1, 2, 99])]))),
    ]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")  # a strided one, on purpose
def test_clear_errors_for_wrong_jagged_input(batch):
    _, ours = pair("BertModel")
    for message, kwargs in _bad_inputs(*batch):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            ours(**kwargs)


def test_labels_and_heads_that_take_padded_input_only(batch):
    ids, types, mask, lengths = batch
    _, tagger = pair("BertForTokenClassification", 5)
    with pytest.raises(ValueError, match="labels must be a jagged"):
        tagger(split(ids, lengths), labels=torch.zeros_like(ids))
    _, mlm = pair("BertForMaskedLM")
    with pytest.raises(ValueError, match="BertForMaskedLM takes \\(batch, seq_len\\) input_ids"):
        mlm(split(ids, lengths))


def test_next_sentence_prediction_takes_jagged_input(batch):
    ids, types, mask, lengths = batch
    theirs, ours = pair("BertForNextSentencePrediction")
    with torch.no_grad():
        ref, out = theirs(ids, types, mask), ours(split(ids, lengths), split(types, lengths))
    assert (out - ref).abs().max() < TOL


def test_readme_jagged_snippet_runs_and_matches_transformers(minilm_dir):
    """The README's mixed-lengths block, on real MiniLM weights, against HF on the padded batch."""
    import re

    from tests.conftest import ROOT

    transformers = pytest.importorskip("transformers")
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "layout=torch.jagged" in b]
    scope = {}
    exec(compile(block.replace('"bert_port-demo-model"', repr(str(minilm_dir))), "README.md", "exec"), scope)
    lengths = [len(i) for i in scope["ids"]]
    assert [len(t) for t in scope["tags"]] == lengths and len(set(lengths)) == len(lengths)
    input_ids = torch.nn.utils.rnn.pad_sequence(scope["ids"], batch_first=True)
    mask = (torch.arange(input_ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(minilm_dir).eval()(
            input_ids=input_ids, attention_mask=mask).last_hidden_state
    ref = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert (scope["embeddings"] - ref).abs().max() < TOL
