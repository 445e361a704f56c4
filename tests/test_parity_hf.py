"""Parity with HF transformers on the same weights, the save_pretrained -> transformers round trip,
and real all-MiniLM-L6-v2 weights. Full tensors, padded positions included.

Masks are 0/1 or absent here: HF reads any value other than 1 as "masked" (it builds its additive mask
with masked_fill), so soft masks mean something else there; their parity is with ppb (test_parity_ppb.py).
"""
import pytest
import torch

import bert_port as bp
from tests.conftest import TINY, make_inputs, scale_weights_

transformers = pytest.importorskip("transformers")

TOL = 1e-5
PADDED_REAL_WEIGHTS_TOL = 1e-4

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "BERT converts MegEngine and TensorFlow checkpoints into PyTorch without either framework.",
    "Zürich's café served crème brûlée; naïve coöperation isn't déjà vu.",
    "def forward(self, x): return torch.tanh(self.dense(x[:, 0]))",
    "北京欢迎你 and 東京 too — emoji 🤖 aside.",
    "short",
]


def tiny_model(cls=bp.BertModel, *args):
    model = cls(bp.BertConfig(**TINY), *args)
    scale_weights_(model)
    return model.eval()


@pytest.mark.parametrize("with_mask", [True, False], ids=["padded", "no-mask"])
def test_bert_model_matches_transformers(tmp_path, with_mask):
    ours = tiny_model()
    ours.save_pretrained(tmp_path)
    hf, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf = hf.eval()
    ids, types, mask = make_inputs()
    mask = mask if with_mask else None
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
        layers, pooled = ours(ids, types, mask)
    for ref_layer, layer in zip(ref.hidden_states[1:], layers):  # HF's [0] is the embedding output
        assert (ref_layer - layer).abs().max() < TOL  # every position, padding included
    assert (ref.pooler_output - pooled).abs().max() < TOL


@pytest.mark.parametrize("ours_cls,hf_name,args", [
    (bp.BertForTokenTagging, "BertForTokenClassification", (4,)),
    (bp.BertForSequenceClassification, "BertForSequenceClassification", (3,)),
    (bp.BertForPreTraining, "BertForPreTraining", ()),
    (bp.BertForQuestionAnswering, "BertForQuestionAnswering", ()),
])
def test_heads_load_in_transformers_unchanged(tmp_path, ours_cls, hf_name, args):
    ours = tiny_model(ours_cls, *args)
    ours.save_pretrained(tmp_path)
    hf, info = getattr(transformers, hf_name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ids, types, mask = make_inputs()
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, token_type_ids=types, attention_mask=mask)
        out = ours(ids, types, mask)
    out = out if isinstance(out, tuple) else (out,)
    ref = [v for v in ref.values() if isinstance(v, torch.Tensor)]
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        assert (r - o).abs().max() < TOL  # every position, padding included


def test_tanh_gelu_alias_is_saved_under_hfs_name(tmp_path):
    model = bp.BertModel(bp.BertConfig(**dict(TINY, hidden_act="gelu_tanh")))
    scale_weights_(model)
    model.eval().save_pretrained(tmp_path)
    hf = transformers.BertModel.from_pretrained(tmp_path).eval()
    assert hf.config.hidden_act == "gelu_new"
    ids, types, mask = make_inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        out = model(ids, types, mask, False)[0]
    assert (ref - out).abs().max() < TOL


def test_save_pretrained_round_trip_is_exact(tmp_path):
    ours = tiny_model(bp.BertForPreTraining)
    ours.save_pretrained(tmp_path)
    back = bp.BertForPreTraining.from_pretrained(tmp_path).eval()
    assert not back.missing_keys and not back.unexpected_keys
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight


def test_real_minilm_weights_match_transformers(minilm_dir):
    tokenizer = transformers.BertTokenizerFast(str(minilm_dir / "vocab.txt"), do_lower_case=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hf = transformers.BertModel.from_pretrained(minilm_dir).eval()
    ours = bp.BertModel.from_pretrained(minilm_dir).eval()
    assert not ours.missing_keys
    with torch.no_grad():
        ref = hf(**batch)
        seq, pooled = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], False)
    real = batch["attention_mask"].bool()
    assert real.sum() < real.numel()  # the batch really is padded
    diff = (ref.last_hidden_state - seq).abs()
    assert diff[real].max() < TOL, diff[real].max()
    # Padded rows of this model are ill-conditioned in fp32: HF's own sdpa and eager attention differ
    # there by 2.8e-5 (ppb vs HF: 4.1e-5), so they are held to what independent implementations share.
    assert diff[~real].max() < PADDED_REAL_WEIGHTS_TOL, diff[~real].max()
    assert (ref.pooler_output - pooled).abs().max() < TOL


def test_real_minilm_ids_match_tokenizer_fast(minilm_dir):
    ours = bp.BertTokenizer.from_pretrained(str(minilm_dir))
    ref = transformers.BertTokenizerFast(str(minilm_dir / "vocab.txt"), do_lower_case=True)
    for text in SENTENCES:
        ids = ours.convert_tokens_to_ids(ours.tokenize(text))
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
