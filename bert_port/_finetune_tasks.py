"""The two fine-tuning tasks of `bert_port.finetune`: token tagging and sequence classification.

A task is an object (TASKS maps the command name to it) that knows how to read its files, build the
label list, make training features, compute the summed training loss of a batch, predict, and
score predictions with counts that add up across ranks (so distributed evaluation sums counts
instead of gathering predictions).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from bert_port import data as D
from bert_port import metrics as M
from bert_port.heads import BertForSequenceClassification, BertForTokenTagging

AmpContext = Callable[[], ContextManager]


@dataclass(frozen=True)
class Predicting:
    """How a task predicts: the tokenizer, the label names (ids -> names), the window length in
    pieces, the batch size, the device and the autocast context."""

    tokenizer: Any
    labels: Sequence[str]
    max_seq_length: int
    batch_size: int
    device: torch.device
    amp: "AmpContext"


def no_amp() -> ContextManager:
    return contextlib.nullcontext()


@torch.no_grad()
def argmax_predictions(model: torch.nn.Module, features: Sequence[D.Features], batch_size: int,
                       device: torch.device, pad_id: int, amp: AmpContext = no_amp) -> list:
    """Per-feature argmax: a list of token label ids (tagging) or one label id (classification).

    Batches are formed from length-sorted features so that padding per batch stays small.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))
    out: list = [None] * len(features)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = D.pad_batch([features[i] for i in idx], pad_id)
        with amp():
            logits = model(batch["input_ids"].to(device), batch["segment_ids"].to(device),
                           batch["input_mask"].to(device))
        pred = logits.argmax(-1).cpu()
        for row, i in enumerate(idx):
            out[i] = pred[row, :len(features[i].input_ids)].tolist() if pred.dim() == 2 else int(pred[row])
    model.train(was_training)
    return out


class TagTask:
    """Word-level tagging (NER, chunking) from CoNLL files, scored with conlleval's entity F1."""

    name = "tag"
    model_cls = BertForTokenTagging

    def read(self, path) -> List[D.Sentence]:
        return D.read_conll(path)

    def labels(self, train: Sequence[D.Sentence], dev: Sequence[D.Sentence]) -> List[str]:
        return D.tag_labels(s.tags for s in list(train) + list(dev))

    def train_features(self, examples, tokenizer, label2id, max_seq_length) -> Tuple[List[D.Features], int]:
        """Features (truncated to whole words) and how many sentences lost words to truncation."""
        feats = [D.encode_tagged(s.words, s.tags, tokenizer, label2id, max_seq_length) for s in examples]
        return feats, sum(f.consumed < len(s.words) for f, s in zip(feats, examples))

    def prepare(self, model: torch.nn.Module) -> None:
        # The pooler does not feed the tagging loss: freeze it so DDP does not wait for its grads.
        model.bert.pooler.requires_grad_(False)

    def loss_sum(self, model, batch) -> Tuple[torch.Tensor, int]:
        """Summed cross-entropy over labelled tokens (first pieces) and their number."""
        logits = model(batch["input_ids"], batch["segment_ids"], batch["input_mask"])  # (B, S, C)
        labels = batch["labels"]
        sel = labels != D.IGNORE
        return F.cross_entropy(logits[sel].float(), labels[sel], reduction="sum"), int(sel.sum())

    def count(self, batch) -> int:
        return int((batch["labels"] != D.IGNORE).sum())

    def predict(self, model, examples: Sequence[D.Sentence], how: Predicting) -> List[List[str]]:
        """Predicted tags per word; long sentences are split into windows so no word is lost."""
        labels = how.labels
        windows = [D.encode_windows(s.words, None, how.tokenizer, None, how.max_seq_length) for s in examples]
        flat = [f for w in windows for f in w]
        preds = argmax_predictions(model, flat, how.batch_size, how.device, D.pad_id_of(how.tokenizer), how.amp)
        out, k = [], 0
        for s, w in zip(examples, windows):
            ids = D.word_predictions(w, preds[k:k + len(w)], len(s.words))
            k += len(w)
            out.append([labels[i] for i in ids])
        return out

    def score(self, examples: Sequence[D.Sentence], predicted: Sequence[Sequence[str]], labels) -> M.EntityCounts:
        return M.entity_counts([s.tags for s in examples], predicted,
                               iobes=any(lab.startswith("S-") for lab in labels))

    def zero(self, labels) -> M.EntityCounts:
        return M.EntityCounts()

    def summary(self, scores: dict) -> str:
        return f"f1 {scores['f1']:.4f} (P {scores['precision']:.4f} R {scores['recall']:.4f})"


class ClassifyTask:
    """Sentence (pair) classification from GLUE-style TSV files, scored with accuracy and F1."""

    name = "classify"
    model_cls = BertForSequenceClassification

    def read(self, path) -> List[D.PairExample]:
        return D.read_glue_tsv(path)

    def labels(self, train, dev) -> List[str]:
        return D.class_labels(e.label for e in list(train) + list(dev))

    def train_features(self, examples, tokenizer, label2id, max_seq_length) -> Tuple[List[D.Features], int]:
        feats = [D.encode_pair(e.text_a, e.text_b, tokenizer, max_seq_length, label2id[e.label]) for e in examples]
        def full_length(e):
            b = len(tokenizer.tokenize(e.text_b)) + 1 if e.text_b is not None else 0
            return len(tokenizer.tokenize(e.text_a)) + 2 + b
        return feats, sum(full_length(e) > max_seq_length for e in examples)

    def prepare(self, model: torch.nn.Module) -> None:
        pass

    def loss_sum(self, model, batch) -> Tuple[torch.Tensor, int]:
        logits = model(batch["input_ids"], batch["segment_ids"], batch["input_mask"])  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), int(batch["labels"].numel())

    def count(self, batch) -> int:
        return int(batch["labels"].numel())

    def predict(self, model, examples: Sequence[D.PairExample], how: Predicting) -> List[str]:
        feats = [D.encode_pair(e.text_a, e.text_b, how.tokenizer, how.max_seq_length) for e in examples]
        ids = argmax_predictions(model, feats, how.batch_size, how.device, D.pad_id_of(how.tokenizer), how.amp)
        return [how.labels[i] for i in ids]

    def score(self, examples: Sequence[D.PairExample], predicted: Sequence[str], labels) -> M.ClassCounts:
        index = {lab: i for i, lab in enumerate(labels)}
        return M.ClassCounts(len(labels)).add([index[e.label] for e in examples], [index[p] for p in predicted])

    def zero(self, labels) -> M.ClassCounts:
        return M.ClassCounts(len(labels))

    def summary(self, scores: dict) -> str:
        return f"f1 {scores['f1']:.4f} accuracy {scores['accuracy']:.4f}"


TAG, CLASSIFY = TagTask(), ClassifyTask()
TASKS = {task.name: task for task in (TAG, CLASSIFY)}
# The `architectures` name of a fine-tuned directory -> its task, as each task's model class declares it.
ARCHITECTURES = {task.model_cls.hf_architecture: task for task in (TAG, CLASSIFY)}
