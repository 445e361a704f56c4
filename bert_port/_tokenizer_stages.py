"""BERT's two tokenization stages below BertTokenizer: the basic tokenizer (text -> words) with its
character rules, in HF `tokenizers`' flavour or Google's, and WordPiece (word -> pieces).

Which code points count as control, whitespace, punctuation or CJK, how text is normalised
(NFD, accents, case), and the per-character translation table that makes the common case one
`str.translate`. Why HF's rules differ from pytorch_pretrained_bert's and Google's: the docstring
of `bert_port.tokenization`, which re-exports both classes under pytorch_pretrained_bert's names.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Dict, Iterable, List, Optional, Tuple, Union

# --- Unicode tables of HF tokenizers (see module docstring) -------------------------------------
# Code points whose category is P*, Mn or Cf (or that decompose / combine) in current Unicode but
# that did not exist in Unicode 8.0, so HF's category tables see them as unassigned (a letter).
# Derived from the UCD (DerivedAge + UnicodeData); tests/test_tokenization.py re-derives them.
_NEW_IN_9 = (  # assigned in Unicode 9.0: HF's NFD (9.0) knows their combining class
    "8D4-8E2 1DFB 2E43-2E44 A8C5 1123E 11438-1143F 11442-11444 11446 1144B-1144F 1145B 1145D "
    "11660-1166C 11C30-11C36 11C38-11C3D 11C3F 11C41-11C45 11C70-11C71 11C92-11CA7 11CAA-11CB0 "
    "11CB2-11CB3 11CB5-11CB6 1E000-1E006 1E008-1E018 1E01B-1E021 1E023-1E024 1E026-1E02A "
    "1E944-1E94A 1E95E-1E95F")
_NEW_AFTER_9 = (  # assigned after 9.0: unknown to HF's categories and NFD (combining class 0)
    "5C8-5C9 61D 7FD 890-891 897-89F 8CA-8D3 9FD-9FE A76 AFA-AFF B53-B55 C04 C3C C77 C84 D00 "
    "D3B-D3C D81 EBA ECE 1715 180F 1ABF-1AF0 1B4E-1B4F 1B7D-1B7F 1DF6-1DFA 2E45-2E4F 2E52-2E5D "
    "2E60-2E63 A82C A8FF 10D24-10D27 10D69-10D6E 10EAB-10EAD 10ECB-10ED0 10EF0-10EFF 10F46-10F50 "
    "10F55-10F59 10F82-10F89 11070 11073-11074 110C2 110CD 111CF 11241 1133B 113BB-113C0 113CE "
    "113D0 113D2 113D4-113D5 113D7-113D8 113E1-113E2 1145A 1145E 116B9 1182F-11837 11839-1183B "
    "11938 1193B-1193E 11943-11946 119D4-119D7 119DA-119DB 119E0 119E2 11A01-11A0A 11A33-11A38 "
    "11A3B-11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A9C 11A9E-11AA2 11B00-11B09 11B60 "
    "11B62-11B64 11B66 11BE1 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47 11D90-11D91 11D95 "
    "11D97 11DF0 11EF3-11EF4 11EF7-11EF8 11F00-11F01 11F36-11F3A 11F40 11F42-11F4F 11F5A 11FFF "
    "12FF1-12FF2 13430-13440 13447-13455 1611E-16129 1612D-1612F 16D6D-16D6F 16E97-16E9A 16F4F "
    "16FE2 16FE4 16FF0-16FF1 1CF00-1CF2D 1CF30-1CF46 1D127-1D128 1D25B-1D25C 1E08F 1E130-1E136 "
    "1E2AE 1E2EC-1E2EF 1E4EC-1E4EF 1E5EE-1E5EF 1E5FF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5")
# Unicode 8.0 categories of code points re-categorised since (9.0: 1885/6, 111C9; 12.0: 166D,
# A9BD; 14.0: 1734).
_UNICODE8_CATEGORY = {0x166D: "Po", 0x111C9: "Po", 0x1885: "Lo", 0x1886: "Lo", 0xA9BD: "Mc", 0x1734: "Mn"}


def _parse_ranges(spec: str) -> frozenset:
    cps = set()
    for item in spec.split():
        lo, _, hi = item.partition("-")
        cps.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return frozenset(cps)


_AFTER_9 = _parse_ranges(_NEW_AFTER_9)
_AFTER_8 = _AFTER_9 | _parse_ranges(_NEW_IN_9)

_CJK_HF = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
           (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CJK_GOOGLE = _CJK_HF[:5] + ((0x2B820, 0x2CEAF),) + _CJK_HF[6:]
_ASCII_PUNCT = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
# An ASCII word, one ASCII punctuation mark, or a run holding non-ASCII characters (handled later).
_CHUNK_RE = re.compile("[^\t\n\r %s]+|[%s]" % ((re.escape(_ASCII_PUNCT),) * 2))
_ASCII_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PLAIN, _SPECIAL, _EXACT = range(3)  # kinds of text segment


class _Rules:
    """What differs between HF's rules (default) and Google's tokenization.py."""

    def __init__(self, google: bool) -> None:
        self.google = google
        self.cjk = _CJK_GOOGLE if google else _CJK_HF
        self.dropped = ("Cc", "Cf") if google else ("Cc", "Cf", "Co", "Cs")

    def category(self, c: str) -> str:
        if self.google:
            return unicodedata.category(c)
        cp = ord(c)
        if cp in _AFTER_8:
            return "Cn"
        return _UNICODE8_CATEGORY.get(cp) or unicodedata.category(c)

    def combining(self, c: str) -> int:
        return 0 if not self.google and ord(c) in _AFTER_9 else unicodedata.combining(c)

    def is_punct(self, c: str) -> bool:
        return c in _ASCII_PUNCT or self.category(c)[0] == "P"

    def clean(self, c: str, chinese: bool = True) -> Optional[str]:
        """Drop controls, whitespace -> " ", pad CJK ideographs (before any normalisation)."""
        cp = ord(c)
        if cp == 0 or cp == 0xFFFD or (c not in "\t\n\r" and self.category(c) in self.dropped):
            return None
        if c.isspace():  # == Rust's White_Space and Google's set once the controls above are gone
            return " "
        if chinese and any(lo <= cp <= hi for lo, hi in self.cjk):
            return " " + c + " "
        return c

    def nfd(self, s: str) -> str:
        """NFD with HF's (Unicode 9.0) view of which characters decompose and combine."""
        if self.google:
            return unicodedata.normalize("NFD", s)
        chars = [x for c in s for x in (c if ord(c) in _AFTER_9 else unicodedata.normalize("NFD", c))]
        i = 0
        while i < len(chars):  # canonical ordering: stable sort of each run of non-starters
            j = i
            while j < len(chars) and self.combining(chars[j]):
                j += 1
            if j - i > 1:
                chars[i:j] = sorted(chars[i:j], key=self.combining)
            i = j + 1
        return "".join(chars)

    def normalize(self, s: str, lower: bool) -> str:
        """Accent stripping + lower-casing, in the order (and casing rules) of each reference."""
        if not lower:
            return s
        if self.google:
            s = s.lower()  # str.lower(): context-dependent final sigma
        s = "".join(c for c in self.nfd(s) if self.category(c) != "Mn")
        return s if self.google else "".join(c.lower() for c in s)  # HF: per char


class _CharTable(dict):
    """str.translate table computed lazily per code point: the per-character fast path.

    Maps a character to None (dropped), " " (whitespace) or its normalised form with punctuation
    and CJK ideographs padded by spaces, so that `text.translate(table).split()` gives the words.
    Characters whose result depends on their neighbours are recorded in `context`.
    """

    def __init__(self, rules: _Rules, lower: bool, chinese: bool) -> None:
        super().__init__()
        self.rules, self.lower, self.chinese = rules, lower, chinese
        self.context = set()

    def __missing__(self, cp: int) -> Optional[str]:
        rules, c = self.rules, chr(cp)
        cleaned = rules.clean(c, self.chinese)
        if cleaned is not None and cleaned != " ":
            normed = rules.normalize(cleaned, self.lower)
            cleaned = "".join(" %s " % x if rules.is_punct(x) else x for x in normed)
            if self.lower and (c == "\u03a3" and rules.google or any(rules.combining(x) for x in normed)):
                self.context.add(c)  # final sigma; a kept combining mark may need reordering
        self[cp] = cleaned
        return cleaned


SPECIAL_TOKENS = ("[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]")


def _as_text(text: Union[str, bytes]) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", "ignore")  # as Google's convert_to_unicode
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, got {type(text).__name__}")
    return text


def whitespace_tokenize(text: str) -> List[str]:
    """Split on whitespace (str.split)."""
    return text.split()


class BasicTokenizer:
    """Cleaning, CJK splitting, lower-casing/accent stripping and punctuation splitting."""

    def __init__(self, do_lower_case: bool = True, never_split: Iterable[str] = SPECIAL_TOKENS, *,
                 tokenize_chinese_chars: bool = True, google_compat: bool = False) -> None:
        """`never_split` tokens are cut out of the raw text wherever they occur and kept verbatim
        (HF's special-token behaviour); ignored when `google_compat` (Google protects nothing)."""
        self.do_lower_case = do_lower_case
        self.never_split = tuple(never_split or ())
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.google_compat = google_compat
        self._rules = _Rules(google_compat)
        self._table = _CharTable(self._rules, do_lower_case, tokenize_chinese_chars)
        specials = () if google_compat else sorted(set(self.never_split) - {""}, key=len, reverse=True)
        self._special_re = re.compile("(%s)" % "|".join(map(re.escape, specials))) if specials else None
        self._special_first = "".join({s[0] for s in specials})
        self._sigma = google_compat and do_lower_case

    def tokenize(self, text: Union[str, bytes]) -> List[str]:
        """Words (and single punctuation marks), ready for WordPiece."""
        words: List[str] = []
        for segment, kind in self._segments(text):
            if kind == _SPECIAL:
                words.append(segment)
            elif kind == _EXACT:
                words.extend(self._exact_words(segment))
            else:
                for chunk in _CHUNK_RE.findall(segment):
                    words.extend(self._chunk_words(chunk))
        return words

    def _segments(self, text: Union[str, bytes]) -> List[Tuple[str, int]]:
        """(segment, kind) pairs; ASCII control characters removed from ordinary segments.

        Kind _EXACT: Google lower-cases whole words with str.lower(), whose final-sigma rule looks
        across ASCII punctuation ("ΑΣ.Β" keeps σ), so such text is not cut into chunks.
        """
        if type(text) is not str:
            text = _as_text(text)
        if self._special_re is not None and any(map(text.__contains__, self._special_first)):
            parts = self._special_re.split(text)
        else:
            parts = [text]
        segments = []
        for i, part in enumerate(parts):
            if i % 2:
                segments.append((part, _SPECIAL))
            elif part:
                if _ASCII_CONTROL_RE.search(part):
                    part = _ASCII_CONTROL_RE.sub("", part)
                segments.append((part, _EXACT if self._sigma and "\u03a3" in part else _PLAIN))
        return segments

    def _chunk_words(self, chunk: str) -> List[str]:
        """Words of one `_CHUNK_RE` match (an ASCII chunk is exactly one word)."""
        if chunk.isascii():
            return [chunk.lower() if self.do_lower_case else chunk]
        table = self._table
        words = chunk.translate(table).split()
        if table.context and not table.context.isdisjoint(chunk):
            return self._exact_words(chunk)
        return words

    def _exact_words(self, text: str) -> List[str]:
        """The rules applied to a whole string, in the references' order (the slow, exact path)."""
        rules = self._rules
        text = "".join(filter(None, (rules.clean(c, self.tokenize_chinese_chars) for c in text)))
        if not rules.google:  # HF normalises the whole string, then pre-tokenizes
            text = rules.normalize(text, self.do_lower_case)
        words = []
        for word in text.split():
            if rules.google:
                word = rules.normalize(word, self.do_lower_case)
            start = 0
            for i, c in enumerate(word):
                if rules.is_punct(c):
                    words.extend((word[start:i], c) if i > start else (c,))
                    start = i + 1
            if start < len(word):
                words.append(word[start:])
        return words


class WordpieceTokenizer:
    """Greedy longest-match-first WordPiece; a word with any unmatchable piece becomes `unk_token`."""

    def __init__(self, vocab: Dict[str, int], unk_token: str = "[UNK]", max_input_chars_per_word: int = 100) -> None:
        self.vocab = vocab
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word
        # No piece can be longer than the longest vocabulary entry: bounds the inner search loop.
        self._max_first = max((len(t) for t in vocab), default=0)
        self._max_next = max((len(t) - 2 for t in vocab if t.startswith("##")), default=0)

    def tokenize(self, text: str) -> List[str]:
        """Pieces of each whitespace-separated word of `text`."""
        return [p for word in whitespace_tokenize(_as_text(text)) for p in self.word_pieces(word)]

    def word_pieces(self, word: str) -> Tuple[str, ...]:
        vocab = self.vocab
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_token,)
        if word in vocab:
            return (word,)
        pieces, start, n = [], 0, len(word)
        while start < n:
            end = min(n, start + (self._max_next if start else self._max_first))
            while end > start:
                piece = "##" + word[start:end] if start else word[start:end]
                if piece in vocab:
                    break
                end -= 1
            else:
                return (self.unk_token,)
            pieces.append(piece)
            start = end
        return tuple(pieces)
