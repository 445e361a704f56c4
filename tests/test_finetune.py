"""`python -m bert_port.finetune`: the CLI contract, end-to-end runs on a tiny model, torchrun
equivalence, and (slow) real learning from all-MiniLM-L6-v2 weights.

Subprocesses run with OMP_NUM_THREADS=1: on a 2-core machine shared with other work, two
OpenMP threads per process spin against each other and can be 10x slower than one.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bert_port import BertConfig, BertForSequenceClassification, BertForTokenTagging, BertModel
from bert_port import data as D
from bert_port import finetune
from bert_port import metrics as M
from tests import finetune_data as FD

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def run_cli(*args, launcher=None, timeout=600):
    cmd = (launcher or [sys.executable, "-m", "bert_port.finetune"]) + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def write_tsv(path, rows):
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    lines += [f"{y}\t{i}\t{i + 1000}\t{a}\t{b}" for i, (y, a, b) in enumerate(rows)]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random BERT (dropout 0) with a vocabulary of the synthetic data's words, and data."""
    root = tmp_path_factory.mktemp("tiny")
    train = FD.generate(32, "train", seed=3)
    dev = FD.generate(12, "heldout", seed=3)
    words = sorted({w.lower() for s in train + dev for w in s[0]})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    config = BertConfig(len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertModel(config).save_pretrained(model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    pairs = [("1" if k % 2 else "0", " ".join(train[k][0]),
              " ".join(train[k][0] if k % 2 else train[(k + 5) % 32][0])) for k in range(32)]
    return {"model": model_dir, "root": root,
            "train": FD.write_conll(train, root / "train.conll"), "dev": FD.write_conll(dev, root / "dev.conll"),
            "train_tsv": write_tsv(root / "train.tsv", pairs), "dev_tsv": write_tsv(root / "dev.tsv", pairs[:12])}


def tag_args(tiny, out, *extra):
    return ["tag", "--model", tiny["model"], "--train", tiny["train"], "--dev", tiny["dev"], "--out", out,
            "--max-seq-length", 32, "--lr", 1e-3, *extra]


# --- CLI contract ---------------------------------------------------------------------------------
def call(argv, capsys):
    """main() in process: (exit code, stderr lines)."""
    try:
        code = finetune.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", ["missing", "directory", "binary", "malformed", "bad_model"])
def test_bad_inputs_exit_1_with_one_line(tiny, tmp_path, capsys, case):
    train = tiny["train"]
    model = tiny["model"]
    if case == "missing":
        train = tmp_path / "nope.conll"
    elif case == "directory":
        train = tmp_path
    elif case == "binary":
        train = tmp_path / "bin.conll"
        train.write_bytes(b"John B-PER\n\nPNG \x89PNG\r\n\x1a\n\xff\xfe B-PER\n")
    elif case == "malformed":
        train = tmp_path / "bad.conll"
        train.write_text("John B-PER\nlives\n", encoding="utf-8")
    else:
        model = tmp_path / "no-such-model"
    code, err = call(["tag", "--model", model, "--train", train, "--dev", tiny["dev"], "--out", tmp_path / "o"],
                     capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing": "cannot read (No such file", "directory": "is a directory",
                "binary": f"{train}: not UTF-8 text at line 3",
                "malformed": "bad.conll:2:", "bad_model": "no-such-model"}[case]
    assert expected in err[0]


@pytest.mark.parametrize("task", ["tag", "classify"])
def test_a_file_of_the_other_task_is_refused_naming_the_expected_format(tiny, tmp_path, capsys, task):
    wrong = tiny["train_tsv"] if task == "tag" else tiny["train"]
    dev = tiny["dev"] if task == "tag" else tiny["dev_tsv"]
    code, err = call([task, "--model", tiny["model"], "--train", wrong, "--dev", dev, "--out", tmp_path / "o"], capsys)
    assert code == 1 and len(err) == 1 and str(wrong) in err[0], err
    expected = "expected CoNLL: 'token ... tag' per line" if task == "tag" else "expected a GLUE-style TSV file"
    assert expected in err[0] and not (tmp_path / "o").exists(), err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tiny, tmp_path, capsys):
    f = tmp_path / "locked.conll"
    f.write_text("John B-PER\n", encoding="utf-8")
    f.chmod(0)
    code, err = call(["tag", "--model", tiny["model"], "--train", f, "--dev", tiny["dev"], "--out", tmp_path / "o"],
                     capsys)
    assert code == 1 and len(err) == 1 and "Permission denied" in err[0]


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--lr", "-1"], "argument --lr: must be in (0, 1]"),
    (["--warmup-proportion", "1"], "argument --warmup-proportion: must be in [0, 1)"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    (["--fp16", "--bf16"], "not allowed with argument"),
])
def test_bad_arguments_exit_2_with_one_line(tiny, tmp_path, capsys, extra, message):
    code, err = call(tag_args(tiny, tmp_path / "o", *extra), capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_semantic_usage_errors_exit_2(tiny, tmp_path, capsys):
    code, err = call(tag_args(tiny, tmp_path / "o", "--max-seq-length", "100"), capsys)  # model: 64 positions
    assert code == 2 and len(err) == 1 and "exceeds the model's max_position_embeddings (64)" in err[0]
    if not torch.cuda.is_available():
        code, err = call(tag_args(tiny, tmp_path / "o", "--fp16"), capsys)
        assert code == 2 and err == [
            "python -m bert_port.finetune tag: error: --fp16 needs a CUDA GPU; use --bf16 on CPU (see --help)"]


def test_existing_output_dir_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = call(tag_args(tiny, out), capsys)
    assert code == 1 and err == [f"error: {out}: output directory exists and is not empty (use --force to write into it)"]
    code, err = call(["predict", "--model", out, "--input", tiny["dev"]], capsys)
    assert code == 1 and len(err) == 1 and "no config file found" in err[0]


def test_real_process_prints_one_line_and_no_traceback(tiny, tmp_path):
    r = run_cli("tag", "--model", tiny["model"], "--train", tmp_path / "missing.conll", "--dev", tiny["dev"],
                "--out", tmp_path / "o")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    r = run_cli("tag", "--epochs", "x")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    r = run_cli("tag", "--model", tiny["model"], "--train", tmp_path / "missing.conll", "--dev", tiny["dev"],
                "--out", tmp_path / "o", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr


# --- end to end on the tiny model ---------------------------------------------------------------------
def test_tag_train_save_predict(tiny, tmp_path, capsys):
    out = tmp_path / "tagger"
    code, err = call(tag_args(tiny, out, "--epochs", 2, "--batch-size", 8), capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all({"precision", "recall", "f1", "per_type"} <= set(e["dev"]) for e in metrics["epochs"])
    best = max(metrics["epochs"], key=lambda e: e["dev"]["f1"])
    assert metrics["best"]["f1"] == metrics["f1"] == best["dev"]["f1"]
    assert len(metrics["step_loss"]) == 2 * 4  # 32 sentences / 8 per step, 2 epochs
    assert {"config.json", "model.safetensors", "vocab.txt", "metrics.json"} <= {p.name for p in out.iterdir()}
    if importlib.util.find_spec("matplotlib"):
        assert (out / "training.png").stat().st_size > 1000
    else:
        assert any("matplotlib is not installed" in line for line in err)
    model = BertForTokenTagging.from_pretrained(out).eval()
    labels = D.label_map_from_config(model.config)
    assert labels[0] == "O" and set(labels) == {"O"} | {f"{p}-{t}" for p in "BI" for t in ("PER", "LOC", "ORG", "DATE")}
    assert model.num_labels == len(labels)

    # predict: CoNLL in -> token gold predicted; the dev F1 computed from it equals the training's
    pred = tmp_path / "pred.txt"
    code, err = call(["predict", "--model", out, "--input", tiny["dev"], "--output", pred, "--max-seq-length", 32],
                     capsys)
    assert code == 0, err
    rows = pred.read_text().split("\n\n")
    dev = D.read_conll(tiny["dev"])
    assert len([r for r in rows if r.strip()]) == len(dev)
    first = [line.split() for line in rows[0].splitlines()]
    assert [w for w, _, _ in first] == dev[0].words and [g for _, g, _ in first] == dev[0].tags
    guessed = [[line.split()[2] for line in r.splitlines()] for r in rows if r.strip()]
    assert M.entity_scores([s.tags for s in dev], guessed)["f1"] == pytest.approx(metrics["best"]["f1"])
    assert any("against the gold labels" in line for line in err)

    # plain text in -> `token predicted` on stdout; windows of 6 pieces still cover every word
    text = tmp_path / "in.txt"
    text.write_text("Mary Smith moved to Paris .\n\nShares of Acme Corp fell sharply after the report .\n")
    assert finetune.main(["predict", "--model", str(out), "--input", str(text), "--max-seq-length", "6"]) == 0
    printed = capsys.readouterr().out
    sentences = [s.splitlines() for s in printed.split("\n\n") if s.strip()]
    assert [[line.split()[0] for line in s] for s in sentences] == [
        "Mary Smith moved to Paris .".split(), "Shares of Acme Corp fell sharply after the report .".split()]
    assert all(len(line.split()) == 2 and line.split()[1] in labels for s in sentences for line in s)


def test_classify_train_and_predict(tiny, tmp_path, capsys):
    out = tmp_path / "clf"
    code, err = call(["classify", "--model", tiny["model"], "--train", tiny["train_tsv"], "--dev", tiny["dev_tsv"],
                      "--out", out, "--epochs", 1, "--batch-size", 8, "--max-seq-length", 48, "--lr", 1e-3,
                      "--optimizer", "bertadam", "--bf16"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"accuracy", "f1", "precision", "recall"} <= set(metrics["best"])
    model = BertForSequenceClassification.from_pretrained(out).eval()
    assert D.label_map_from_config(model.config) == ["0", "1"]
    assert finetune.main(["predict", "--model", str(out), "--input", str(tiny["dev_tsv"])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and all(line.split()[0] in "01" and line.split()[1] in "01" for line in lines)
    gold = [line.split()[0] for line in lines]
    assert gold == [e.label for e in D.read_glue_tsv(tiny["dev_tsv"])]


# --- torchrun ---------------------------------------------------------------------------------------
@pytest.mark.slow  # two torchrun ranks and a reference process: ~12 s of the README's test command
def test_torchrun_two_ranks_equal_one_process_with_double_batch(tiny, tmp_path):
    """2 ranks x batch 4 == 1 process x batch 8 == 1 process x batch 4 x --grad-accum 2.

    The loss of a step is summed over labelled tokens and divided by their count over all ranks
    and micro-batches, so DDP's gradient averaging gives exactly the gradient of the mean over the
    8 sentences, although the two ranks' sentences hold different numbers of tokens. The sampler's
    permutation depends on the seed and epoch only; rank r takes every 2nd index from r, so the
    two ranks' batches together are the one-process batch. Dropout is 0.
    """
    common = ["--epochs", 2, "--checkpoint", "last", "--optimizer", "adamw"]
    outs = {k: tmp_path / k for k in ("single", "ddp", "accum")}
    started = time.time()
    r = run_cli(*tag_args(tiny, outs["single"], "--batch-size", 8, *common))
    assert r.returncode == 0, r.stderr
    single_s = time.time() - started
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "bert_port.finetune"]
    started = time.time()
    r = run_cli(*tag_args(tiny, outs["ddp"], "--batch-size", 4, *common), launcher=launcher)
    assert r.returncode == 0, r.stderr
    ddp_s = time.time() - started
    assert "2 process(es)" in r.stderr and "global batch 8" in r.stderr
    r = run_cli(*tag_args(tiny, outs["accum"], "--batch-size", 4, "--grad-accum", 2, *common))
    assert r.returncode == 0, r.stderr

    weights = {k: load_file(str(v / "model.safetensors")) for k, v in outs.items()}
    start = BertModel.from_pretrained(tiny["model"]).eval().state_dict()
    moved = max((weights["single"]["bert." + k] - v).abs().max().item() for k, v in start.items()
                if "pooler" not in k)
    assert moved > 1e-3  # training changed the weights: the comparison below means something
    for other in ("ddp", "accum"):
        diff = max((weights["single"][k] - weights[other][k]).abs().max().item() for k in weights["single"])
        print(f"{other} vs single process: final weights max diff {diff:.3g}")
        assert diff < 1e-5
    losses = {k: json.loads((v / "metrics.json").read_text())["step_loss"] for k, v in outs.items()}
    assert losses["ddp"] == pytest.approx(losses["single"], abs=1e-5)
    assert losses["accum"] == pytest.approx(losses["single"], abs=1e-5)
    print(f"one process {single_s:.1f}s, torchrun x2 {ddp_s:.1f}s")


# --- real learning ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_learns_ner_on_held_out_entities(minilm_dir, tmp_path):
    """all-MiniLM-L6-v2 fine-tuned through the CLI on synthetic NER reaches entity F1 >= 0.9 on
    sentences whose entity strings (and half of whose templates) never occur in training."""
    paths = FD.make_dataset(tmp_path / "data", n_train=300, n_dev=150, seed=0)
    assert not FD.entity_strings(paths["train"]) & FD.entity_strings(paths["dev"])
    out = tmp_path / "out"
    started = time.time()
    r = run_cli("tag", "--model", minilm_dir, "--train", paths["train"], "--dev", paths["dev"], "--out", out,
                "--epochs", 3, "--batch-size", 8, "--lr", 1e-4, "--max-seq-length", 40, "--seed", 1)
    seconds = time.time() - started
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    f1 = metrics["best"]["f1"]
    print(f"MiniLM NER: held-out entity F1 {f1:.4f} (best epoch {metrics['best']['epoch']}), {seconds:.0f}s; "
          + ", ".join(f"epoch {e['epoch']} f1 {e['dev']['f1']:.3f}" for e in metrics["epochs"]))
    assert f1 >= 0.90
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]

    model = BertForTokenTagging.from_pretrained(out).eval()  # the saved directory loads on its own
    assert D.label_map_from_config(model.config)[0] == "O"
    pred = tmp_path / "pred.txt"
    r = run_cli("predict", "--model", out, "--input", paths["dev"], "--output", pred, "--max-seq-length", 40)
    assert r.returncode == 0, r.stderr
    rows = [[line.split() for line in s.splitlines()] for s in pred.read_text().split("\n\n") if s.strip()]
    gold = [[g for _, g, _ in s] for s in rows]
    guess = [[p for _, _, p in s] for s in rows]
    assert gold == [s.tags for s in D.read_conll(paths["dev"])]
    assert M.entity_scores(gold, guess)["f1"] == pytest.approx(f1)  # predict reproduces the best epoch


# --- the training loop in parts (build, one epoch, end of epoch), each called alone -------------------
def tag_run(tiny, out, **overrides):
    """A built tagging Run on the tiny model: 32 sentences, batch 8, 2 epochs, AdamW, dropout 0."""
    from bert_port._finetune_dist import DistContext
    from bert_port._finetune_tasks import TAG
    from bert_port._finetune_train import Examples, TrainConfig, build, seed_everything

    settings = dict(task="tag", out=Path(out), epochs=2, batch_size=8, grad_accum=1, eval_batch_size=None,
                    max_seq_length=32, optimizer="adamw", lr=1e-3, warmup_proportion=0.1, weight_decay=0.01,
                    max_grad_norm=1.0, fp16=False, bf16=False, seed=42, checkpoint="best")
    args = TrainConfig(**{**settings, **overrides})
    train, dev = TAG.read(tiny["train"]), TAG.read(tiny["dev"])
    labels = TAG.labels(train, dev)
    seed_everything(args.seed)
    tokenizer, model = finetune._load(TAG, str(tiny["model"]), len(labels))
    Path(out).mkdir(parents=True, exist_ok=True)
    lines = []
    return build(args, DistContext(), tokenizer, model, Examples(train, dev, labels), lines.append), lines


def test_build_prepares_a_run_without_training(tiny, tmp_path):
    run, _ = tag_run(tiny, tmp_path / "out", grad_accum=2)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert run.steps_per_epoch == 2 and run.history.optimizer_steps == 4  # 32 / 8 = 4 batches, 2 per step
    assert run.history.global_batch_size == 16 and run.history.step_loss == [] and run.history.epochs == []
    assert run.model.config.label2id == {lab: i for i, lab in enumerate(run.data.labels)}
    assert run.net is run.model  # one process: no DDP wrapper
    assert not run.model.bert.pooler.dense.weight.requires_grad  # TagTask.prepare froze it
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    assert not any((tmp_path / "out").iterdir())


def test_one_epoch_alone_records_each_step_loss(tiny, tmp_path):
    from bert_port._finetune_train import run_epoch

    run, _ = tag_run(tiny, tmp_path / "out")
    run.loader.sampler.set_epoch(1)
    first = next(iter(run.loader))
    with torch.no_grad():  # the head's own loss (mean over active, labelled tokens) on the first batch
        expected = float(run.model(first["input_ids"], first["segment_ids"], first["input_mask"], first["labels"]))
    before = run.model.classifier.weight.detach().clone()
    mean = run_epoch(run, 1)
    assert len(run.history.step_loss) == 4 and run.history.epochs == []
    assert run.history.step_loss[0] == pytest.approx(expected, rel=1e-5)
    assert min(run.history.step_loss) <= mean <= max(run.history.step_loss)
    assert not torch.equal(run.model.classifier.weight, before)
    assert not (tmp_path / "out" / "metrics.json").exists()  # writing is the end of the epoch's job


def test_end_of_epoch_alone_scores_saves_and_writes_metrics(tiny, tmp_path):
    from bert_port._finetune_train import end_epoch

    out = tmp_path / "out"
    run, lines = tag_run(tiny, out)
    assert end_epoch(run, 1, 0.5, time.time() - 100) is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["task", "world_size", "global_batch_size", "optimizer_steps", "labels", "epochs",
                             "step_loss", "best", "f1", "train_seconds"]
    (record,) = metrics["epochs"]
    assert list(record) == ["epoch", "train_loss", "dev", "seconds"] and record["epoch"] == 1
    assert record["train_loss"] == 0.5 and 100 <= record["seconds"] < 200  # the evaluation counts in the epoch
    assert metrics["best"]["epoch"] == 1 and metrics["f1"] == metrics["epochs"][0]["dev"]["f1"]
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()
    (out / "model.safetensors").unlink()
    assert end_epoch(run, 2, 0.4, time.time()) is False  # same weights, same F1: not better, nothing saved
    assert not (out / "model.safetensors").exists() and run.history.best["epoch"] == 1
    assert len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    assert lines[0].startswith("epoch 1/2: train loss 0.5000, dev f1 ") and "(best), 1" in lines[0]
