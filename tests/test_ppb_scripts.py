"""Client scripts written for pytorch_pretrained_bert 0.6.2, run side by side on ppb and on bert_port.

Each script is written once, as a real ppb script is (run_classifier.py, a BERT-NER tagger, a
BertPreTrainedModel subclass with a CRF head, extract_features.py, run_squad.py,
simple_lm_finetuning.py, run_swag.py, the tokenizer), against a namespace holding the modules a
script imports: `pytorch_pretrained_bert` (+ .modeling, .optimization, .file_utils, .tokenization)
or the same paths under `bert_port`. Both runs happen in this process from the same seed and the
same "pretrained" directory (ppb layout: bert_config.json + pytorch_model.bin with the old
gamma/beta names + vocab.txt), so initial head weights, data order (RandomSampler draws from the
global RNG after the model is built) and dropout masks all come from the same random stream.
The scripts return their numbers; the tests require ppb's numbers, with dropout 0 and 0.1:
losses, metrics, logits and features within 1e-5 (at every position, padding included, as the
scripts read them), weights after training within 1e-4,
tokens, ids, data order and parameter names exactly. Two float32 exceptions, both rounding of an
identical computation (test_scripts_agree_in_float64 reruns every script in float64 and requires
1e-9 on everything, these included):
- parameters whose true gradient is 0 (the attention key bias; a bias shared by every logit of one
  softmax) are not compared after training, and logits such a bias shifts are compared centred
  (see KEY_BIAS);
- MLM prediction scores (magnitude ~5) get 1e-5 relative to their largest value.
Run with `-s` to see the largest differences of each script.
"""
from __future__ import annotations

import importlib
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from tests.conftest import TINY, scale_weights_

pytest.importorskip("pytorch_pretrained_bert")

pytestmark = pytest.mark.filterwarnings("ignore:This overload of add")  # ppb's BertAdam: deprecated torch overloads

TOL = 1e-5  # losses, metrics, logits, features
WEIGHT_TOL = 1e-4  # parameters after training
SEED = 42
DROPOUTS = [0.0, 0.1]

# A made-up uncased WordPiece vocabulary, exactly TINY's vocab_size lines (ids index the embeddings).
_WORDS = """the a an cat dog sat on mat ran fast slow big small red blue green house car tree is was and or
not very good bad movie film great terrible love hate it this that i you we they he she park city john
mary paris london works in at to of went play over lazy quick jump walk cafe hello world bert model
run ##s ##ing ##ed ##er ##ly ##y un ##able ##ish 中 国 爱 我""".split()
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "'", "-"] + _WORDS
VOCAB += [f"[unused{i}]" for i in range(1, 1 + TINY["vocab_size_or_config_json_file"] - len(VOCAB))]
assert len(VOCAB) == TINY["vocab_size_or_config_json_file"] and len(set(VOCAB)) == len(VOCAB)


def sentences(n: int, seed: int, min_words: int = 3, max_words: int = 9):
    """Fixed pseudo-random sentences (their own generator: the scripts' data, not the scripts' RNG)."""
    rs = np.random.RandomState(seed)
    pool = [w for w in _WORDS if not w.startswith("##") and len(w) > 1] + ["walked", "running", "quickly", "jumps",
                                                                          "unable", "Paris", "John", "!", ","]
    return [" ".join(rs.choice(pool, rs.randint(min_words, max_words + 1))) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# The two libraries, as a script imports them
# --------------------------------------------------------------------------------------------------
def load_lib(root: str) -> SimpleNamespace:
    """`import root`, `root.modeling`, `root.optimization`, `root.file_utils`, `root.tokenization`."""
    mods = {part: importlib.import_module(f"{root}.{part}")
            for part in ("modeling", "optimization", "file_utils", "tokenization")}
    return SimpleNamespace(name=root, top=importlib.import_module(root), **mods)


LIBS = {"ppb": "pytorch_pretrained_bert", "bert_port": "bert_port"}


def seed_everything(seed: int = SEED) -> None:
    """What run_classifier.py & co. do at start."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bert_adam_groups(model, weight_decay: float = 0.01, skip=()):
    """run_classifier.py / run_squad.py 0.6.2: groups from named_parameters() by name."""
    param_optimizer = list(model.named_parameters())
    param_optimizer = [n for n in param_optimizer if not any(s in n[0] for s in skip)]
    no_decay = ['bias', 'LayerNorm.bias', 'LayerNorm.weight']
    groups = [
        {'params': [p for n, p in param_optimizer if not any(nd in n for nd in no_decay)],
         'weight_decay': weight_decay},
        {'params': [p for n, p in param_optimizer if any(nd in n for nd in no_decay)], 'weight_decay': 0.0},
    ]
    assert groups[0]['params'] and groups[1]['params']
    return groups


# Parameters whose true gradient is exactly 0, so that after training they hold float32 rounding noise
# that Adam's normalisation (m / (sqrt(v) + eps)) has blown up to lr-sized steps of random sign, in ppb
# as in any implementation (in float64 both libraries agree on them to 1e-13):
# - the attention key bias adds q.b_k to every score of a query row, which the softmax ignores;
# - a bias added to every logit of one softmax (run_swag's 1-output classifier, run_squad's qa_outputs
#   bias: each is a constant over the choices / over the positions).
# They change no loss and no prediction; they are left out of the weight comparison (their gradient is
# checked to be noise in test_zero_gradient_parameters_are_noise), and the logits they shift by a
# constant are compared centred.
KEY_BIAS = "attention.self.key.bias"


def weights(model, zero_grad=(KEY_BIAS,)) -> dict:
    if torch.get_default_dtype() == torch.float64:  # the float64 runs: noise ~1e-17, so compare them too
        zero_grad = ()
    return {f"w:{k}": v.detach().clone() for k, v in model.state_dict().items()
            if not any(k.endswith(z) for z in zero_grad)}


def centred(logits: torch.Tensor) -> np.ndarray:
    """Logits less their mean over the softmax axis (the last): what a shared constant cannot move."""
    return (logits - logits.mean(-1, keepdim=True)).numpy()


def pad(rows, length, value=0):
    return [list(r)[:length] + [value] * (length - len(r)) for r in rows]


# --------------------------------------------------------------------------------------------------
# The "pretrained" model every script starts from
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """dropout -> a ppb-layout directory: ppb BertForPreTraining with scaled weights, as ppb's S3
    archives are laid out (bert_config.json, pytorch_model.bin with LayerNorm gamma/beta, vocab.txt)."""
    from pytorch_pretrained_bert import modeling

    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = modeling.BertForPreTraining(modeling.BertConfig(**TINY))
    torch.random.set_rng_state(state)
    scale_weights_(model, std=0.2, seed=7)
    sd = model.state_dict()
    old_names = type(sd)((k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"),
                          v) for k, v in sd.items())
    dirs = {}
    for p in DROPOUTS:
        d = tmp_path_factory.mktemp(f"bert-tiny-uncased-dropout{p}")
        config = modeling.BertConfig(**TINY, hidden_dropout_prob=p, attention_probs_dropout_prob=p).to_dict()
        (d / modeling.BERT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        torch.save(old_names, d / "pytorch_model.bin")
        (d / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
        dirs[p] = str(d)
    return dirs


def fresh_process_state(root: str) -> None:
    """What a script finds in a new process: bert_port decides its Linear kernels once per shape class
    and caches the choice; start each run with an empty cache, so that what deciding costs (time,
    and anything it might draw from the random stream) happens inside the script, whatever ran before."""
    if root == "bert_port":
        importlib.import_module("bert_port.kernels").reset()


def run_both(script, tmp_path, *args):
    """Run `script(lib, workdir, *args)` for ppb then bert_port; each in its own work directory."""
    results = {}
    for tag, root in LIBS.items():
        workdir = tmp_path / tag
        workdir.mkdir()
        fresh_process_state(root)
        results[tag] = script(load_lib(root), str(workdir), *args)
    return results["ppb"], results["bert_port"]


def assert_same(theirs: dict, ours: dict, what: str, tol: float = TOL, weight_tol: float = WEIGHT_TOL) -> dict:
    """Every number of ppb's run equal in bert_port's: exact for strings, names and token lists, `tol`
    for numbers, `weight_tol` for `w:` entries (weights after training). MLM prediction scores (vocab
    logits of magnitude ~5 here) get `tol` relative to their largest value: in float32 they already
    differ by 3e-6 before any training (rounding of an equivalent computation; 2e-14 in float64).
    Prints the largest differences."""
    assert list(theirs) == list(ours), f"{what}: the scripts returned different entries (parameter names/order?)"
    failures, worst = [], {}
    for key, ref in theirs.items():
        out = ours[key]
        if isinstance(ref, (str, bool)) or (isinstance(ref, (list, tuple)) and ref and isinstance(ref[0], (str, list))):
            if ref != out:
                failures.append(f"{key}: {ref!r} != {out!r}")
            continue
        a = np.asarray(ref.detach() if torch.is_tensor(ref) else ref, dtype=np.float64)
        b = np.asarray(out.detach() if torch.is_tensor(out) else out, dtype=np.float64)
        if a.shape != b.shape:
            failures.append(f"{key}: shape {a.shape} != {b.shape}")
            continue
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        kind = "weights" if key.startswith("w:") else key.split("[")[0]
        worst[kind] = max(worst.get(kind, 0.0), diff)
        limit = weight_tol if key.startswith("w:") else tol
        if key.startswith("prediction_scores"):
            limit = tol * max(1.0, float(np.abs(a).max()))
        if not diff <= limit:
            failures.append(f"{key}: max |ppb - bert_port| = {diff:.3g} > {limit:.3g}")
    print(f"\n[{what}] max |ppb - bert_port|: " + ", ".join(f"{k}={v:.2g}" for k, v in worst.items()))
    assert not failures, f"{what}: bert_port differs from ppb 0.6.2:\n  " + "\n  ".join(failures[:20])
    return worst


def test_a_step_without_dropout_draws_no_random_numbers(pretrained):
    """ppb's forward/backward with dropout 0 leaves the global random stream alone, so a script's later
    draws (RandomSampler's order, torch.randperm, its own init) do not depend on which library runs:
    bert_port must not draw either, also on its first call for a shape (cold kernel cache)."""
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 10:] = 0
    for root in LIBS.values():
        fresh_process_state(root)
        model = load_lib(root).modeling.BertForSequenceClassification.from_pretrained(pretrained[0.0], num_labels=3)
        drew = []
        for step in range(2):
            before = torch.random.get_rng_state()
            model.train()
            model(ids, None, mask, torch.tensor([0, 1, 2, 0])).backward()
            model.eval()
            with torch.no_grad():
                model(ids, None, mask)
            drew.append(not torch.equal(before, torch.random.get_rng_state()))
        assert drew == [False, False], f"{root}: a dropout-free train + eval step drew from the global RNG {drew}"


# --------------------------------------------------------------------------------------------------
# 1. run_classifier.py
# --------------------------------------------------------------------------------------------------
def run_classifier(lib, workdir, bert_model):
    BertForSequenceClassification = lib.modeling.BertForSequenceClassification
    WEIGHTS_NAME, CONFIG_NAME = lib.modeling.WEIGHTS_NAME, lib.modeling.CONFIG_NAME
    BertAdam = lib.optimization.BertAdam
    PYTORCH_PRETRAINED_BERT_CACHE = lib.file_utils.PYTORCH_PRETRAINED_BERT_CACHE
    BertTokenizer = lib.tokenization.BertTokenizer

    seed_everything()
    max_seq_length, batch_size, epochs, num_labels = 16, 4, 2, 3
    tokenizer = BertTokenizer.from_pretrained(bert_model, do_lower_case=True)

    def features(texts):
        rows, masks, segs = [], [], []
        for i, text in enumerate(texts):
            a = tokenizer.tokenize(text)
            b = tokenizer.tokenize(texts[i - 1]) if i % 2 else []  # every other example is a pair
            while len(a) + len(b) > max_seq_length - (3 if b else 2):
                (a if len(a) > len(b) else b).pop()
            tokens = ["[CLS]"] + a + ["[SEP]"] + (b + ["[SEP]"] if b else [])
            segment_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            rows.append(ids)
            masks.append([1] * len(ids))
            segs.append(segment_ids)
        as_t = lambda r: torch.tensor(pad(r, max_seq_length), dtype=torch.long)  # noqa: E731
        return as_t(rows), as_t(masks), as_t(segs)

    train_texts, eval_texts = sentences(16, seed=1), sentences(8, seed=2)
    train_labels = torch.tensor([len(t) % num_labels for t in train_texts])
    eval_labels = torch.tensor([len(t) % num_labels for t in eval_texts])
    num_train_optimization_steps = int(len(train_texts) / batch_size) * epochs

    cache_dir = os.path.join(str(PYTORCH_PRETRAINED_BERT_CACHE), 'distributed_{}'.format(-1))
    model = BertForSequenceClassification.from_pretrained(bert_model, cache_dir=cache_dir, num_labels=num_labels)
    out = {"w:classifier.weight@init": model.classifier.weight.detach().clone()}
    optimizer = BertAdam(bert_adam_groups(model), lr=1e-3, warmup=0.1, t_total=num_train_optimization_steps)

    train_data = TensorDataset(*features(train_texts), train_labels)
    train_dataloader = DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=batch_size)
    losses, order = [], []
    for _ in range(epochs):  # no model.train(): from_pretrained returns train mode (as in ppb)
        for step, batch in enumerate(train_dataloader):
            input_ids, input_mask, segment_ids, label_ids = batch
            order.append(input_ids[:, 1].tolist())
            loss = model(input_ids, segment_ids, input_mask, label_ids)
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
    out["data_order"] = order
    out["loss"] = losses

    model.eval()
    eval_data = TensorDataset(*features(eval_texts), eval_labels)
    logits_all = []
    for input_ids, input_mask, segment_ids, label_ids in DataLoader(eval_data, sampler=SequentialSampler(eval_data),
                                                                    batch_size=3):
        with torch.no_grad():
            tmp_eval_loss = model(input_ids, segment_ids, input_mask, label_ids)
            logits = model(input_ids, segment_ids, input_mask)
        out.setdefault("eval_loss", []).append(tmp_eval_loss.item())
        logits_all.append(logits.numpy())
    logits_all = np.concatenate(logits_all)
    out["eval_logits"] = logits_all
    out["eval_accuracy"] = float(np.sum(np.argmax(logits_all, axis=1) == eval_labels.numpy()) / len(eval_texts))

    # Save a trained model, configuration and tokenizer; reload them (run_classifier.py 0.6.2)
    output_dir = os.path.join(workdir, "out")
    os.makedirs(output_dir)
    model_to_save = model.module if hasattr(model, 'module') else model
    output_model_file = os.path.join(output_dir, WEIGHTS_NAME)
    output_config_file = os.path.join(output_dir, CONFIG_NAME)
    torch.save(model_to_save.state_dict(), output_model_file)
    model_to_save.config.to_json_file(output_config_file)
    tokenizer.save_vocabulary(output_dir)
    out.update(weights(model_to_save))

    model = BertForSequenceClassification.from_pretrained(output_dir, num_labels=num_labels)
    tokenizer = BertTokenizer.from_pretrained(output_dir, do_lower_case=True)
    out["reloaded_training"] = model.training
    model.eval()
    input_ids, input_mask, segment_ids = features(eval_texts)
    with torch.no_grad():
        out["reloaded_logits"] = model(input_ids, segment_ids, input_mask).numpy()
    assert np.abs(out["reloaded_logits"] - logits_all).max() < 1e-5  # the saved model is the trained one
    return out


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_run_classifier(pretrained, tmp_path, dropout):
    theirs, ours = run_both(run_classifier, tmp_path, pretrained[dropout])
    assert theirs["reloaded_training"] is True
    assert len(theirs["loss"]) == 8 and theirs["loss"][0] != theirs["loss"][-1]
    assert_same(theirs, ours, f"run_classifier dropout={dropout}")


# --------------------------------------------------------------------------------------------------
# 2. BERT-NER / the Medium article's token tagger
# --------------------------------------------------------------------------------------------------
def ner_tagger(lib, workdir, bert_model, full_finetuning):
    BertTokenizer, BertForTokenClassification = lib.top.BertTokenizer, lib.top.BertForTokenClassification
    from torch.optim import Adam

    seed_everything()
    MAX_LEN, bs, num_tags = 14, 4, 5
    tokenizer = BertTokenizer.from_pretrained(bert_model, do_lower_case=True)
    texts = sentences(12, seed=3)
    rs = np.random.RandomState(4)
    tokenized_texts = [tokenizer.tokenize(sent) for sent in texts]
    labels = [list(rs.randint(1, num_tags, len(t))) for t in tokenized_texts]
    input_ids = pad([tokenizer.convert_tokens_to_ids(txt) for txt in tokenized_texts], MAX_LEN)
    tags = pad(labels, MAX_LEN, value=0)  # tag2idx["PAD"] = 0
    attention_masks = [[float(i > 0) for i in ii] for ii in input_ids]
    tr_inputs, tr_tags, tr_masks = (torch.tensor(x) for x in (input_ids[:8], tags[:8], attention_masks[:8]))
    val_inputs, val_tags, val_masks = (torch.tensor(x) for x in (input_ids[8:], tags[8:], attention_masks[8:]))
    train_data = TensorDataset(tr_inputs, tr_masks, tr_tags)
    train_dataloader = DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=bs)

    model = BertForTokenClassification.from_pretrained(bert_model, num_labels=num_tags)
    if full_finetuning:
        param_optimizer = list(model.named_parameters())
        no_decay = ['bias', 'gamma', 'beta']
        optimizer_grouped_parameters = [
            {'params': [p for n, p in param_optimizer if not any(nd in n for nd in no_decay)],
             'weight_decay_rate': 0.01},
            {'params': [p for n, p in param_optimizer if any(nd in n for nd in no_decay)], 'weight_decay_rate': 0.0}]
    else:  # fine-tune the classifier and the attention queries only, selected by name
        selected = []
        for n, p in model.named_parameters():
            p.requires_grad = 'classifier' in n or 'query' in n
            if p.requires_grad:
                selected.append(n)
        assert len(selected) == 2 + 2 * TINY["num_hidden_layers"], selected
        optimizer_grouped_parameters = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = Adam(optimizer_grouped_parameters, lr=3e-3)

    out = {"selected": [n for n, p in model.named_parameters() if p.requires_grad], "loss": []}
    max_grad_norm = 1.0
    key_bias_grads = []
    for _ in range(2):
        model.train()
        for batch in train_dataloader:
            b_input_ids, b_input_mask, b_labels = batch
            loss = model(b_input_ids, token_type_ids=None, attention_mask=b_input_mask, labels=b_labels)
            loss.backward()
            out["loss"].append(loss.item())
            key_bias_grads.extend(p.grad.abs().max().item() for n, p in model.named_parameters()
                                  if n.endswith("attention.self.key.bias") and p.grad is not None)
            torch.nn.utils.clip_grad_norm_(parameters=model.parameters(), max_norm=max_grad_norm)
            optimizer.step()
            model.zero_grad()

    model.eval()
    with torch.no_grad():
        out["eval_loss"] = model(val_inputs, token_type_ids=None, attention_mask=val_masks, labels=val_tags).item()
        logits = model(val_inputs, token_type_ids=None, attention_mask=val_masks)
    logits = logits.detach().cpu().numpy()
    real = val_masks.numpy() > 0
    predictions = np.argmax(logits, axis=2)
    out["eval_logits[every position]"] = logits
    out["predictions"] = [[int(p) for p, m in zip(row, mrow) if m] for row, mrow in zip(predictions, real)]
    out["eval_accuracy"] = float((predictions[real] == val_tags.numpy()[real]).mean())
    out["key_bias_grad_max"] = max(key_bias_grads, default=0.0)  # noise: see KEY_BIAS
    out.update(weights(model))
    return out


@pytest.mark.parametrize("dropout", DROPOUTS)
@pytest.mark.parametrize("full_finetuning", [True, False], ids=["full", "by-name"])
def test_ner_tagger(pretrained, tmp_path, dropout, full_finetuning):
    theirs, ours = run_both(ner_tagger, tmp_path, pretrained[dropout], full_finetuning)
    assert theirs["selected"]
    if full_finetuning:
        assert 0 < theirs["key_bias_grad_max"] < 1e-6 and ours["key_bias_grad_max"] < 1e-6
    assert_same(theirs, ours, f"ner full_finetuning={full_finetuning} dropout={dropout}")


# --------------------------------------------------------------------------------------------------
# 3. A BertPreTrainedModel subclass with its own head (BERT + CRF tagger)
# --------------------------------------------------------------------------------------------------
def make_crf_class(lib):
    class BertCRF(lib.modeling.BertPreTrainedModel):
        def __init__(self, config, num_tags):
            super(BertCRF, self).__init__(config)
            self.num_tags = num_tags
            self.bert = lib.modeling.BertModel(config)
            self.dropout = nn.Dropout(config.hidden_dropout_prob)
            self.hidden2tag = nn.Linear(config.hidden_size, num_tags)
            self.transitions = nn.Parameter(torch.ones(num_tags, num_tags))
            self.start_transitions = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
            allowed = torch.ones(num_tags, num_tags)
            allowed[0, 1:] = 0  # no move out of tag 0 except to itself
            self.register_buffer("allowed", allowed)
            self.impossible = torch.tensor(-1e4)  # a plain tensor attribute
            self.apply(self.init_bert_weights)

        def emissions(self, input_ids, token_type_ids=None, attention_mask=None):
            sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, output_all_encoded_layers=False)
            return self.hidden2tag(self.dropout(sequence_output))

        def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
            em = self.emissions(input_ids, token_type_ids, attention_mask)  # (B, S, T)
            if labels is None:
                return em
            trans = self.transitions + (1 - self.allowed) * self.impossible
            mask = attention_mask.bool()
            first = labels[:, 0]
            score = self.start_transitions[first] + em[:, 0].gather(1, first[:, None]).squeeze(1)
            alpha = self.start_transitions + em[:, 0]
            for t in range(1, em.shape[1]):
                step = trans[labels[:, t - 1], labels[:, t]] + em[:, t].gather(1, labels[:, t, None]).squeeze(1)
                score = score + step * mask[:, t]
                nxt = torch.logsumexp(alpha[:, :, None] + trans[None] + em[:, t, None, :], dim=1)
                alpha = torch.where(mask[:, t, None], nxt, alpha)
            return (torch.logsumexp(alpha, dim=1) - score).sum() / mask.sum()  # NLL per token

    return BertCRF


def crf_subclass(lib, workdir, bert_model):
    seed_everything()
    model = make_crf_class(lib).from_pretrained(bert_model, num_tags=4)
    out = {"training": model.training,
           "w:transitions@init": model.transitions.detach().clone(),
           "w:start_transitions@init": model.start_transitions.detach().clone(),
           "w:hidden2tag.weight@init": model.hidden2tag.weight.detach().clone(),
           "allowed": model.allowed.clone()}
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (6, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate([12, 9, 5, 12, 7, 3]):
        mask[row, n:] = 0
    ids = ids * mask
    labels = torch.randint(1, 4, ids.shape, generator=g) * mask  # gold paths never use a forbidden transition
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out["loss"] = []
    for step in range(4):
        batch = torch.randperm(6)[:4]  # from the global RNG
        loss = model(ids[batch], None, mask[batch], labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["loss"].append(loss.item())
    model.eval()
    with torch.no_grad():
        out["eval_nll"] = model(ids, None, mask, labels).item()
        out["emissions[every position]"] = model(ids, None, mask)
    out.update(weights(model))
    return out


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_subclass_with_crf_head(pretrained, tmp_path, dropout):
    theirs, ours = run_both(crf_subclass, tmp_path, pretrained[dropout])
    assert theirs["training"] is True
    assert np.isfinite(ours["loss"]).all()
    assert (ours["w:transitions@init"] == 1).all() and ours["allowed"].sum() == 13
    assert "w:allowed" in ours  # a registered buffer is in the state dict
    assert_same(theirs, ours, f"BertPreTrainedModel subclass (CRF) dropout={dropout}")


# --------------------------------------------------------------------------------------------------
# 4. extract_features.py
# --------------------------------------------------------------------------------------------------
def extract_features(lib, workdir, bert_model):
    BertTokenizer, BertModel = lib.tokenization.BertTokenizer, lib.modeling.BertModel
    seed_everything()
    layer_indexes = [-1, -2]
    max_seq_length = 20
    tokenizer = BertTokenizer.from_pretrained(bert_model, do_lower_case=True)
    lines = sentences(5, seed=6, max_words=12) + ["John went to Paris ||| Mary works in London"]
    feats = []
    for line in lines:
        a, _, b = line.partition(" ||| ")
        tokens_a, tokens_b = tokenizer.tokenize(a), tokenizer.tokenize(b) if b else []
        tokens = ["[CLS]"] + tokens_a[:max_seq_length - 3] + ["[SEP]"] + (tokens_b + ["[SEP]"] if tokens_b else [])
        tokens = tokens[:max_seq_length]
        input_type_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens) - len(tokens_a) - 2)
        feats.append((tokens, tokenizer.convert_tokens_to_ids(tokens), input_type_ids[:len(tokens)]))
    all_input_ids = torch.tensor(pad([f[1] for f in feats], max_seq_length))
    all_input_mask = torch.tensor(pad([[1] * len(f[1]) for f in feats], max_seq_length))
    all_types = torch.tensor(pad([f[2] for f in feats], max_seq_length))

    model = BertModel.from_pretrained(bert_model)
    model.eval()
    out = {"tokens": [f[0] for f in feats]}
    eval_data = TensorDataset(all_input_ids, all_input_mask, all_types, torch.arange(len(feats)))
    for input_ids, input_mask, types, example_indices in DataLoader(eval_data, sampler=SequentialSampler(eval_data),
                                                                   batch_size=4):
        with torch.no_grad():
            all_encoder_layers, pooled = model(input_ids, token_type_ids=types, attention_mask=input_mask)
        for b, example_index in enumerate(example_indices.tolist()):
            tokens = feats[example_index][0]
            for i in range(len(tokens)):  # extract_features.py writes the real tokens only
                for layer_index in range(len(all_encoder_layers)):
                    values = all_encoder_layers[layer_index][b, i].numpy()
                    out.setdefault(f"features[layer {layer_index}]", []).append(values)
            out.setdefault("pooled", []).append(pooled[b].numpy())
            for layer_index in layer_indexes:
                out.setdefault(f"features[layer_indexes {layer_index}]", []).append(
                    all_encoder_layers[layer_index][b, :len(tokens)].numpy().round(6))
    for k in out:
        if k != "tokens":
            out[k] = np.concatenate([np.atleast_2d(v) for v in out[k]])
    assert np.abs(out["features[layer 1]"]).max() > 1.0  # scaled weights: a real signal
    # without a mask (token_type_ids=None): every position is real
    with torch.no_grad():
        layers, pooled = model(all_input_ids)
    out["features[no mask]"] = torch.stack(layers).numpy()
    out["pooled[no mask]"] = pooled.numpy()
    return out


def test_extract_features(pretrained, tmp_path):
    theirs, ours = run_both(extract_features, tmp_path, pretrained[0.1])
    assert_same(theirs, ours, "extract_features")


# --------------------------------------------------------------------------------------------------
# 5. run_squad.py
# --------------------------------------------------------------------------------------------------
def run_squad(lib, workdir, bert_model):
    BertForQuestionAnswering = lib.modeling.BertForQuestionAnswering
    BertAdam, WarmupLinearSchedule = lib.optimization.BertAdam, lib.optimization.WarmupLinearSchedule
    seed_everything()
    S, n = 16, 8
    g = torch.Generator().manual_seed(8)
    input_ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (n, S), generator=g)
    lengths = [16, 12, 10, 16, 9, 14, 11, 13]
    input_mask = torch.tensor([[1] * m + [0] * (S - m) for m in lengths])
    segment_ids = torch.tensor([[0] * 5 + [1] * (m - 5) + [0] * (S - m) for m in lengths])
    input_ids = input_ids * input_mask
    start_positions = torch.tensor([6, 7, 5, 9, 6, 100, 8, 7])  # 100: out of the span, clamped and ignored
    end_positions = torch.tensor([8, 9, 5, 12, 7, 101, 9, 11])

    model = BertForQuestionAnswering.from_pretrained(bert_model)
    num_train_optimization_steps = 6
    optimizer = BertAdam(bert_adam_groups(model, skip=('pooler',)),  # run_squad.py's "hack to remove pooler"
                         lr=3e-3, schedule=WarmupLinearSchedule(warmup=0.1, t_total=num_train_optimization_steps))
    train_data = TensorDataset(input_ids, input_mask, segment_ids, start_positions, end_positions)
    train_dataloader = DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=4)
    out = {"loss": []}
    model.train()
    for _ in range(3):
        for batch in train_dataloader:
            ids, mask, seg, start, end = batch
            loss = model(ids, seg, mask, start, end)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out["loss"].append(loss.item())
    model.eval()
    with torch.no_grad():
        batch_start_logits, batch_end_logits = model(input_ids, segment_ids, input_mask)
    out["start_logits[centred]"], out["end_logits[centred]"] = centred(batch_start_logits), centred(batch_end_logits)
    out["best_start"] = [batch_start_logits.argmax(1).tolist()]
    out["best_end"] = [batch_end_logits.argmax(1).tolist()]
    out.update(weights(model, zero_grad=(KEY_BIAS, "qa_outputs.bias")))
    return out


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_run_squad(pretrained, tmp_path, dropout):
    theirs, ours = run_both(run_squad, tmp_path, pretrained[dropout])
    assert_same(theirs, ours, f"run_squad dropout={dropout}")


# --------------------------------------------------------------------------------------------------
# 6. lm_finetuning/simple_lm_finetuning.py, and run_swag.py
# --------------------------------------------------------------------------------------------------
def simple_lm_finetuning(lib, workdir, bert_model):
    BertForPreTraining, BertAdam = lib.modeling.BertForPreTraining, lib.top.BertAdam
    seed_everything()
    S, n = 12, 8
    g = torch.Generator().manual_seed(9)
    input_ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (n, S), generator=g)
    lengths = [12, 10, 8, 12, 7, 11, 9, 12]
    input_mask = torch.tensor([[1] * m + [0] * (S - m) for m in lengths])
    segment_ids = torch.tensor([[0] * (m // 2) + [1] * (m - m // 2) + [0] * (S - m) for m in lengths])
    lm_label_ids = torch.full((n, S), -1, dtype=torch.long)
    masked = (torch.rand(n, S, generator=g) < 0.3) & input_mask.bool()
    masked[:, 1] = True
    lm_label_ids[masked] = input_ids[masked]
    input_ids = torch.where(masked, torch.full_like(input_ids, 5), input_ids) * input_mask  # [MASK] = 5
    is_next = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])

    model = BertForPreTraining.from_pretrained(bert_model)
    optimizer = BertAdam(bert_adam_groups(model), lr=1e-3, warmup=0.1, t_total=6, schedule='warmup_linear')
    train_data = TensorDataset(input_ids, input_mask, segment_ids, lm_label_ids, is_next)
    train_dataloader = DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=4)
    out = {"loss": []}
    model.train()
    for _ in range(3):
        for batch in train_dataloader:
            ids, mask, seg, lm_labels, nxt = batch
            loss = model(ids, seg, mask, lm_labels, nxt)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out["loss"].append(loss.item())
    model.eval()
    with torch.no_grad():
        prediction_scores, seq_relationship_score = model(input_ids, segment_ids, input_mask)
    out["prediction_scores[every position]"] = prediction_scores.numpy()
    out["seq_relationship_score"] = seq_relationship_score.numpy()
    out["decoder_is_embedding"] = model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    out.update(weights(model))
    return out


def run_swag(lib, workdir, bert_model):
    BertForMultipleChoice, BertAdam = lib.modeling.BertForMultipleChoice, lib.optimization.BertAdam
    seed_everything()
    n, C, S = 6, 2, 10
    g = torch.Generator().manual_seed(10)
    input_ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (n, C, S), generator=g)
    lengths = torch.randint(5, S + 1, (n, C), generator=g)
    input_mask = (torch.arange(S)[None, None, :] < lengths[:, :, None]).long()
    segment_ids = ((torch.arange(S)[None, None, :] >= 3).long() * input_mask)
    input_ids = input_ids * input_mask
    label = torch.tensor([0, 1, 1, 0, 1, 0])

    model = BertForMultipleChoice.from_pretrained(bert_model, num_choices=C)
    optimizer = BertAdam(bert_adam_groups(model), lr=3e-3, warmup=0.1, t_total=6)
    train_data = TensorDataset(input_ids, input_mask, segment_ids, label)
    out = {"loss": []}
    for _ in range(2):
        for ids, mask, seg, lab in DataLoader(train_data, sampler=RandomSampler(train_data), batch_size=2):
            loss = model(ids, seg, mask, lab)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            out["loss"].append(loss.item())
    model.eval()
    with torch.no_grad():
        out["eval_loss"] = model(input_ids, segment_ids, input_mask, label).item()
        logits = model(input_ids, segment_ids, input_mask)
    out["logits[centred]"] = centred(logits)
    out["accuracy"] = float((logits.argmax(1) == label).float().mean())
    out.update(weights(model, zero_grad=(KEY_BIAS, "classifier.bias")))
    return out


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_simple_lm_finetuning(pretrained, tmp_path, dropout):
    theirs, ours = run_both(simple_lm_finetuning, tmp_path, pretrained[dropout])
    assert theirs["decoder_is_embedding"] and ours["decoder_is_embedding"]
    assert_same(theirs, ours, f"simple_lm_finetuning dropout={dropout}")


@pytest.mark.parametrize("dropout", DROPOUTS)
def test_run_swag(pretrained, tmp_path, dropout):
    theirs, ours = run_both(run_swag, tmp_path, pretrained[dropout])
    assert_same(theirs, ours, f"run_swag dropout={dropout}")


# --------------------------------------------------------------------------------------------------
# 7. BertTokenizer
# --------------------------------------------------------------------------------------------------
TOKENIZER_TEXTS = [
    "The quick dog jumped over the lazy cat!",
    "John works in Paris, and Mary in London.",
    "Un-believable CAFÉ... isn't it?",
    "我爱中国 hello world",
    "Walking  quickly\t through\n the  park",
    "unknownword xyz bertish runs",
    "[CLS] hello [SEP] [MASK] world [SEP]",
    "",
]


def tokenizer_script(lib, workdir, bert_model):
    BertTokenizer = lib.tokenization.BertTokenizer
    out = {}
    for source in (bert_model, os.path.join(bert_model, "vocab.txt")):
        tokenizer = BertTokenizer.from_pretrained(source, do_lower_case=True)
        key = os.path.basename(source)
        for i, text in enumerate(TOKENIZER_TEXTS):
            tokens = tokenizer.tokenize(text)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            out[f"tokens[{key} {i}]"] = [tokens]
            out[f"ids[{key} {i}]"] = ids
            out[f"back[{key} {i}]"] = [tokenizer.convert_ids_to_tokens(ids)]
            out[f"basic[{key} {i}]"] = [tokenizer.basic_tokenizer.tokenize(text)]
    cased = BertTokenizer(os.path.join(bert_model, "vocab.txt"), do_lower_case=False)
    out["cased"] = [[cased.tokenize(t) for t in TOKENIZER_TEXTS]]
    return out


def test_tokenizer(pretrained, tmp_path):
    theirs, ours = run_both(tokenizer_script, tmp_path, pretrained[0.0])
    assert "[UNK]" in theirs["tokens[vocab.txt 5]"][0] and "##s" in theirs["tokens[vocab.txt 5]"][0]
    assert_same(theirs, ours, "BertTokenizer")
    for key in theirs:  # ids are compared exactly too (not just within TOL)
        if key.startswith("ids"):
            assert theirs[key] == ours[key], key


# --------------------------------------------------------------------------------------------------
# The same scripts in float64: equal maths, not just equal to float32 rounding
# --------------------------------------------------------------------------------------------------
SCRIPTS = {
    "run_classifier": (run_classifier,),
    "ner_full": (ner_tagger, True),
    "ner_by_name": (ner_tagger, False),
    "crf_subclass": (crf_subclass,),
    "extract_features": (extract_features,),
    "run_squad": (run_squad,),
    "simple_lm_finetuning": (simple_lm_finetuning,),
    "run_swag": (run_swag,),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_agree_in_float64(pretrained, tmp_path, name):
    """With dropout on, float64 weights and data: every number within 1e-9. A difference of method
    (an op order that float32 rounding could hide, a different dropout draw) shows up here."""
    script, *args = SCRIPTS[name]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs, ours = run_both(script, tmp_path, pretrained[0.1], *args)
    finally:
        torch.set_default_dtype(default)
    assert all(v.dtype in (np.float64, torch.float64) for k, v in theirs.items() if k.startswith("w:"))
    assert_same(theirs, ours, f"{name} float64", tol=1e-9, weight_tol=1e-9)


def test_zero_gradient_parameters_are_noise(pretrained):
    """The parameters left out of the weight comparison (see KEY_BIAS) get a rounding-noise gradient
    in both libraries, while their neighbours get real ones."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(6, TINY["vocab_size_or_config_json_file"], (4, 2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :, 7:] = 0
    for root in LIBS.values():
        modeling = load_lib(root).modeling
        torch.manual_seed(0)
        swag = modeling.BertForMultipleChoice.from_pretrained(pretrained[0.0], num_choices=2)
        swag(ids, None, mask, torch.tensor([0, 1, 1, 0])).backward()
        qa = modeling.BertForQuestionAnswering.from_pretrained(pretrained[0.0])
        qa(ids[:, 0], None, mask[:, 0], torch.tensor([1, 3, 20, 5]), torch.tensor([2, 4, 20, 6])).backward()
        for model, zero, real in ((swag, "classifier.bias", "classifier.weight"),
                                  (qa, "qa_outputs.bias", "qa_outputs.weight"),
                                  (qa, "encoder.layer.0." + KEY_BIAS, "encoder.layer.0.attention.self.query.bias")):
            grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters() if p.grad is not None}
            assert grads[[n for n in grads if n.endswith(zero)][0]] < 1e-6, (root, zero)
            assert grads[[n for n in grads if n.endswith(real)][0]] > 1e-3, (root, real)
