"""bert_port.tokenization against independent implementations.

* HF's Rust tokenizer (`BertTokenizerFast`) is the reference: identical ids on a ~3 MB mixed corpus
  (tests/tokenizer_corpus.py), lower-cased and cased, and identical words for every code point.
* pytorch_pretrained_bert 0.6.2 must agree wherever its rules agree with HF's; every line where
  it differs must contain one of the documented causes (bert_port/tokenization.py docstring).
* Google's tokenization.py is not installed: its three differences are checked on hand-derived
  cases with a tiny vocabulary.
"""
import bisect
import collections
import logging
import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tokenizer_corpus  # noqa: E402

from bert_port import tokenization as T  # noqa: E402
from bert_port.tokenization import BasicTokenizer, BertTokenizer, WordpieceTokenizer, load_vocab  # noqa: E402

transformers = pytest.importorskip("transformers")
ppb = pytest.importorskip("pytorch_pretrained_bert.tokenization")
from tokenizers.normalizers import BertNormalizer  # noqa: E402
from tokenizers.pre_tokenizers import BertPreTokenizer  # noqa: E402

MODES = pytest.mark.parametrize("lower", [True, False], ids=["uncased", "cased"])


@pytest.fixture(scope="module")
def vocab_file(minilm_dir):
    return str(minilm_dir / "vocab.txt")


@pytest.fixture(scope="module")
def lines():
    return tokenizer_corpus.all_lines()


_HF_IDS = {}


def hf_ids(vocab_file, lines, lower):
    """HF's ids for the corpus (Rust batch API; the Python API is checked on a sample below)."""
    if lower not in _HF_IDS:
        backend = transformers.BertTokenizerFast(vocab_file, do_lower_case=lower).backend_tokenizer
        _HF_IDS[lower] = [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)]
    return _HF_IDS[lower]


def _mismatches(ours, ref, lines):
    bad = [i for i in range(len(lines)) if ours[i] != ref[i]]
    return len(bad), [(lines[i][:80], ours[i][:12], ref[i][:12]) for i in bad[:5]]


# --- HF parity -------------------------------------------------------------------------------------
@MODES
def test_ids_match_hf_on_corpus(vocab_file, lines, lower):
    ref = hf_ids(vocab_file, lines, lower)
    tok = BertTokenizer(vocab_file, do_lower_case=lower)
    ours = [tok.convert_tokens_to_ids(tok.tokenize(line)) for line in lines]
    n_bad, examples = _mismatches(ours, ref, lines)
    print(f"\n{'uncased' if lower else 'cased'}: {len(lines)} lines, {sum(map(len, ref))} tokens "
          f"compared with HF BertTokenizerFast, {n_bad} mismatches")
    assert n_bad == 0, examples
    again = [tok.encode(line, add_special_tokens=False) for line in lines]  # id cache path, warm token cache
    assert _mismatches(again, ref, lines)[0] == 0


def test_ids_match_hf_per_section(vocab_file, lines):
    """Each corpus section really is in the comparison (non-trivial token counts)."""
    ref = hf_ids(vocab_file, lines, True)
    start = 0
    for name, section in tokenizer_corpus.corpus().items():
        tokens = sum(len(ids) for ids in ref[start:start + len(section)])
        assert tokens > len(section), name
        start += len(section)
    assert start == len(lines)


def test_python_api_special_tokens_and_pairs_match_hf(vocab_file, lines):
    hf = transformers.BertTokenizerFast(vocab_file)
    tok = BertTokenizer(vocab_file)
    sample = lines[::40]
    assert hf(sample)["input_ids"] == [tok.encode(t) for t in sample]
    plain = [tok.encode(t, add_special_tokens=False) for t in sample]
    assert hf(sample, add_special_tokens=False)["input_ids"] == plain
    pairs = list(zip(sample[::2], sample[1::2]))
    for max_length in (None, 5, 16, 40):
        kw = {"truncation": "longest_first", "max_length": max_length} if max_length else {}
        ref = [hf(a, b, **kw)["input_ids"] for a, b in pairs]
        assert ref == [tok.encode(a, b, max_length=max_length) for a, b in pairs], max_length
        ref = [hf(a, **kw)["input_ids"] for a, _ in pairs]
        assert ref == [tok.encode(a, max_length=max_length) for a, _ in pairs], max_length


def test_tokenize_chinese_chars_false_matches_hf(vocab_file):
    sections = tokenizer_corpus.corpus()
    sample = sections["cjk_kana_hangul"] + sections["every_category"] + sections["special_tokens"]
    for lower in (True, False):
        hf = transformers.BertTokenizerFast(vocab_file, do_lower_case=lower, tokenize_chinese_chars=False)
        ref = [e.ids for e in hf.backend_tokenizer.encode_batch(sample, add_special_tokens=False)]
        tok = BertTokenizer(vocab_file, do_lower_case=lower, tokenize_chinese_chars=False)
        assert _mismatches([tok.encode(t, add_special_tokens=False) for t in sample], ref, sample)[0] == 0


def _code_points():
    """Planes 0-3 and 14 in full; the private-use and unassigned planes 4-13, 15, 16 sampled."""
    cps = list(range(0x40000)) + list(range(0xE0000, 0xE1000)) + list(range(0x40000, 0x110000, 97))
    return [cp for cp in cps if not 0xD800 <= cp <= 0xDFFF]


@MODES
def test_every_code_point_matches_hf_words(lower):
    """BasicTokenizer's words == HF's normaliser + pre-tokenizer, each code point between letters.

    The only allowed difference is documented: letters unknown to this Python's `unicodedata`
    (category Cn) that HF's newer Rust tables lower-case.
    """
    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
    pre = BertPreTokenizer()
    ours = BasicTokenizer(lower, never_split=())

    def hf_words(text):
        return [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]

    def differing(cps):
        text = " ".join("a%sb" % chr(cp) for cp in cps)
        if hf_words(text) == ours.tokenize(text):
            return []
        if len(cps) == 1:
            return cps
        return differing(cps[:len(cps) // 2]) + differing(cps[len(cps) // 2:])

    cps = _code_points()
    bad = [cp for i in range(0, len(cps), 2048) for cp in differing(cps[i:i + 2048])]
    unexplained = [cp for cp in bad if not (unicodedata.category(chr(cp)) == "Cn" and lower
                                            and ours.tokenize("a%sb" % chr(cp)) == ["a%sb" % chr(cp)]
                                            and len(hf_words(chr(cp))) == 1 == len(hf_words(chr(cp))[0])
                                            and hf_words(chr(cp)) != [chr(cp)])]
    print(f"\n{len(cps)} code points compared with HF's normaliser + pre-tokenizer: {len(bad)} differ, "
          f"{len(bad) - len(unexplained)} of them letters unknown to unicodedata {unicodedata.unidata_version} "
          "that HF lower-cases")
    assert not unexplained, [hex(cp) for cp in unexplained[:20]]
    assert len(bad) < 200


@pytest.mark.parametrize("text", [
    "a\u1df6\U0001d165",  # 1DF6 (Unicode 10, class 232) is a class-0 letter to HF's 9.0 NFD: no reordering
    "a\u08d4\U0001d165",  # 08D4 (Unicode 9, class 230) is reordered after 1D165 (class 216)
    "A\u0301\u1df6\u0323\U0001d165\u08d4 x",
    "\u0130STANBUL \u1e9e \u2126",
    "ΑΣ\u3000a\u08d4\U0001d165 ΟΔΟΣ\u00a0\u1df6\U0001d165",  # exact path with word-final capital sigma
])
def test_exact_path_matches_hf(text):
    """Inputs whose characters interact (canonical reordering) take the exact path; still == HF."""
    for lower in (True, False):
        normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower)
        ref = [w for w, _ in BertPreTokenizer().pre_tokenize_str(normalizer.normalize_str(text))]
        assert BasicTokenizer(lower).tokenize(text) == ref


def _perl_ages():
    if shutil.which("perl") is None:
        return None
    script = ('use Unicode::UCD qw(prop_invmap); print Unicode::UCD::UnicodeVersion(), "\\n";'
              'my ($r, $m) = prop_invmap("Age"); print "$r->[$_]\\t$m->[$_]\\n" for 0..$#$r;')
    try:
        out = subprocess.run(["perl", "-e", script], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version, *rows = out.splitlines()
    return version, [int(r.split("\t")[0]) for r in rows], [r.split("\t")[1] for r in rows]


def test_unicode_tables_rederived_from_ucd():
    """_NEW_IN_9 / _NEW_AFTER_9 == what the UCD says (DerivedAge via perl's Unicode::UCD + unicodedata)."""
    ages = _perl_ages()
    if ages is None or ages[0] != unicodedata.unidata_version:
        pytest.skip("needs perl's Unicode::UCD at this Python's Unicode version")
    _, starts, values = ages

    def age(cp):
        value = values[bisect.bisect_right(starts, cp) - 1]
        return (99,) if value == "Unassigned" else tuple(map(int, value.split(".")))

    in_9, after_9 = set(), set()
    for cp in range(0x110000):
        c = chr(cp)
        cat = unicodedata.category(c)
        if cat in ("Cn", "Cs") or age(cp) <= (8, 0):
            continue
        matters = cat[0] == "P" or cat in ("Mn", "Cf")
        if age(cp) == (9, 0) and matters:
            in_9.add(cp)
        elif age(cp) > (9, 0) and (matters or unicodedata.combining(c)
                                   or unicodedata.decomposition(c)[:1] not in ("", "<")):
            after_9.add(cp)
    known = {cp for cp in T._AFTER_8 if unicodedata.category(chr(cp)) != "Cn"}
    assert known - T._AFTER_9 == in_9
    assert known & T._AFTER_9 == after_9


# --- pytorch_pretrained_bert ------------------------------------------------------------------------
def _ppb_difference_causes(line, lower, ppb_basic):
    causes = set()
    for c in line:
        cp = ord(c)
        if unicodedata.category(c) == "Cn":
            causes.add("unassigned (ppb drops Cn)")
        if cp in T._AFTER_8 or cp in T._UNICODE8_CATEGORY:
            causes.add("Unicode 8/9 tables")
        if 0x2B820 <= cp <= 0x2B91F:
            causes.add("CJK range")
        if lower and c == "\u03a3":
            causes.add("final sigma")
    if any(s in line or s in ppb_basic._clean_text(line) for s in T.SPECIAL_TOKENS):
        causes.add("special tokens")
    return causes


@MODES
def test_ppb_agrees_except_documented_differences(vocab_file, lines, lower):
    ref = ppb.BertTokenizer(vocab_file, do_lower_case=lower)
    tok = BertTokenizer(vocab_file, do_lower_case=lower)
    counts, unexplained, n_tokens = collections.Counter(), [], 0
    for line in lines:
        theirs = ref.convert_tokens_to_ids(ref.tokenize(line))
        n_tokens += len(theirs)
        if tok.encode(line, add_special_tokens=False) != theirs:
            causes = _ppb_difference_causes(line, lower, ref.basic_tokenizer)
            counts.update(causes)
            if not causes:
                unexplained.append(line)
    print(f"\nppb ({'uncased' if lower else 'cased'}): {len(lines)} lines, {n_tokens} tokens; "
          f"lines differing by cause: {dict(counts)}")
    assert not unexplained, unexplained[:5]


def test_documented_differences_ppb_vs_hf(vocab_file):
    """Each difference, with both references: ours == HF."""
    hf = transformers.BertTokenizerFast(vocab_file)
    old = ppb.BertTokenizer(vocab_file)
    tok = BertTokenizer(vocab_file)
    cases = {
        "a[CLS]b": (["a", "[CLS]", "b"], ["a", "[", "cl", "##s", "]", "b"]),
        "[CL\x00S]": (["[", "cl", "##s", "]"], ["[CLS]"]),
        "x\u0378y": (["[UNK]"], ["x", "##y"]),  # unassigned code point
        "ΟΔΟΣ": (["ο", "##δ", "##ο", "##σ"], ["ο", "##δ", "##ος"]),  # final sigma
        "x\u061dy": (["[UNK]"], ["x", "[UNK]", "y"]),  # Po since Unicode 14: a letter to HF
    }
    for text, (hf_tokens, ppb_tokens) in cases.items():
        assert hf.tokenize(text) == hf_tokens, text
        assert old.tokenize(text) == ppb_tokens, text
        assert tok.tokenize(text) == hf_tokens, text
    # CJK extension block U+2B820..2B91F: split by ppb/Google, not by HF
    text = "a\U0002b820b"
    assert old.basic_tokenizer.tokenize(text) == ["a", "\U0002b820", "b"]
    backend = hf.backend_tokenizer
    hf_words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
    assert tok.basic_tokenizer.tokenize(text) == [text] == hf_words


def test_wordpiece_only_mode_matches_ppb(vocab_file, lines):
    old = ppb.BertTokenizer(vocab_file, do_basic_tokenize=False)
    tok = BertTokenizer(vocab_file, do_basic_tokenize=False)
    sample = tokenizer_corpus.corpus()["prose"][:3000]
    assert [tok.tokenize(t) for t in sample] == [old.tokenize(t) for t in sample]


def test_components_match_ppb_on_prose(vocab_file):
    vocab = load_vocab(vocab_file)
    assert vocab == ppb.load_vocab(vocab_file)
    sample = tokenizer_corpus.corpus()["prose"][:3000]
    basic, old_basic = BasicTokenizer(), ppb.BasicTokenizer()
    assert [basic.tokenize(t) for t in sample] == [old_basic.tokenize(t) for t in sample]
    words = [w for t in sample for w in old_basic.tokenize(t)]
    wp, old_wp = WordpieceTokenizer(vocab), ppb.WordpieceTokenizer(vocab)
    assert [wp.tokenize(w) for w in words] == [old_wp.tokenize(w) for w in words]


# --- Google mode (hand-derived expectations, tiny vocabulary) --------------------------------------
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[", "]", "cls", "sep", "x", "##x", "ο", "##δ",
              "##ο", "##ς", "##σ", "a", "b"]


@pytest.fixture
def tiny_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return str(path)


def test_google_control_categories(tiny_vocab):
    # Co U+E000, Cn U+0378, Cf U+200B, Cc U+0085 inside "xx". Google drops Cc/Cf only; HF also Co;
    # ppb every C*. A kept unknown character makes its word [UNK].
    text = "x\ue000x x\u0378x x\u200bx x\x85x"
    google = BertTokenizer(tiny_vocab, google_compat=True)
    assert google.tokenize(text) == ["[UNK]", "[UNK]", "x", "##x", "x", "##x"]
    ours = BertTokenizer(tiny_vocab)
    expected_hf = ["x", "##x", "[UNK]", "x", "##x", "x", "##x"]
    assert ours.tokenize(text) == expected_hf == transformers.BertTokenizerFast(tiny_vocab).tokenize(text)
    assert ppb.BertTokenizer(tiny_vocab).tokenize(text) == ["x", "##x"] * 4


def test_google_splits_special_tokens(tiny_vocab):
    text = "[CLS] x [SEP]"
    assert BertTokenizer(tiny_vocab, google_compat=True).tokenize(text) == ["[", "cls", "]", "x", "[", "sep", "]"]
    assert BertTokenizer(tiny_vocab).tokenize(text) == ["[CLS]", "x", "[SEP]"]
    assert BertTokenizer(tiny_vocab, do_lower_case=False, google_compat=True).tokenize("[CLS]") == ["[", "[UNK]", "]"]


def test_google_word_limit_200(tiny_vocab):
    google, ours = BertTokenizer(tiny_vocab, google_compat=True), BertTokenizer(tiny_vocab)
    for n in (100, 150, 200, 201):
        word = "x" * n
        expected = ["x"] + ["##x"] * (n - 1)
        assert google.tokenize(word) == (expected if n <= 200 else ["[UNK]"]), n
        assert ours.tokenize(word) == (expected if n <= 100 else ["[UNK]"]), n
    assert ours.tokenize("x" * 101) == ["[UNK]"]


def _google_is_control(char):
    """Google's tokenization.py _is_control (tensorflow.md §1.3): Cc/Cf only, not \\t \\n \\r."""
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf")


@MODES
def test_google_mode_matches_ppb_patched_to_google_rules(vocab_file, monkeypatch, lower):
    """ppb's code is Google's algorithm but for the three documented rules: patch them back in
    (Cc/Cf control set, no never_split, 200-char words) and compare on the non-prose corpus."""
    monkeypatch.setattr(ppb, "_is_control", _google_is_control)
    ref = ppb.BertTokenizer(vocab_file, do_lower_case=lower, never_split=())
    ref.wordpiece_tokenizer.max_input_chars_per_word = 200
    tok = BertTokenizer(vocab_file, do_lower_case=lower, google_compat=True)
    sample = [line for name, lines in tokenizer_corpus.corpus().items() if name != "prose" for line in lines]
    theirs = [ref.convert_tokens_to_ids(ref.tokenize(t)) for t in sample]
    n_bad, examples = _mismatches([tok.encode(t, add_special_tokens=False) for t in sample], theirs, sample)
    print(f"\ngoogle_compat ({'uncased' if lower else 'cased'}): {len(sample)} lines, "
          f"{sum(map(len, theirs))} tokens compared with Google-patched ppb, {n_bad} mismatches")
    assert n_bad == 0, examples


def test_google_unicode_rules(tiny_vocab):
    google = BertTokenizer(tiny_vocab, google_compat=True).basic_tokenizer
    assert google.tokenize("ΟΔΟΣ ΑΣ.") == ["οδος", "ας", "."]  # str.lower(): final sigma
    # ... decided on the whole word, across case-ignorable punctuation
    assert google.tokenize("ΑΣ.Β a'Σ Σ") == ["ασ", ".", "β", "a", "'", "ς", "σ"]
    assert google.tokenize("a\U0002b820b") == ["a", "\U0002b820", "b"]  # Google's CJK range
    assert google.tokenize("x\u061dy") == ["x", "\u061d", "y"]  # this Python's categories (Po)
    assert google.tokenize("x\ud800y") == ["x\ud800y"]  # a surrogate is Cs, not Cc/Cf: kept
    assert BertTokenizer(tiny_vocab).basic_tokenizer.tokenize("x\ud800y") == ["xy"]


# --- interface -------------------------------------------------------------------------------------
def test_ids_tokens_inverse_and_unknown(vocab_file):
    tok = BertTokenizer(vocab_file)
    vocab = load_vocab(vocab_file)
    tokens = list(vocab)
    assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(tokens)) == tokens
    unk = vocab["[UNK]"]
    assert tok.convert_tokens_to_ids(["hello", "not-a-token!", "##zzzq"]) == [vocab["hello"], unk, unk]
    assert tok.convert_ids_to_tokens(np.array([101, 102])) == ["[CLS]", "[SEP]"]
    assert tok.convert_ids_to_tokens(torch.tensor([7592])) == ["hello"]
    assert len(tok) == tok.vocab_size == 30522
    for bad in (-1, 30522, 10 ** 12):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.convert_ids_to_tokens([0, bad])
    with pytest.raises(TypeError):
        tok.convert_ids_to_tokens([1.5])


def test_max_len_warns_without_truncating(vocab_file, caplog):
    tok = BertTokenizer(vocab_file, max_len=5)
    tokens = tok.tokenize("one two three four five six seven")
    with caplog.at_level(logging.WARNING, logger="bert_port.tokenization"):
        ids = tok.convert_tokens_to_ids(tokens)
    assert len(ids) == 7 and "longer than the specified maximum" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bert_port.tokenization"):
        assert len(tok.encode("one two three four five six seven", max_length=5)) == 5
    assert caplog.text == ""
    with pytest.raises(ValueError):
        tok.encode("x", "y", max_length=2)


def test_save_vocabulary_round_trip(vocab_file, tmp_path):
    tok = BertTokenizer(vocab_file)
    out = tok.save_vocabulary(str(tmp_path))
    assert out == str(tmp_path / "vocab.txt")
    with open(vocab_file, encoding="utf-8") as a, open(out, encoding="utf-8") as b:
        assert a.read().splitlines() == b.read().splitlines()
    out2 = tok.save_vocabulary(str(tmp_path / "my_vocab.txt"))
    assert out2.endswith("my_vocab.txt") and load_vocab(out2) == tok.vocab
    again = BertTokenizer.from_pretrained(str(tmp_path))
    assert again.vocab == tok.vocab and again.tokenize("Héllo, World!") == tok.tokenize("Héllo, World!")


def test_from_pretrained_dir_file_and_errors(minilm_dir, vocab_file, tmp_path):
    from_dir = BertTokenizer.from_pretrained(str(minilm_dir))  # HF layout: tokenizer_config.json read
    assert from_dir.do_lower_case is True and from_dir.max_len == 512
    from_file = BertTokenizer.from_pretrained(vocab_file, do_lower_case=False)
    assert from_file.do_lower_case is False and from_file.tokenize("Hello") == ["[UNK]"]
    assert BertTokenizer.from_pretrained(vocab_file).tokenize("Hello") == ["hello"]
    with pytest.raises(ValueError, match="vocab.txt"):
        BertTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no-such-model-xyz"):
        BertTokenizer.from_pretrained("no-such-model-xyz")
    with pytest.raises(ValueError, match="Can't find a vocabulary file"):
        BertTokenizer(str(tmp_path / "missing.txt"))


def test_never_split_custom_tokens(vocab_file):
    tok = BertTokenizer(vocab_file, never_split=("[CLS]", "hello", "<Foo>"))
    pieces = tok.wordpiece_tokenizer.word_pieces
    assert tok.tokenize("xHelloy xhelloy") == list(pieces("xhelloy")) + ["x", "hello", "y"]  # raw, case-sensitive
    assert tok.basic_tokenizer.tokenize("a<Foo>b <foo>") == ["a", "<Foo>", "b", "<", "foo", ">"]
    assert tok.tokenize("[SEP]") == ["[", "sep", "]"]  # not protected any more
    assert BertTokenizer(vocab_file, never_split=None).tokenize("[CLS]") == ["[", "cl", "##s", "]"]


def test_bytes_and_type_errors(vocab_file):
    tok = BertTokenizer(vocab_file)
    assert tok.tokenize("café".encode()) == tok.tokenize("café")
    assert tok.tokenize(b"caf\xff\xfe") == ["caf"]
    with pytest.raises(TypeError):
        tok.tokenize(None)


def test_cache_is_bounded_and_transparent(vocab_file, lines):
    sample = lines[::7]
    small = BertTokenizer(vocab_file, cache_size=256)
    big = BertTokenizer(vocab_file)
    first = [small.tokenize(t) for t in sample]
    assert first == [small.tokenize(t) for t in sample] == [big.tokenize(t) for t in sample]
    assert 0 < len(small._pieces) <= 256
