"""Entity P/R/F1 with conlleval.pl semantics, and classification scores, against hand-worked cases.

Each case lists the chunks (type, first word, last word) that conlleval's start/end rules give,
and the counts: correct = guessed chunks equal to a gold chunk in type, start and end.
"""
import pytest

from bert_port import metrics as M


def counts(gold, guess, iobes=None):
    c = M.entity_counts(gold, guess, iobes)
    return c.correct, c.guessed, c.gold


def test_split_tag_at_the_first_hyphen():
    assert M.split_tag("B-PER") == ("B", "PER")
    assert M.split_tag("I-MISC-X") == ("I", "MISC-X")
    assert M.split_tag("O") == ("O", "")


def test_bio_basic():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]  # PER(0,1) LOC(3,3)
    guess = [["B-PER", "I-PER", "O", "B-ORG"]]  # PER(0,1) ORG(3,3)
    assert M.chunks(gold[0]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert counts(gold, guess) == (1, 2, 2)
    s = M.entity_scores(gold, guess)
    assert (s["precision"], s["recall"], s["f1"]) == (0.5, 0.5, 0.5)
    assert s["accuracy"] == 3 / 4  # token accuracy: the last tag differs
    assert s["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert s["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert s["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_i_after_o_starts_a_chunk():
    # conlleval: O -> I-PER starts a chunk, so the stray I- is a chunk equal to B-PER I-PER
    gold = [["O", "B-PER", "I-PER", "O"]]  # PER(1,2)
    guess = [["O", "I-PER", "I-PER", "O"]]  # PER(1,2)
    assert M.chunks(guess[0]) == [("PER", 1, 2)]
    assert counts(gold, guess) == (1, 1, 1)


def test_type_change_ends_and_starts():
    # B-PER I-LOC: the type change ends PER(0,0) and starts LOC(1,1)
    assert M.chunks(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    gold = [["B-PER", "I-PER", "I-PER"]]  # PER(0,2)
    guess = [["B-PER", "I-LOC", "I-PER"]]  # PER(0,0) LOC(1,1) PER(2,2)
    assert counts(gold, guess) == (0, 3, 1)


def test_boundaries_must_match_exactly():
    gold = [["B-ORG", "I-ORG", "I-ORG"]]  # ORG(0,2)
    assert counts(gold, [["B-ORG", "I-ORG", "O"]]) == (0, 1, 1)  # ORG(0,1): ends early
    assert counts(gold, [["O", "B-ORG", "I-ORG"]]) == (0, 1, 1)  # ORG(1,2): starts late
    assert counts([["B-PER", "I-PER"]], [["B-PER", "B-PER"]]) == (0, 2, 1)  # PER(0,0) PER(1,1) vs PER(0,1)
    assert counts([["B-PER", "B-PER"]], [["B-PER", "B-PER"]]) == (2, 2, 2)  # adjacent chunks


def test_sentence_boundary_ends_chunks():
    # As two sentences: LOC(0,0) | LOC(0,0) -> 2 chunks; as one sentence I-LOC I-LOC is one chunk
    gold = [["O", "B-LOC"], ["I-LOC", "O"]]
    guess = [["O", "B-LOC"], ["B-LOC", "O"]]
    assert counts(gold, guess) == (2, 2, 2)
    assert counts([["O", "B-LOC", "I-LOC", "O"]], [["O", "B-LOC", "B-LOC", "O"]]) == (0, 2, 1)


def test_iob1():
    # IOB1: I- inside chunks, B- only where a chunk follows one of the same type
    gold = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]  # PER(0,1) PER(2,2) LOC(4,4)
    guess = [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]]  # PER(0,2) LOC(4,4)
    assert M.chunks(gold[0]) == [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)]
    assert counts(gold, guess) == (1, 2, 3)
    s = M.entity_scores(gold, guess)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))  # 0.4
    # IOB1 and the same chunks in IOB2 agree
    assert counts([["B-PER", "I-PER", "B-PER", "O", "B-LOC"]], guess) == (1, 2, 3)


def test_ioe_end_tags():
    # conlleval's E- rules (IOE): I-NP E-NP is one chunk, E-NP E-NP two, E- then I- starts anew
    assert M.chunks(["I-NP", "E-NP", "E-NP"]) == [("NP", 0, 1), ("NP", 2, 2)]
    assert M.chunks(["E-NP", "I-NP", "E-NP"]) == [("NP", 0, 0), ("NP", 1, 2)]


def test_iobes_needs_the_extension():
    # conlleval.pl has no S- rule and no end at E- B-: it merges IOBES chunks; iobes=True splits them
    tags = ["B-PER", "E-PER", "B-PER", "E-PER", "S-LOC", "S-LOC"]
    assert M.chunks(tags) == [("PER", 0, 3), ("LOC", 4, 5)]
    assert M.chunks(tags, iobes=True) == [("PER", 0, 1), ("PER", 2, 3), ("LOC", 4, 4), ("LOC", 5, 5)]
    assert M.detect_iobes([tags])
    guess = ["B-PER", "E-PER", "S-PER", "O", "S-LOC", "S-LOC"]  # PER(0,1) PER(2,2) LOC(4,4) LOC(5,5)
    assert counts([tags], [guess]) == (3, 4, 4)  # auto-detected IOBES: PER(0,1) and both LOCs correct


def test_counts_add_across_shards():
    gold = [["B-PER", "O"], ["B-LOC", "I-LOC"], ["O"]]
    guess = [["B-PER", "O"], ["B-LOC", "O"], ["B-ORG"]]
    whole = M.entity_counts(gold, guess)
    parts = M.entity_counts(gold[:1], guess[:1]) + M.entity_counts(gold[1:], guess[1:])
    assert (whole.correct, whole.guessed, whole.gold, whole.tokens, whole.correct_tags) == (1, 3, 2, 5, 3)
    assert parts == whole
    assert M.entity_scores([["O"]], [["O"]])["f1"] == 0.0  # no chunks at all: 0, not a division error
    with pytest.raises(ValueError):
        M.entity_counts([["O", "O"]], [["O"]])


def test_classification_scores():
    gold, guess = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, fp 1, fn 1
    assert M.accuracy(gold, guess) == 3 / 5
    assert M.binary_f1(gold, guess) == pytest.approx(2 / 3)
    s = M.ClassCounts(2).add(gold, guess).scores()
    assert s["accuracy"] == 3 / 5 and s["f1"] == pytest.approx(2 / 3) and s["precision"] == pytest.approx(2 / 3)
    # three labels: macro F1. label 0: tp1 fp0 fn1 -> 2/3; label 1: tp1 fp1 fn0 -> 2/3; label 2: tp1 -> 1
    three = M.ClassCounts(3).add([0, 0, 1, 2], [0, 1, 1, 2])
    assert three.scores()["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    halves = M.ClassCounts(3).add([0, 0], [0, 1]) + M.ClassCounts(3).add([1, 2], [1, 2])
    assert halves.matrix == three.matrix
