"""BERT tokenization with pytorch_pretrained_bert 0.6.2's API, giving HF `BertTokenizerFast`'s ids.

Rules (default): drop NUL, U+FFFD and control characters; whitespace -> split; spaces around CJK
ideographs; if `do_lower_case`, strip accents (NFD, drop Mn) and lower-case; split off punctuation
(ASCII 33-47, 58-64, 91-96, 123-126 and Unicode P*); greedy longest-match WordPiece with "##"
continuations, a word with an unmatchable piece or over 100 characters -> "[UNK]".

pytorch_pretrained_bert (ppb) and HF's Rust `tokenizers` share those rules but not every detail.
We follow HF (the ids users of HF checkpoints get), which differs from ppb in:
  * "control": HF drops Cc, Cf and Co; ppb drops every C* category, so unassigned code points
    (Cn) vanish in ppb but stay (as part of a word, usually -> [UNK]) in HF. Lone surrogates
    (Cs), which HF cannot even receive, are dropped as in ppb.
  * Unicode version: HF's category tables are Unicode 8.0 (crate `unicode_categories` 0.1) and its
    NFD is Unicode 9.0; ppb uses the running Python's `unicodedata` (14.0 on 3.11). About 700 code
    points added since 8.0 (P*, Mn, Cf, combining) are thus plain letters to HF, plus 6 whose
    category changed: `_NEW_IN_9`, `_NEW_AFTER_9`, `_UNICODE8_CATEGORY` below.
  * HF's CJK range 0x2B920-0x2CEAF where Google/ppb have 0x2B820-0x2CEAF (U+2B820..2B91F are
    not split off in HF).
  * Case: HF lower-cases character by character after stripping accents; ppb calls str.lower()
    first, which maps a word-final capital sigma to "ς" (HF: "σ").
  * Special tokens (`never_split`): HF cuts them out of the raw text wherever they occur, before
    any cleaning ("a[CLS]b" -> a, [CLS], b); ppb protects only whitespace-separated ones after
    cleaning ("a[CLS]b" -> a [ cls ] b, but "[CL\\x00S]" -> [CLS]).
Residual, documented gap: letters Python's `unicodedata` does not know yet (e.g. Unicode 16's
Garay capitals on Python 3.11) are lower-cased by HF's Rust std tables and left as is here.

`google_compat=True` reproduces Google's tokenization.py instead: only Cc/Cf dropped, Python's
Unicode tables, str.lower() then accent stripping, no special-token protection, 200-char words.

Speed: text is cut into chunks (ASCII word / ASCII punctuation / any run holding non-ASCII) by
one precompiled regex; each distinct chunk is tokenized once and cached (a FIFO dict bounded in
entries and in bytes; chunks longer than 256 characters are never cached).
Non-ASCII chunks go through a per-character translation table (also cached per code point);
the rare chunks where characters interact (canonical reordering, final sigma) take the exact path.
"""
from __future__ import annotations

import collections
import io
import itertools
import logging
import operator
import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from converters.atomic import atomic_path

logger = logging.getLogger(__name__)

VOCAB_NAME = "vocab.txt"


def _vocab_maps() -> Tuple[Dict[str, str], Dict[str, int]]:
    from bert_port import hub

    names = hub.known_names()
    return {n: hub.vocab_url(n) for n in names}, {n: 512 for n in names}


# pytorch_pretrained_bert's tables, for our pretrained names: vocab URL and the models' max positions.
PRETRAINED_VOCAB_ARCHIVE_MAP, PRETRAINED_VOCAB_POSITIONAL_EMBEDDINGS_SIZE_MAP = _vocab_maps()
PathLike = Union[str, os.PathLike]

# The reference's names (BasicTokenizer, WordpieceTokenizer, whitespace_tokenize) and the Unicode tables (tests read
# them here) live in the stages module; this one builds BertTokenizer on them.
from bert_port._tokenizer_stages import (  # noqa: F401
    _AFTER_8, _AFTER_9, _CHUNK_RE, _EXACT, _NEW_AFTER_9, _NEW_IN_9, _PLAIN, _SPECIAL, _UNICODE8_CATEGORY, SPECIAL_TOKENS,
    BasicTokenizer, WordpieceTokenizer, _as_text, whitespace_tokenize)


def load_vocab(vocab_file: PathLike) -> "collections.OrderedDict[str, int]":
    """Token -> id, one token per line, stripped as Google and ppb do (HF strips only "\\n"); a
    repeated token keeps its last id. The file must be a regular file of at most 64 MiB (ValueError
    otherwise: a FIFO or /dev/zero would hang or fill memory), of at most MAX_VOCAB_LINES lines,
    counted as they are read (64 MiB of one-character lines cost seconds and GBs of dict)."""
    from converters.files import MAX_VOCAB_BYTES, MAX_VOCAB_LINES, NotARegularFile, open_regular

    vocab = collections.OrderedDict()
    try:
        f = open_regular(vocab_file, MAX_VOCAB_BYTES, "vocabulary")
    except NotARegularFile as e:
        raise ValueError(str(e)) from e
    with f, io.TextIOWrapper(f, encoding="utf-8") as reader:
        for index, line in enumerate(reader):
            if index >= MAX_VOCAB_LINES:
                raise ValueError(f"{vocab_file}: vocabulary has more than {MAX_VOCAB_LINES} lines "
                                 "(the largest vocab_size a config may declare)")
            vocab[line.strip()] = index
    return vocab


_MAX_CACHED_CHUNK = 256  # characters; longer chunks are rare and recomputed every time


class _WordCache(dict):
    """chunk -> tokenization result, with an estimate of the bytes the entries keep alive."""

    __slots__ = ("used",)

    def __init__(self) -> None:
        super().__init__()
        self.used = 0

    @staticmethod
    def cost(chunk: str, value: tuple) -> int:
        return (sys.getsizeof(chunk) + sys.getsizeof(value)
                + sum(sys.getsizeof(v) for v in value if type(v) is str))

    def put(self, chunk: str, value: tuple, max_entries: int, max_bytes: int) -> None:
        if len(chunk) > _MAX_CACHED_CHUNK:
            return
        cost = self.cost(chunk, value)
        if len(self) >= max_entries or self.used + cost > max_bytes:  # forget the older half
            for key in list(itertools.islice(self, len(self) // 2 + 1)):
                self.used -= self.cost(key, self.pop(key))
        self[chunk] = value
        self.used += cost


class BertTokenizer:
    """End-to-end tokenizer: BasicTokenizer then WordPiece (pytorch_pretrained_bert's interface).

    `convert_tokens_to_ids` maps unknown tokens to the [UNK] id (ppb raised KeyError) and, like
    ppb 0.6.2, only logs a warning when a sequence is longer than `max_len` (nothing is cut;
    `encode(max_length=...)` truncates). `convert_ids_to_tokens` raises ValueError for ids outside
    the vocabulary. `google_compat=True` gives Google's tokenization.py rules (module docstring).
    """

    def __init__(self, vocab_file: PathLike, do_lower_case: bool = True, max_len: Optional[int] = None,
                 do_basic_tokenize: bool = True, never_split: Iterable[str] = SPECIAL_TOKENS, *,
                 tokenize_chinese_chars: bool = True, google_compat: bool = False,
                 unk_token: str = "[UNK]", cache_size: int = 1 << 17, cache_bytes: int = 64 << 20) -> None:
        if not os.path.isfile(vocab_file):
            raise ValueError(f"Can't find a vocabulary file at path '{vocab_file}'. To load a pretrained "
                             "vocabulary use `BertTokenizer.from_pretrained(NAME_OR_DIRECTORY)`")
        self.vocab = load_vocab(vocab_file)
        self.ids_to_tokens = collections.OrderedDict((i, t) for t, i in self.vocab.items())
        self.do_lower_case = do_lower_case
        self.do_basic_tokenize = do_basic_tokenize
        self.google_compat = google_compat
        self.basic_tokenizer = BasicTokenizer(do_lower_case, never_split, google_compat=google_compat,
                                              tokenize_chinese_chars=tokenize_chinese_chars)
        self.wordpiece_tokenizer = WordpieceTokenizer(self.vocab, unk_token, 200 if google_compat else 100)
        self.max_len = max_len if max_len is not None else int(1e12)
        self.unk_token = unk_token
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes  # per cache (pieces and ids), estimated with sys.getsizeof
        self._vocab_size = max(self.ids_to_tokens, default=-1) + 1
        self._pieces = _WordCache()  # chunk -> pieces
        self._ids = _WordCache()  # chunk -> ids

    @property
    def vocab_size(self) -> int:
        """Number of vocabulary lines (highest id + 1), i.e. the embedding matrix's row count."""
        return self._vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    # -- tokenization ------------------------------------------------------------------------------
    def tokenize(self, text: Union[str, bytes]) -> List[str]:
        """WordPiece tokens of `text` (no [CLS]/[SEP] added)."""
        if not self.do_basic_tokenize:
            return self.wordpiece_tokenizer.tokenize(text)
        return self._run(text, self._pieces, self._chunk_pieces)

    def _run(self, text, cache: dict, compute) -> list:
        out: list = []
        for segment, kind in self.basic_tokenizer._segments(text):
            if kind != _PLAIN:
                out.extend(compute(segment, kind))
                continue
            chunks = _CHUNK_RE.findall(segment)
            done = len(out)
            try:  # all chunks seen before: the common case, entirely in C
                out.extend(itertools.chain.from_iterable(map(cache.__getitem__, chunks)))
            except KeyError:
                del out[done:]
                for chunk in chunks:
                    value = cache.get(chunk)
                    if value is None:
                        value = compute(chunk)
                        cache.put(chunk, value, self.cache_size, self.cache_bytes)
                    out.extend(value)
        return out

    def _chunk_pieces(self, chunk: str, kind: int = _PLAIN) -> Tuple[str, ...]:
        basic = self.basic_tokenizer
        words = (basic._chunk_words(chunk) if kind == _PLAIN else
                 (chunk,) if kind == _SPECIAL else basic._exact_words(chunk))
        if len(words) == 1:
            return self.wordpiece_tokenizer.word_pieces(words[0])
        return tuple(p for w in words for p in self.wordpiece_tokenizer.word_pieces(w))

    def _chunk_ids(self, chunk: str, kind: int = _PLAIN) -> Tuple[int, ...]:
        pieces = self._pieces.get(chunk) if kind == _PLAIN else None
        return tuple(self._token_ids(pieces or self._chunk_pieces(chunk, kind)))

    def _token_ids(self, tokens: Sequence[str]) -> List[int]:
        try:
            return list(map(self.vocab.__getitem__, tokens))
        except KeyError:
            ids = list(map(self.vocab.get, tokens))
        if None in ids:
            unk = self.vocab.get(self.unk_token)
            if unk is None:
                raise ValueError(f"token {tokens[ids.index(None)]!r} is not in the vocabulary, "
                                 f"nor is the unknown token {self.unk_token!r}")
            ids = [unk if i is None else i for i in ids]
        return ids

    def encode(self, text: Union[str, bytes], text_pair: Union[str, bytes, None] = None,
               max_length: Optional[int] = None, add_special_tokens: bool = True) -> List[int]:
        """Ids of `text` (and `text_pair`), as [CLS] a [SEP] (b [SEP]) unless `add_special_tokens=False`.

        Mirrors HF's `tokenizer(text, text_pair, truncation="longest_first", max_length=...)`: an
        empty `text_pair` counts as none, and a pair is cut as HF's tokenizers does (the shorter
        sequence is kept whole if it fits in half the room, else each gets half, the longer one the
        odd token); the special tokens count towards `max_length`.
        """
        a = self._encode_plain(text)
        b = self._encode_plain(text_pair) if text_pair else None
        if max_length is not None:
            room = max_length - ((3 if b is not None else 2) if add_special_tokens else 0)
            if room < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the special tokens")
            if b is None:
                del a[room:]
            elif len(a) + len(b) > room:
                n1, n2 = sorted((len(a), len(b)))
                n2 = n1 if n1 > room else max(n1, room - n1)
                if n1 + n2 > room:
                    n1, n2 = room // 2, room // 2 + room % 2
                if len(a) > len(b):
                    n1, n2 = n2, n1
                del a[n1:], b[n2:]
        if add_special_tokens:
            cls, sep = self._token_ids(("[CLS]", "[SEP]"))
            a = [cls] + a + [sep] + (b + [sep] if b is not None else [])
        elif b is not None:
            a = a + b
        if max_length is None and len(a) > self.max_len:
            self._warn_length(len(a))
        return a

    def _encode_plain(self, text) -> List[int]:
        if not self.do_basic_tokenize:
            return self._token_ids(self.wordpiece_tokenizer.tokenize(text))
        return self._run(text, self._ids, self._chunk_ids)

    # -- vocabulary ---------------------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> List[int]:
        """Ids of `tokens`; a token outside the vocabulary gets the [UNK] id."""
        ids = self._token_ids(tokens)
        if len(ids) > self.max_len:
            self._warn_length(len(ids))
        return ids

    def _warn_length(self, n: int) -> None:
        logger.warning("Token indices sequence length is longer than the specified maximum sequence length "
                       "for this BERT model (%d > %d). Running this sequence through BERT will result in "
                       "indexing errors", n, self.max_len)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> List[str]:
        """Tokens of `ids` (ints, numpy or torch integers); ValueError for an id not in the vocabulary."""
        tokens = []
        for i in ids:
            token = self.ids_to_tokens.get(operator.index(i))
            if token is None:
                raise ValueError(f"token id {int(i)} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(token)
        return tokens

    def save_vocabulary(self, vocab_path: PathLike) -> str:
        """Write the vocabulary to `vocab_path` (a directory -> <dir>/vocab.txt, else that file)."""
        vocab_file = os.path.join(vocab_path, VOCAB_NAME) if os.path.isdir(vocab_path) else os.fspath(vocab_path)
        index = 0
        with atomic_path(vocab_file) as tmp, open(tmp, "w", encoding="utf-8") as writer:  # a link there is replaced
            for token_index, token in sorted(self.ids_to_tokens.items()):
                if index != token_index:
                    logger.warning("Saving vocabulary to %s: vocabulary indices are not consecutive. "
                                   "Please check that the vocabulary is not corrupted!", vocab_file)
                    index = token_index
                writer.write(token + "\n")
                index += 1
        return vocab_file

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: PathLike, cache_dir: Optional[PathLike] = None,
                        do_lower_case: Optional[bool] = None, *inputs, **kwargs) -> "BertTokenizer":
        """Load a vocabulary file, a directory holding `vocab.txt`, or (via bert_port.hub) a pretrained name.

        When `do_lower_case` / `max_len` are not given they come from a `tokenizer_config.json`
        next to the vocabulary (HF layout) if there is one; otherwise lower-casing is on.
        """
        vocab_file = _resolve_vocab(pretrained_model_name_or_path, cache_dir)
        config = _tokenizer_config(os.path.dirname(vocab_file))
        if do_lower_case is None:
            do_lower_case = bool(config.get("do_lower_case", True))
        limit = config.get("model_max_length")
        if limit is None and str(pretrained_model_name_or_path) in PRETRAINED_VOCAB_POSITIONAL_EMBEDDINGS_SIZE_MAP:
            limit = PRETRAINED_VOCAB_POSITIONAL_EMBEDDINGS_SIZE_MAP[str(pretrained_model_name_or_path)]
        if "max_len" not in kwargs and not inputs and isinstance(limit, int) and 0 < limit < 1e9:
            kwargs["max_len"] = limit
        return cls(vocab_file, do_lower_case, *inputs, **kwargs)


def _resolve_vocab(name_or_path: PathLike, cache_dir: Optional[PathLike]) -> str:
    """A vocab file, <dir>/vocab.txt, or what `bert_port.hub.resolve_vocab` makes of a name."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        vocab_file = os.path.join(path, VOCAB_NAME)
        if not os.path.isfile(vocab_file):
            raise ValueError(f"{path}: directory has no {VOCAB_NAME}")
        return vocab_file
    from bert_port import hub  # pretrained names: resolved (downloaded, cached) by the hub, imported only now

    if hub.is_known_name(path):
        return os.fspath(hub.resolve_vocab(path, cache_dir))
    raise ValueError(f"{path}: not a vocabulary file, nor a directory holding {VOCAB_NAME}, "
                     "nor a known pretrained name")


def _tokenizer_config(directory: str) -> dict:
    from converters.files import NotARegularFile, load_json

    path = os.path.join(directory, "tokenizer_config.json")
    try:
        config = load_json(path, what="tokenizer config")
    except NotARegularFile as e:  # a FIFO, a device, or too big: say so rather than hang
        raise ValueError(str(e)) from e
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def __getattr__(name: str):
    if name == "cached_path":  # the reference's tokenization module imports it; so may scripts
        from bert_port.file_utils import cached_path

        return cached_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
