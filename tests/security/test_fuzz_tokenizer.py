"""Property tests: arbitrary Unicode (surrogates, controls, combining marks, long inputs) and bytes.

No exception except the documented TypeError (non-text input) and ValueError (bad ids); ids stay
inside the vocabulary; tokens round-trip through ids; and (surrogate-free text) ids equal HF's.
`BERT_PORT_FUZZ=long` runs 50x more examples.
"""
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bert_port.tokenization import BertTokenizer

transformers = pytest.importorskip("transformers")

LONG = os.environ.get("BERT_PORT_FUZZ") == "long"
FUZZ = settings(max_examples=15000 if LONG else 300, deadline=2000,  # ms per example
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

any_char = st.characters(blacklist_categories=())  # everything, lone surrogates included
interesting = st.sampled_from(list("\x00\t\n\r\x0b\x85\u00a0\u200b\u200d\u2028\ufeff\ufffd\u0301\u0323\u1df6"
                                   "\u08d4\U0001d165ΣΟİ[]CLS#.'!a Z日本\u061d\U0002b820\ue000\u0378")
                              + ["[CLS]", "[SEP]", "[MASK]"])
texts = st.one_of(
    st.text(alphabet=any_char, max_size=200),
    st.lists(st.one_of(interesting, st.text(alphabet=any_char, max_size=3)), max_size=60).map("".join),
    st.text(alphabet=st.sampled_from("ab\u0301 Σ.日"), min_size=90, max_size=5000),  # long words, long inputs
)


@pytest.fixture(scope="module")
def tokenizers(minilm_dir):
    vocab = str(minilm_dir / "vocab.txt")
    return [BertTokenizer(vocab, do_lower_case=lower, google_compat=google, cache_size=4096)
            for lower in (True, False) for google in (False, True)]


@FUZZ
@given(text=texts)
def test_arbitrary_text(tokenizers, text):
    for tok in tokenizers:
        tokens = tok.tokenize(text)
        ids = tok.convert_tokens_to_ids(tokens)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.convert_ids_to_tokens(ids) == tokens  # every token produced is in the vocabulary
        assert tok.encode(text, add_special_tokens=False) == ids
        full = tok.encode(text, text, max_length=64)
        assert len(full) <= 64 and full[0] == tok.vocab["[CLS]"] and full[-1] == tok.vocab["[SEP]"]


@FUZZ
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(tokenizers, data):
    for tok in tokenizers:
        assert tok.tokenize(data) == tok.tokenize(data.decode("utf-8", "ignore"))


@FUZZ
@given(ids=st.lists(st.integers(min_value=-2**40, max_value=2**40), max_size=20))
def test_arbitrary_ids(tokenizers, ids):
    tok = tokenizers[0]
    if all(0 <= i < tok.vocab_size for i in ids):
        assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids
    else:
        with pytest.raises(ValueError):
            tok.convert_ids_to_tokens(ids)


@pytest.fixture(scope="module")
def hf_pair(minilm_dir):
    vocab = str(minilm_dir / "vocab.txt")
    return [(BertTokenizer(vocab, do_lower_case=lower, cache_size=4096),
             transformers.BertTokenizerFast(vocab, do_lower_case=lower)) for lower in (True, False)]


@FUZZ
@given(text=texts)
def test_ids_equal_hf(hf_pair, text):
    """Differential: same ids as HF (its Rust side cannot take surrogates; the documented gap,
    letters unknown to this Python's unicodedata that HF lower-cases, is skipped)."""
    text = "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)
    for ours, hf in hf_pair:
        normalize = hf.backend_tokenizer.normalizer.normalize_str
        if hf.do_lower_case and any(unicodedata.category(c) == "Cn" and normalize(c) != c for c in text):
            continue
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("bad", [None, 3, 1.5, ["a"], object()])
def test_non_text_is_a_type_error(tokenizers, bad):
    with pytest.raises(TypeError):
        tokenizers[0].tokenize(bad)
