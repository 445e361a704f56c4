"""Parity with pytorch_pretrained_bert 0.6.2 (an independent implementation) on the same weights.

Full tensors are compared, padded positions included: ppb's values at every position are the contract.
"""
import pytest
import torch

import bert_port as bp
from tests.conftest import TINY, make_inputs, scale_weights_

ppb = pytest.importorskip("pytorch_pretrained_bert")

TOL = 1e-5


def pair(ppb_cls, our_cls, *args, dropout: float = 0.1, **cfg_overrides):
    """The same scaled random weights in a ppb model and in ours (loaded through our key mapping)."""
    cfg = dict(TINY, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **cfg_overrides)
    torch.manual_seed(0)
    theirs = ppb_cls(ppb.BertConfig(**cfg), *args)
    scale_weights_(theirs)
    ours = our_cls(bp.BertConfig(**cfg), *args)
    ours.load_pretrained_state_dict(theirs.state_dict())
    assert not ours.missing_keys and not ours.unexpected_keys
    return theirs.eval(), ours.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


def soft(mask, seed=7):
    """A soft mask: 0 at padding, 1 at some real tokens, 0.998-1 at the others (additive -20..0: well
    conditioned in fp32; far-from-1 values make ppb's own result depend on summation order at ~1e-4)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(mask.shape, generator=g)
    return mask.float() * torch.where(r < 0.4, torch.ones_like(r), 1 - 0.002 * r)


MASKS = {"padded": lambda m: m, "soft": soft, "none": lambda m: None}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
def test_encoder_every_layer_and_pooled_at_every_position(mask_kind, train):
    """Padding included, in eval and in train mode (dropout 0.1: the same random stream under one seed)."""
    theirs, ours = pair(ppb.BertModel, bp.BertModel)
    theirs.train(train), ours.train(train)
    ids, types, mask = make_inputs()
    mask = MASKS[mask_kind](mask)
    with torch.no_grad():
        torch.manual_seed(11)
        ref_layers, ref_pooled = theirs(ids, types, mask)
        torch.manual_seed(11)
        layers, pooled = ours(ids, types, mask)
    assert len(layers) == len(ref_layers) == TINY["num_hidden_layers"]
    for ref, out in zip(ref_layers, layers):
        assert out.shape == ref.shape
        assert max_diff(ref, out) < TOL
        assert out.abs().max() > 1.0  # scaled weights: a real signal, not ~0
    if mask is not None:
        assert layers[-1][mask == 0].abs().min() > 0  # padded positions computed, as the reference does
    assert max_diff(ref_pooled, pooled) < TOL


def test_defaults_and_last_layer_only():
    theirs, ours = pair(ppb.BertModel, bp.BertModel)
    ids, _, _ = make_inputs()
    with torch.no_grad():
        ref, ref_pooled = theirs(ids, output_all_encoded_layers=False)
        out, pooled = ours(ids, output_all_encoded_layers=False)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape
    assert (ref - out).abs().max() < TOL and (ref_pooled - pooled).abs().max() < TOL


def test_skip_padding_is_an_opt_in_that_zeroes_padded_rows():
    theirs, ours = pair(ppb.BertModel, bp.BertModel)
    ids, types, mask = make_inputs()
    with torch.no_grad():
        ref, ref_pooled = theirs(ids, types, mask, output_all_encoded_layers=False)
        skipped, pooled = ours(ids, types, mask, output_all_encoded_layers=False, skip_padding=True)
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            alone, _ = ours(ids[row:row + 1, :n], types[row:row + 1, :n], output_all_encoded_layers=False)
            assert (alone[0] - skipped[row, :n]).abs().max() < TOL
    real = mask.bool()
    assert max_diff(ref[real], skipped[real]) < TOL and max_diff(ref_pooled, pooled) < TOL
    assert skipped[~real].abs().max() == 0 and ref[~real].abs().min() > 0  # zeros only by the opt-in


def test_train_mode_with_dropout_draws_and_computes_as_the_reference():
    """Dropout active (train mode): the reference's ops in its order, so the same seed gives the same
    masks and the same outputs (the attention scores' scale included)."""
    theirs, ours = pair(ppb.BertModel, bp.BertModel)
    theirs.train(), ours.train()
    ids, types, mask = make_inputs()
    with torch.no_grad():
        torch.manual_seed(5)
        ref, ref_pooled = theirs(ids, types, mask, output_all_encoded_layers=False)
        torch.manual_seed(5)
        out, pooled = ours(ids, types, mask, output_all_encoded_layers=False)
    assert max_diff(ref, out) < TOL and (ref_pooled - pooled).abs().max() < TOL


def test_a_soft_mask_is_added_as_the_reference_adds_it():
    """Fractional mask values scale the reference's -10000: (1 - 0.9995) * -10000 = -5 on a score."""
    theirs, ours = pair(ppb.BertModel, bp.BertModel)
    ids, types, mask = make_inputs()
    soft = mask.float()
    soft[0, 2:6] = 0.9995
    with torch.no_grad():
        ref, ref_pooled = theirs(ids, types, soft, output_all_encoded_layers=False)
        out, pooled = ours(ids, types, soft, output_all_encoded_layers=False)
        plain, _ = ours(ids, types, mask, output_all_encoded_layers=False)
    assert max_diff(ref, out) < TOL and (ref_pooled - pooled).abs().max() < TOL
    assert max_diff(plain, out) > 30 * TOL  # the soft values matter


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_parity_would_catch_a_wrong_activation(act):
    """The test weights are large enough that the GELU variant matters by far more than TOL."""
    theirs, _ = pair(ppb.BertModel, bp.BertModel)
    wrong = bp.BertModel(bp.BertConfig(**dict(TINY, hidden_act=act)))
    wrong.load_pretrained_state_dict(theirs.state_dict())
    ids, types, mask = make_inputs()
    with torch.no_grad():
        ref, _ = theirs(ids, types, mask, output_all_encoded_layers=False)
        out, _ = wrong.eval()(ids, types, mask, output_all_encoded_layers=False)
    assert max_diff(ref, out) > 30 * TOL


def test_parity_would_catch_a_wrong_layernorm_eps():
    theirs, _ = pair(ppb.BertModel, bp.BertModel)
    with torch.no_grad():  # word rows with a tiny spread: LayerNorm sees variance ~1e-6
        theirs.embeddings.word_embeddings.weight[5:9] *= 1e-3
        theirs.embeddings.position_embeddings.weight.mul_(1e-3)
        theirs.embeddings.token_type_embeddings.weight.mul_(1e-3)
    wrong = bp.BertModel(bp.BertConfig(**dict(TINY, layer_norm_eps=1e-5)))
    right = bp.BertModel(bp.BertConfig(**TINY))
    wrong.load_pretrained_state_dict(theirs.state_dict())
    right.load_pretrained_state_dict(theirs.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 5, 6]])
    with torch.no_grad():
        ref, _ = theirs(ids, output_all_encoded_layers=False)
        assert (ref - right.eval()(ids, output_all_encoded_layers=False)[0]).abs().max() < TOL
        assert (ref - wrong.eval()(ids, output_all_encoded_layers=False)[0]).abs().max() > 100 * TOL


def _head_cases():
    ids, types, mask = make_inputs()
    B, S = ids.shape
    g = torch.Generator().manual_seed(3)
    mlm = torch.full((B, S), -1, dtype=torch.long)
    mlm[:, 1:S:3] = torch.randint(0, 99, (B, len(range(1, S, 3))), generator=g)
    mlm[mask == 0] = -1  # nobody labels padding (and the reference's hidden states there are arbitrary)
    tags = torch.randint(0, 5, (B, S), generator=g)
    tags[:, 0] = -100
    choice_ids = ids[:2].unsqueeze(0).repeat(2, 1, 1)  # (B=2, C=2, S)
    return [
        ("BertForPreTraining", (), (ids, types, mask), dict(masked_lm_labels=mlm, next_sentence_label=torch.tensor([0, 1, 0]))),
        ("BertForMaskedLM", (), (ids, types, mask), dict(masked_lm_labels=mlm)),
        ("BertForNextSentencePrediction", (), (ids, types, mask), dict(next_sentence_label=torch.tensor([1, 0, -1]))),
        ("BertForSequenceClassification", (3,), (ids, types, mask), dict(labels=torch.tensor([0, 2, 1]))),
        ("BertForTokenClassification", (5,), (ids, types, mask), dict(labels=tags)),
        ("BertForMultipleChoice", (2,), (choice_ids, types[:2].unsqueeze(0).repeat(2, 1, 1),
                                         mask[:2].unsqueeze(0).repeat(2, 1, 1)), dict(labels=torch.tensor([1, 0]))),
        ("BertForQuestionAnswering", (), (ids, types, mask),
         dict(start_positions=torch.tensor([1, 3, 40]), end_positions=torch.tensor([S - 1, 5, 6]))),  # S-1: a real target
    ]


def _seeded(model, *args, **kwargs):
    torch.manual_seed(23)  # the same dropout draws for both models in train mode
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("name,args,inputs,labels", _head_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_heads_logits_and_losses_at_every_position(name, args, inputs, labels, mask_kind, train):
    """Every output tensor in full (padded positions included) and every loss, eval and train (dropout 0.1)."""
    theirs, ours = pair(getattr(ppb, name), getattr(bp, name), *args)
    theirs.train(train), ours.train(train)
    inputs = (*inputs[:2], MASKS[mask_kind](inputs[2]))
    ref_out, out = _seeded(theirs, *inputs), _seeded(ours, *inputs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    out = out if isinstance(out, tuple) else (out,)
    for r, o in zip(ref_out, out):
        assert r.shape == o.shape
        assert max_diff(r, o) < TOL
    ref_loss, loss = _seeded(theirs, *inputs, **labels), _seeded(ours, *inputs, **labels)
    assert loss.shape == ref_loss.shape == ()
    assert abs(loss.item() - ref_loss.item()) < TOL * max(1.0, abs(ref_loss.item()))


@pytest.mark.parametrize("name,args,labels_key", [
    ("BertForTokenClassification", (5,), "labels"),
    ("BertForSequenceClassification", (3,), "labels"),
    ("BertForMaskedLM", (), "masked_lm_labels"),
])
def test_one_training_step_gradients(name, args, labels_key):
    theirs, ours = pair(getattr(ppb, name), getattr(bp, name), *args, dropout=0.0)
    theirs.train(), ours.train()
    ids, types, mask = make_inputs()
    labels = {c[0]: c[3] for c in _head_cases()}[name][labels_key]
    theirs(ids, types, mask, labels).backward()
    ours(ids, types, mask, labels).backward()
    ref = {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None}
    got = {k: p.grad for k, p in ours.named_parameters() if p.grad is not None}
    assert set(ref) == set(got)
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst < TOL, worst
    assert max(g.abs().max().item() for g in ref.values()) > 1e-2  # gradients are not trivially ~0
