"""Evaluation metrics: entity-level P/R/F1 with conlleval.pl's semantics, accuracy and F1 for classes.

Entity scores follow conlleval.pl (CoNLL-2000/2003 shared tasks), so numbers are comparable with
published NER results:
  * a tag is split at its FIRST hyphen into prefix and type ("B-PER" -> B, PER; "O" -> O, "");
  * chunk starts and ends come from conlleval's startOfChunk/endOfChunk rules, which read IOB1
    ("I-PER I-PER" is one chunk; B- only separates adjacent chunks of one type), IOB2/BIO and
    IOE alike: an I- after O starts a chunk, a type change ends one and starts another;
  * a guessed chunk is correct when it starts and ends where a gold chunk does, with its type;
  * sentence boundaries end every chunk. Precision = correct/guessed, recall = correct/gold,
    F1 = 2PR/(P+R), each 0 when its denominator is 0.
conlleval.pl has no S- (single) tag and does not end a chunk at "E- B-"; `iobes=True` adds those
two rules for IOBES data (auto-detected when an S- tag appears). Everything is counted per
sentence, so counts from shards of a data set add up (`EntityCounts.__add__`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


def split_tag(tag: str) -> Tuple[str, str]:
    """("B", "PER") from "B-PER", as conlleval's /^([^-]*)-(.*)$/ (types may contain hyphens)."""
    prefix, dash, kind = tag.partition("-")
    return (prefix, kind) if dash else (tag, "")


def end_of_chunk(prev: str, prev_type: str, tag: str, kind: str, iobes: bool = False) -> bool:
    """Did a chunk end between the previous word and this one? (conlleval's endOfChunk)"""
    if (prev, tag) in {("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"), ("E", "E"), ("E", "I"), ("E", "O")}:
        return True
    if prev not in ("O", ".") and prev_type != kind:
        return True
    if prev in ("[", "]"):
        return True
    return iobes and (prev == "S" or tag == "S" and prev in ("B", "I", "E") or (prev, tag) == ("E", "B"))


def start_of_chunk(prev: str, prev_type: str, tag: str, kind: str, iobes: bool = False) -> bool:
    """Did a chunk start at this word? (conlleval's startOfChunk)"""
    if (prev, tag) in {("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}:
        return True
    if tag not in ("O", ".") and prev_type != kind:
        return True
    if tag in ("[", "]"):
        return True
    return iobes and (tag == "S" or prev in ("E", "S") and tag in ("B", "I", "E"))


def chunks(tags: Sequence[str], iobes: bool = False) -> List[Tuple[str, int, int]]:
    """(type, first, last) word indices of the chunks in one sentence, by the same rules."""
    out = []
    prev, prev_type, begin = "O", "", None
    for i, tag in enumerate(list(tags) + ["O"]):
        cur, kind = split_tag(tag)
        if begin is not None and end_of_chunk(prev, prev_type, cur, kind, iobes):
            out.append((prev_type, begin, i - 1))
            begin = None
        if start_of_chunk(prev, prev_type, cur, kind, iobes):
            begin = i
        prev, prev_type = cur, kind
    return out


@dataclass
class EntityCounts:
    """conlleval's counters: overall and per chunk type. Add instances to combine shards."""

    correct: int = 0
    guessed: int = 0
    gold: int = 0
    tokens: int = 0
    correct_tags: int = 0
    by_type: Dict[str, List[int]] = field(default_factory=dict)  # type -> [correct, guessed, gold]

    def __add__(self, other: "EntityCounts") -> "EntityCounts":
        by_type = {k: list(v) for k, v in self.by_type.items()}
        for k, v in other.by_type.items():
            mine = by_type.setdefault(k, [0, 0, 0])
            for j in range(3):
                mine[j] += v[j]
        return EntityCounts(self.correct + other.correct, self.guessed + other.guessed, self.gold + other.gold,
                            self.tokens + other.tokens, self.correct_tags + other.correct_tags, by_type)

    def _bump(self, kind: str, slot: int) -> None:
        self.by_type.setdefault(kind, [0, 0, 0])[slot] += 1

    def scores(self) -> Dict[str, object]:
        """precision/recall/f1 (0..1, key `f1` is the entity F1), token accuracy, counts, per type."""
        out: Dict[str, object] = prf(self.correct, self.guessed, self.gold)
        out["accuracy"] = self.correct_tags / self.tokens if self.tokens else 0.0
        out.update(correct=self.correct, guessed=self.guessed, gold=self.gold, tokens=self.tokens)
        out["per_type"] = {k: prf(*v) for k, v in sorted(self.by_type.items()) if k}
        return out


def prf(correct: int, guessed: int, gold: int) -> Dict[str, float]:
    p = correct / guessed if guessed else 0.0
    r = correct / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def count_sentence(gold: Sequence[str], guess: Sequence[str], iobes: bool = False) -> EntityCounts:
    """conlleval's streaming count over one sentence (a boundary "O O" line before and after)."""
    if len(gold) != len(guess):
        raise ValueError(f"gold has {len(gold)} tags, the guess {len(guess)}")
    c = EntityCounts()
    last_g, last_gt, last_p, last_pt = "O", "", "O", ""
    in_correct = False
    for i in range(len(gold) + 1):
        g, gt = split_tag(gold[i]) if i < len(gold) else ("O", "")
        p, pt = split_tag(guess[i]) if i < len(gold) else ("O", "")
        end_g = end_of_chunk(last_g, last_gt, g, gt, iobes)
        end_p = end_of_chunk(last_p, last_pt, p, pt, iobes)
        if in_correct:
            if end_g and end_p and last_pt == last_gt:
                in_correct = False
                c.correct += 1
                c._bump(last_gt, 0)
            elif end_g != end_p or pt != gt:
                in_correct = False
        start_g = start_of_chunk(last_g, last_gt, g, gt, iobes)
        start_p = start_of_chunk(last_p, last_pt, p, pt, iobes)
        if start_g and start_p and pt == gt:
            in_correct = True
        if start_g:
            c.gold += 1
            c._bump(gt, 2)
        if start_p:
            c.guessed += 1
            c._bump(pt, 1)
        if i < len(gold):
            c.tokens += 1
            c.correct_tags += (g, gt) == (p, pt)
        last_g, last_gt, last_p, last_pt = g, gt, p, pt
    return c


def detect_iobes(*tag_sequences: Sequence[Sequence[str]]) -> bool:
    """IOBES data uses S- tags; conlleval's rules alone would merge "B-X E-X B-X E-X"."""
    return any(t.startswith("S-") for seqs in tag_sequences for seq in seqs for t in seq)


def entity_counts(gold: Sequence[Sequence[str]], guess: Sequence[Sequence[str]],
                  iobes: Optional[bool] = None) -> EntityCounts:
    """Counts over sentences (`iobes=None`: auto-detect from the tags)."""
    if len(gold) != len(guess):
        raise ValueError(f"{len(gold)} gold sentences but {len(guess)} guessed")
    if iobes is None:
        iobes = detect_iobes(gold, guess)
    total = EntityCounts()
    for g, p in zip(gold, guess):
        total = total + count_sentence(g, p, iobes)
    return total


def entity_scores(gold: Sequence[Sequence[str]], guess: Sequence[Sequence[str]],
                  iobes: Optional[bool] = None) -> Dict[str, object]:
    """conlleval's overall precision, recall, f1 (as fractions), token accuracy and per-type scores."""
    return entity_counts(gold, guess, iobes).scores()


# --- classification ---------------------------------------------------------------------------------
@dataclass
class ClassCounts:
    """Confusion counts per label id; additive across shards."""

    num_labels: int
    matrix: List[List[int]] = field(default_factory=list)  # matrix[gold][guess]

    def __post_init__(self) -> None:
        if not self.matrix:
            self.matrix = [[0] * self.num_labels for _ in range(self.num_labels)]

    def add(self, gold: Sequence[int], guess: Sequence[int]) -> "ClassCounts":
        for g, p in zip(gold, guess):
            self.matrix[int(g)][int(p)] += 1
        return self

    def __add__(self, other: "ClassCounts") -> "ClassCounts":
        return ClassCounts(self.num_labels, [[a + b for a, b in zip(r, s)] for r, s in zip(self.matrix, other.matrix)])

    def scores(self, positive: Optional[int] = None) -> Dict[str, float]:
        """accuracy, and f1: of label `positive` (default: label 1 when there are two labels,
        MRPC's convention), else macro-averaged over labels."""
        total = sum(map(sum, self.matrix))
        correct = sum(self.matrix[i][i] for i in range(self.num_labels))
        out = {"accuracy": correct / total if total else 0.0, "examples": total}
        if positive is None and self.num_labels == 2:
            positive = 1
        per = [prf(self.matrix[k][k], sum(r[k] for r in self.matrix), sum(self.matrix[k]))
               for k in range(self.num_labels)]
        if positive is not None:
            out.update(per[positive])
        else:
            out["f1"] = sum(p["f1"] for p in per) / len(per) if per else 0.0
        return out


def accuracy(gold: Sequence[int], guess: Sequence[int]) -> float:
    if len(gold) != len(guess):
        raise ValueError(f"{len(gold)} gold labels but {len(guess)} guessed")
    return sum(int(g) == int(p) for g, p in zip(gold, guess)) / len(gold) if gold else 0.0


def binary_f1(gold: Sequence[int], guess: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (MRPC reports F1 of label 1)."""
    tp = sum(int(g) == positive and int(p) == positive for g, p in zip(gold, guess))
    return prf(tp, sum(int(p) == positive for p in guess), sum(int(g) == positive for g in gold))["f1"]
