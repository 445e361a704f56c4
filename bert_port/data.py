"""Fine-tuning data: CoNLL / GLUE-TSV readers, label maps, and text -> BERT input features.

Alignment rules for tagging (word-level tags, WordPiece inputs):
  * the first piece of each word carries the word's tag id; later pieces, [CLS] and [SEP] get
    IGNORE (-100), so the loss and the metric see exactly one prediction per word;
  * truncation keeps whole words only: a word whose pieces do not all fit is dropped with every
    word after it (a half word would be an input form never seen for that word), and [SEP] always
    stays last. Only a single word longer than the whole window is cut, keeping its first pieces;
  * a word that tokenizes to nothing (control characters, U+FFFD) has no position: it is skipped
    in training and predicted "O" (the first label) at inference. [UNK] words are ordinary words.
Features are not padded here; `pad_batch` pads a batch to its longest member (input_mask 0,
segment 0, label IGNORE), which is much cheaper than padding everything to max_seq_length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from converters.errors import file_error
from converters.files import NotARegularFile, open_regular
from converters.text import shown

IGNORE = -100  # label id the loss and the metric skip (torch's cross_entropy default ignore_index)
DOCSTART = "-DOCSTART-"
PathLike = Union[str, os.PathLike]


@dataclass
class Sentence:
    """One CoNLL sentence: words and their tags (None when the file carries no tags)."""

    words: List[str]
    tags: Optional[List[str]] = None


@dataclass
class PairExample:
    """One classification example: a sentence or sentence pair and its label (None if unlabelled)."""

    text_a: str
    text_b: Optional[str] = None
    label: Optional[str] = None


@dataclass
class Features:
    """Unpadded model inputs for one sequence.

    `label_ids` is per token for tagging and a single id for classification. `word_starts[i]` is
    the position of word i's first piece (-1: the word has no piece); it lists only the words this
    window consumed (`consumed`), so a truncated sentence has `consumed < len(words)`.
    """

    input_ids: List[int]
    segment_ids: List[int]
    label_ids: Union[List[int], int, None]
    word_starts: List[int] = field(default_factory=list)

    @property
    def input_mask(self) -> List[int]:
        return [1] * len(self.input_ids)

    @property
    def consumed(self) -> int:
        return len(self.word_starts)


# --- reading files --------------------------------------------------------------------------------
def read_lines(path: PathLike, encoding: str = "utf-8") -> List[str]:
    """All lines of a text file; errors become one-line ValueErrors naming the file (and, for
    bytes that are not text, the line: the whole file is decoded at once so the line is known)."""
    try:  # a regular file only: a FIFO would block, /dev/zero never end
        with open_regular(path, None, "data file") as f:
            return f.read().decode(encoding).splitlines()
    except NotARegularFile as e:
        raise ValueError(shown(str(e), 400)) from e
    except (OSError, UnicodeDecodeError) as e:
        raise file_error(path, e) from e


def _refuse_tsv(path: PathLike, lineno: int, line: str) -> None:
    """A tab-separated field holding several words: a sentence, not a CoNLL token or tag."""
    if "\t" in line and any(len(field.split()) > 1 for field in line.split("\t")):
        raise ValueError(f"{path}:{lineno}: a tab-separated field holds several words, as in a GLUE TSV file; "
                         "expected CoNLL: 'token ... tag' per line, a blank line between sentences")


def read_conll(path: PathLike, require_tags: bool = True) -> List[Sentence]:
    """CoNLL: `token ... tag` per line (the tag is the LAST column), a blank line between sentences.

    `-DOCSTART-` lines are skipped. With `require_tags=False` one-column lines are accepted and
    every sentence then has `tags=None` (the file must be all one way).
    """
    sentences: List[Sentence] = []
    words: List[str] = []
    tags: List[str] = []
    widths = set()
    for lineno, line in enumerate(read_lines(path), 1):
        cols = line.split()
        if not cols or cols[0] == DOCSTART:
            if words:
                sentences.append(Sentence(words, tags))
                words, tags = [], []
            continue
        _refuse_tsv(path, lineno, line)
        if len(cols) < 2 and require_tags:
            raise ValueError(f"{path}:{lineno}: expected 'token ... tag' (at least 2 columns), got {shown(repr(line.strip()))}")
        widths.add(len(cols) >= 2)
        if len(widths) > 1:
            raise ValueError(f"{path}:{lineno}: some lines carry a tag and others do not")
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sentences.append(Sentence(words, tags))
    if widths == {False}:
        for s in sentences:
            s.tags = None
    return sentences


def read_text(path: PathLike) -> List[Sentence]:
    """Plain text: one sentence per line, whitespace-separated tokens; blank lines are skipped."""
    return [Sentence(line.split()) for line in read_lines(path) if line.strip()]


# Header names of the GLUE TSV layouts we read: (label, text_a, text_b); MRPC's columns are
# Quality, #1 ID, #2 ID, #1 String, #2 String.
_LABEL_COLS = ("Quality", "label")
TEXT_A_COLUMNS = ("#1 String", "sentence1", "sentence", "question1", "question")
_B_COLS = ("#2 String", "sentence2", "question2")


def read_glue_tsv(path: PathLike, require_labels: bool = True) -> List[PairExample]:
    """GLUE-style TSV with a header row (MRPC, SST-2 and other sentence(-pair) layouts).

    Fields are split on tabs with no quote handling, like GLUE's own readers (MRPC has stray quotes).
    """
    lines = read_lines(path, encoding="utf-8-sig")  # MRPC's files start with a byte-order mark
    if not lines:
        raise ValueError(f"{path}: empty file, expected a header row")
    header = [h.strip() for h in lines[0].split("\t")]
    a = next((header.index(c) for c in TEXT_A_COLUMNS if c in header), None)
    b = next((header.index(c) for c in _B_COLS if c in header), None)
    y = next((header.index(c) for c in _LABEL_COLS if c in header), None)
    if a is None or (y is None and require_labels):
        raise ValueError(f"{path}: expected a GLUE-style TSV file whose first line is a tab-separated header with "
                         f"a text column ({' / '.join(TEXT_A_COLUMNS)})"
                         + ("" if y is not None else f" and a label column ({' / '.join(_LABEL_COLS)})")
                         + f"; the first line is {shown(repr(lines[0][:60]))}")
    need = max(i for i in (a, b, y) if i is not None) + 1
    out = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise ValueError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, got {len(cols)}")
        out.append(PairExample(cols[a], cols[b] if b is not None else None,
                               cols[y].strip() if y is not None else None))
    return out


# --- label maps -----------------------------------------------------------------------------------
def tag_labels(tag_sequences: Iterable[Optional[Sequence[str]]]) -> List[str]:
    """Label list for tagging: "O" first (the prediction for words without a piece), then sorted."""
    found = {t for seq in tag_sequences if seq for t in seq}
    return ["O"] + sorted(found - {"O"})


def class_labels(labels: Iterable[Optional[str]]) -> List[str]:
    """Sorted label list for classification (MRPC: ["0", "1"], so "1" is the positive class)."""
    return sorted({lab for lab in labels if lab is not None})


def attach_label_map(config, labels: Sequence[str]) -> None:
    """Store the labels in a BertConfig as id2label / label2id (what save_pretrained writes)."""
    config.id2label = {str(i): lab for i, lab in enumerate(labels)}
    config.label2id = {lab: i for i, lab in enumerate(labels)}


def label_map_from_config(config) -> List[str]:
    """Labels ordered by id from a config's id2label; ValueError if missing or not 0..n-1."""
    id2label = getattr(config, "id2label", None)
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError("the model's config has no id2label label map (was it saved by bert_port.finetune?)")
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"the model's id2label has non-integer ids: {shown(repr(sorted(id2label)[:5]))}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"the model's id2label ids are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


# --- features -------------------------------------------------------------------------------------
def encode_tagged(words: Sequence[str], tags: Optional[Sequence[str]], tokenizer,
                  label2id: Optional[Dict[str, int]], max_seq_length: int) -> Features:
    """[CLS] pieces [SEP] for one sentence (see the module docstring for the rules).

    With `tags=None` every label is IGNORE (inference). Words that do not fit are not in the
    result: `features.consumed` tells how many leading words it covers.
    """
    room = max_seq_length - 2
    if room < 1:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room between [CLS] and [SEP]")
    if tags is not None and len(tags) != len(words):
        raise ValueError(f"{len(words)} words but {len(tags)} tags")
    pieces: List[str] = ["[CLS]"]
    labels: List[int] = [IGNORE]
    starts: List[int] = []
    for i, word in enumerate(words):
        word_pieces = tokenizer.tokenize(word)
        if not word_pieces:
            starts.append(-1)
            continue
        if len(pieces) - 1 + len(word_pieces) > room:
            if len(pieces) > 1:
                break  # whole words only: this word and the rest are left out
            word_pieces = word_pieces[:room]  # a single word longer than the window
        tag_id = IGNORE
        if tags is not None:
            if label2id is None or tags[i] not in label2id:
                raise ValueError(f"tag {shown(repr(tags[i]))} is not in the label map")
            tag_id = label2id[tags[i]]
        starts.append(len(pieces))
        pieces.extend(word_pieces)
        labels.extend([tag_id] + [IGNORE] * (len(word_pieces) - 1))
    pieces.append("[SEP]")
    labels.append(IGNORE)
    ids = tokenizer.convert_tokens_to_ids(pieces)
    return Features(ids, [0] * len(ids), labels, starts)


def encode_windows(words: Sequence[str], tags: Optional[Sequence[str]], tokenizer,
                   label2id: Optional[Dict[str, int]], max_seq_length: int) -> List[Features]:
    """Consecutive windows covering every word (for evaluation and prediction, where none may be lost)."""
    out: List[Features] = []
    start = 0
    while start < len(words):
        f = encode_tagged(words[start:], None if tags is None else tags[start:], tokenizer, label2id, max_seq_length)
        out.append(f)
        start += f.consumed
    return out


def truncate_seq_pair(tokens_a: List, tokens_b: List, max_length: int) -> None:
    """Longest-first, in place, as pytorch_pretrained_bert's `_truncate_seq_pair`: pop the last
    token of the longer list (of `tokens_b` on a tie) until the total fits."""
    while len(tokens_a) + len(tokens_b) > max_length:
        if len(tokens_a) > len(tokens_b):
            tokens_a.pop()
        else:
            tokens_b.pop()


def encode_pair(text_a: str, text_b: Optional[str], tokenizer, max_seq_length: int,
                label_id: Optional[int] = None) -> Features:
    """`[CLS] a [SEP]` (segment 0) + `b [SEP]` (segment 1), truncated longest-first."""
    a = tokenizer.tokenize(text_a)
    b = tokenizer.tokenize(text_b) if text_b is not None else None
    room = max_seq_length - (3 if b is not None else 2)
    if room < (2 if b is not None else 1):
        raise ValueError(f"max_seq_length={max_seq_length} is too small for the special tokens")
    if b is not None:
        truncate_seq_pair(a, b, room)
    else:
        a = a[:room]
    pieces = ["[CLS]"] + a + ["[SEP]"]
    segments = [0] * len(pieces)
    if b is not None:
        pieces += b + ["[SEP]"]
        segments += [1] * (len(b) + 1)
    return Features(tokenizer.convert_tokens_to_ids(pieces), segments, label_id)


def pad_batch(features: Sequence[Features], pad_id: int = 0, length: Optional[int] = None
              ) -> Dict[str, torch.Tensor]:
    """Tensors for a batch, padded to its longest member (or to `length`).

    Keys: input_ids, input_mask, segment_ids, and labels when the features carry labels
    ((B, S) for tagging, padded with IGNORE; (B,) for classification).
    """
    longest = max(len(f.input_ids) for f in features)
    S = longest if length is None else length
    if S < longest:
        raise ValueError(f"length={length} is shorter than the longest sequence ({longest})")
    B = len(features)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    segs = torch.zeros((B, S), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        ids[row, :n] = torch.tensor(f.input_ids)
        mask[row, :n] = 1
        segs[row, :n] = torch.tensor(f.segment_ids)
    batch = {"input_ids": ids, "input_mask": mask, "segment_ids": segs}
    first = features[0].label_ids
    if isinstance(first, list):
        labels = torch.full((B, S), IGNORE, dtype=torch.long)
        for row, f in enumerate(features):
            labels[row, :len(f.label_ids)] = torch.tensor(f.label_ids)
        batch["labels"] = labels
    elif first is not None:
        batch["labels"] = torch.tensor([f.label_ids for f in features], dtype=torch.long)
    return batch


def word_predictions(features: Sequence[Features], token_preds: Sequence[Sequence[int]], n_words: int,
                     default: int = 0) -> List[int]:
    """Per-word label ids of one sentence from its windows' per-token predictions.

    A word's prediction is its first piece's; a word with no piece gets `default` ("O").
    """
    out: List[int] = []
    for f, preds in zip(features, token_preds):
        out.extend(default if pos < 0 else int(preds[pos]) for pos in f.word_starts)
    if len(out) != n_words:
        raise AssertionError(f"windows cover {len(out)} words, the sentence has {n_words}")
    return out


def pad_id_of(tokenizer) -> int:
    """The [PAD] id of a vocabulary (0 in every BERT vocabulary, but do not assume it)."""
    return int(tokenizer.vocab.get("[PAD]", 0))

