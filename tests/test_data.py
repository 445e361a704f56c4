"""Alignment, truncation, padding and readers of bert_port.data, against hand-worked expectations.

The vocabulary is written here so every id below can be checked by eye:
  0 [PAD]  1 [UNK]  2 [CLS]  3 [SEP]  4 [MASK]  5 john  6 smith  7 lives  8 in  9 new  10 york
  11 play  12 ##ing  13 un  14 ##believ  15 ##able  16 .  17 ##s
"""
import pytest
import torch

from bert_port import BertConfig, BertForTokenTagging
from bert_port import data as D
from bert_port.tokenization import BertTokenizer

VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] john smith lives in new york play ##ing un ##believ ##able . ##s".split()
L2I = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}
X = D.IGNORE


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(str(path))


def test_first_piece_carries_the_tag(tok):
    # john -> john; playing -> play ##ing; unbelievable -> un ##believ ##able; York -> york
    f = D.encode_tagged(["John", "playing", "unbelievable", "York"], ["B-PER", "O", "O", "B-LOC"], tok, L2I, 32)
    assert f.input_ids == [2, 5, 11, 12, 13, 14, 15, 10, 3]
    assert f.label_ids == [X, 1, 0, X, 0, X, X, 3, X]
    assert f.segment_ids == [0] * 9 and f.input_mask == [1] * 9
    assert f.word_starts == [1, 2, 4, 7] and f.consumed == 4


def test_truncation_keeps_whole_words_and_sep(tok):
    words, tags = ["John", "playing", "unbelievable"], ["B-PER", "O", "O"]
    # pieces per word 1, 2, 3 -> 6 pieces; room = max_seq_length - 2
    fits = D.encode_tagged(words, tags, tok, L2I, 8)  # room 6: everything
    assert fits.input_ids == [2, 5, 11, 12, 13, 14, 15, 3] and fits.consumed == 3
    for max_len in (6, 7):  # room 4 or 5: "unbelievable" (3 pieces) would be cut -> dropped whole
        f = D.encode_tagged(words, tags, tok, L2I, max_len)
        assert f.input_ids == [2, 5, 11, 12, 3]
        assert f.label_ids == [X, 1, 0, X, X]
        assert f.consumed == 2
    f = D.encode_tagged(words, tags, tok, L2I, 4)  # room 2: john + (play ##ing) does not fit
    assert f.input_ids == [2, 5, 3] and f.label_ids == [X, 1, X] and f.consumed == 1


def test_single_word_longer_than_the_window_is_cut(tok):
    # room 2 < 3 pieces: the first word alone is kept as its first two pieces, [SEP] last
    f = D.encode_tagged(["unbelievable", "John"], ["B-LOC", "B-PER"], tok, L2I, 4)
    assert f.input_ids == [2, 13, 14, 3]
    assert f.label_ids == [X, 3, X, X]
    assert f.consumed == 1


def test_unknown_word_is_an_ordinary_word(tok):
    f = D.encode_tagged(["Xyzzy", "lives"], ["B-PER", "O"], tok, L2I, 16)
    assert f.input_ids == [2, 1, 7, 3] and f.label_ids == [X, 1, 0, X]


def test_words_without_pieces_and_empty_sentences(tok):
    # "\x00" and "\u200b" tokenize to nothing: no position (-1), no label, predicted with the default
    f = D.encode_tagged(["John", "\x00", "lives", "\u200b"], ["B-PER", "O", "O", "O"], tok, L2I, 16)
    assert f.input_ids == [2, 5, 7, 3] and f.label_ids == [X, 1, 0, X]
    assert f.word_starts == [1, -1, 2, -1]
    assert D.word_predictions([f], [[9, 4, 2, 9]], 4, default=0) == [4, 0, 2, 0]
    empty = D.encode_tagged([], [], tok, L2I, 16)
    assert empty.input_ids == [2, 3] and empty.label_ids == [X, X] and empty.consumed == 0
    assert D.encode_windows([], [], tok, L2I, 16) == []


def test_windows_cover_every_word(tok):
    words = ["John", "playing", "unbelievable", "York", "lives"]
    wins = D.encode_windows(words, None, tok, None, 6)  # room 4
    # [john play ##ing] [un ##believ ##able york] [lives]
    assert [w.input_ids for w in wins] == [[2, 5, 11, 12, 3], [2, 13, 14, 15, 10, 3], [2, 7, 3]]
    assert [w.word_starts for w in wins] == [[1, 2], [1, 4], [1]]
    preds = [[0, 1, 0, 0, 0], [0, 3, 0, 0, 4, 0], [0, 2, 0]]
    assert D.word_predictions(wins, preds, 5) == [1, 0, 3, 4, 2]


def test_errors(tok):
    with pytest.raises(ValueError, match="not in the label map"):
        D.encode_tagged(["John"], ["B-ORG"], tok, L2I, 8)
    with pytest.raises(ValueError, match="no room"):
        D.encode_tagged(["John"], ["O"], tok, L2I, 2)
    with pytest.raises(ValueError, match="1 words but 2 tags"):
        D.encode_tagged(["John"], ["O", "O"], tok, L2I, 8)


def test_padding_to_the_longest_in_the_batch(tok):
    a = D.encode_tagged(["John", "playing"], ["B-PER", "O"], tok, L2I, 16)  # 5 ids
    b = D.encode_tagged(["York"], ["B-LOC"], tok, L2I, 16)  # 3 ids
    batch = D.pad_batch([a, b])
    assert batch["input_ids"].tolist() == [[2, 5, 11, 12, 3], [2, 10, 3, 0, 0]]
    assert batch["input_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["segment_ids"].tolist() == [[0] * 5, [0] * 5]
    assert batch["labels"].tolist() == [[X, 1, 0, X, X], [X, 3, X, X, X]]
    fixed = D.pad_batch([b], length=6)
    assert fixed["input_ids"].tolist() == [[2, 10, 3, 0, 0, 0]] and fixed["labels"].tolist() == [[X, 3, X, X, X, X]]
    with pytest.raises(ValueError, match="shorter"):
        D.pad_batch([a], length=4)


def test_pair_truncation_longest_first(tok):
    # a = john smith lives in new (5), b = play ##ing . (3); max 11 -> room 8: fits as is
    f = D.encode_pair("John Smith lives in new", "playing.", tok, 11, label_id=1)
    assert f.input_ids == [2, 5, 6, 7, 8, 9, 3, 11, 12, 16, 3]
    assert f.segment_ids == [0] * 7 + [1] * 4 and f.label_ids == 1
    # max 8 -> room 5: (5,3) pop a -> (4,3) pop a -> (3,3) tie: pop b -> (3,2)
    f = D.encode_pair("John Smith lives in new", "playing.", tok, 8)
    assert f.input_ids == [2, 5, 6, 7, 3, 11, 12, 3]
    assert f.segment_ids == [0, 0, 0, 0, 0, 1, 1, 1]
    a, b = list("abcdefg"), list("xy")
    D.truncate_seq_pair(a, b, 4)  # (7,2) -> pops a to (2,2)
    assert a == ["a", "b"] and b == ["x", "y"]
    single = D.encode_pair("John Smith lives", None, tok, 4)
    assert single.input_ids == [2, 5, 6, 3] and single.segment_ids == [0, 0, 0, 0]


def test_read_conll(tmp_path):
    p = tmp_path / "x.conll"
    p.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
                 "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n", encoding="utf-8")
    got = D.read_conll(p)
    assert [(s.words, s.tags) for s in got] == [(["EU", "rejects"], ["B-ORG", "O"]),
                                                (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
    bad = tmp_path / "bad.conll"
    bad.write_text("EU B-ORG\nrejects\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.conll:2: expected 'token ... tag'"):
        D.read_conll(bad)
    untagged = tmp_path / "u.conll"
    untagged.write_text("EU\nrejects\n\nPeter\n", encoding="utf-8")
    assert [(s.words, s.tags) for s in D.read_conll(untagged, require_tags=False)] == [
        (["EU", "rejects"], None), (["Peter"], None)]
    binary = tmp_path / "b.conll"
    binary.write_bytes(b"EU \xff\xfe O\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        D.read_conll(binary)
    with pytest.raises(ValueError, match="is a directory"):
        D.read_conll(tmp_path)


def test_read_glue_tsv_mrpc(tmp_path):
    p = tmp_path / "train.tsv"
    p.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                 '1\t702876\t702977\tAmrozi accused his brother .\t"Referring to him ," he said .\n'
                 "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n", encoding="utf-8")
    got = D.read_glue_tsv(p)
    assert got == [D.PairExample("Amrozi accused his brother .", '"Referring to him ," he said .', "1"),
                   D.PairExample("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .", "0")]
    assert D.class_labels(e.label for e in got) == ["0", "1"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t2\tonly three\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 5"):
        D.read_glue_tsv(bad)
    sst = tmp_path / "sst.tsv"
    sst.write_text("sentence\tlabel\ngreat movie\t1\n", encoding="utf-8")
    assert D.read_glue_tsv(sst) == [D.PairExample("great movie", None, "1")]


def test_label_map_round_trips_through_save_pretrained(tmp_path):
    labels = D.tag_labels([["B-PER", "O", "I-PER"], ["B-LOC"]])
    assert labels == ["O", "B-LOC", "B-PER", "I-PER"]
    config = BertConfig(20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    model = BertForTokenTagging(config, num_labels=len(labels))
    D.attach_label_map(model.config, labels)
    model.save_pretrained(tmp_path)
    loaded = BertForTokenTagging.from_pretrained(tmp_path).eval()
    assert loaded.num_labels == 4
    assert D.label_map_from_config(loaded.config) == labels
    assert loaded.config.label2id == {"O": 0, "B-LOC": 1, "B-PER": 2, "I-PER": 3}
    bare = BertConfig(20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="no id2label"):
        D.label_map_from_config(bare)
    bare.id2label = {"0": "O", "2": "B-PER"}
    with pytest.raises(ValueError, match="not 0..1"):
        D.label_map_from_config(bare)


def test_batch_tensors_feed_the_model(tok):
    """The padded batch gives the same per-token loss as running each sentence alone."""
    config = BertConfig(len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForTokenTagging(config, num_labels=5).eval()
    a = D.encode_tagged(["John", "playing"], ["B-PER", "O"], tok, L2I, 16)
    b = D.encode_tagged(["York"], ["B-LOC"], tok, L2I, 16)
    batch = D.pad_batch([a, b])
    both = model(batch["input_ids"], batch["segment_ids"], batch["input_mask"], batch["labels"])
    la = model(*(D.pad_batch([a])[k] for k in ("input_ids", "segment_ids", "input_mask", "labels")))
    lb = model(*(D.pad_batch([b])[k] for k in ("input_ids", "segment_ids", "input_mask", "labels")))
    # 2 labelled tokens in a, 1 in b: the batch mean weights them 2:1
    assert torch.allclose(both, (2 * la + lb) / 3, atol=1e-6)
