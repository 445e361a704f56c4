"""Fine-tune BERT for tagging or classification, and predict with the result.

    python -m bert_port.finetune tag      --model NAME_OR_DIR --train train.conll --dev dev.conll --out DIR
    python -m bert_port.finetune classify --model NAME_OR_DIR --train train.tsv --dev dev.tsv --out DIR
    python -m bert_port.finetune predict  --model DIR --input FILE [--output FILE]

`tag` reads CoNLL (token ... tag per line, tag = last column, blank line between sentences) and
reports conlleval's entity precision/recall/F1; `classify` reads GLUE-style TSV with a header
(MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String) and reports accuracy and F1. After each
epoch the dev set is scored; the best epoch by dev F1 is saved to --out (config.json with the
label map, model.safetensors, vocab.txt), with metrics.json and training.png (if matplotlib).

Multi-process: `torchrun --nproc_per_node=N -m bert_port.finetune tag ...` runs N ranks (gloo on
CPU, nccl on GPUs). --batch-size is PER RANK: the global batch is N x batch size x --grad-accum.
Rank 0 alone logs and writes files; dev scores are summed over all ranks.

Errors print one line and exit 1 (2 for bad usage); --debug shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from converters import runner
from converters.atomic import atomic_write_text
from converters.owned import output_dir
from converters.runner import UsageError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if value != value or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    epilog = "\n\n".join(__doc__.split("\n\n")[2:-1]).strip()
    parser = runner.parser("python -m bert_port.finetune", __doc__.split("\n\n")[0], epilog)
    sub = parser.add_subparsers(dest="command", metavar="{tag,classify,predict}")
    for name, helptext in (("tag", "fine-tune a token tagger on CoNLL files"),
                           ("classify", "fine-tune a sentence (pair) classifier on GLUE-style TSV files")):
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=epilog)
        p.add_argument("--model", required=True, help="pretrained name or directory (config, weights, vocab.txt)")
        p.add_argument("--train", required=True, help="training file")
        p.add_argument("--dev", required=True, help="dev file, scored after every epoch")
        p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
        p.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
        p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the training file")
        p.add_argument("--lr", type=_float_in(0, 1, lo_open=True), default=5e-5, help="peak learning rate")
        p.add_argument("--batch-size", type=_positive_int, default=32, help="per rank (see torchrun)")
        p.add_argument("--eval-batch-size", type=_positive_int, default=None, help="default: --batch-size")
        p.add_argument("--max-seq-length", type=_positive_int, default=None,
                       help="word pieces incl. [CLS]/[SEP] (default: 128, or the model's limit if smaller)")
        p.add_argument("--warmup-proportion", type=_float_in(0, 1, hi_open=True), default=0.1,
                       help="share of the optimizer steps spent warming the learning rate up from 0")
        p.add_argument("--weight-decay", type=_float_in(0, 1), default=0.01, help="not on biases and LayerNorm")
        p.add_argument("--seed", type=int, default=42, help="seeds the new head's init, dropout and data order")
        p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step")
        amp = p.add_mutually_exclusive_group()
        amp.add_argument("--fp16", action="store_true", help="float16 autocast + loss scaling (CUDA only)")
        amp.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or GPU)")
        p.add_argument("--optimizer", choices=("adamw", "bertadam"), default="adamw",
                       help="adamw: torch AdamW + linear warmup/decay; bertadam: pytorch_pretrained_bert's")
        p.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip: global norm (adamw) or per tensor (bertadam); <= 0 disables")
        p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                       help="which epoch's weights --out holds: best dev F1 or the last")
        p.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    helptext = "tag or classify a file with a fine-tuned model"
    p = sub.add_parser("predict", help=helptext, description=helptext, epilog=epilog)
    p.add_argument("--model", required=True, help="directory written by `tag` or `classify`")
    p.add_argument("--input", required=True,
                   help="tag: CoNLL or plain text (one sentence per line); classify: TSV with header or text")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--format", choices=("auto", "conll", "text", "tsv"), default="auto",
                   help="format of --input; auto: CoNLL or TSV when the file looks like one, else text")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="sentences per forward pass")
    p.add_argument("--max-seq-length", type=_positive_int, default=128,
                   help="window length; longer sentences are split into windows, no word is lost")
    p.add_argument("--cpu", action="store_true", help="do not use a GPU even if there is one")
    return parser


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: output directory exists and is not empty (use --force to write into it)")


def _load(task_cls, model_name: str, num_labels: Optional[int]):
    """Tokenizer and model. A checkpoint whose classifier has another number of labels (a tagger
    fine-tuned before, a classifier for another task) keeps its encoder and gets a new head."""
    from bert_port.pretrained import resolve_model_dir
    from bert_port.tokenization import BertTokenizer
    from converters.files import weights_file
    from converters.weights import open_weights

    tokenizer = BertTokenizer.from_pretrained(model_name)
    if num_labels is None:
        return tokenizer, task_cls.model_cls.from_pretrained(model_name)
    weights = open_weights(weights_file(resolve_model_dir(model_name)))
    shape = getattr(weights, "shape", None) or (lambda key: tuple(weights[key].shape))
    if "classifier.weight" in weights and shape("classifier.weight")[0] != num_labels:
        weights = {k: weights[k] for k in weights if not k.startswith("classifier.")}
    return tokenizer, task_cls.model_cls.from_pretrained(model_name, num_labels=num_labels, state_dict=weights)


def run_train(args, log) -> dict:
    import torch

    from bert_port import _finetune_dist as dist
    from bert_port._finetune_tasks import TASKS
    from bert_port._finetune_train import Examples, TrainConfig, seed_everything, train

    if args.fp16 and (args.cpu or not torch.cuda.is_available()):
        raise UsageError("--fp16 needs a CUDA GPU; use --bf16 on CPU")
    task = TASKS[args.command]
    out = Path(args.out)
    _check_out_dir(out, args.force)
    train_examples, dev_examples = task.read(args.train), task.read(args.dev)
    if not train_examples:
        raise ValueError(f"{args.train}: no training examples")
    if not dev_examples:
        raise ValueError(f"{args.dev}: no dev examples")
    labels = task.labels(train_examples, dev_examples)
    if task.name == "classify" and len(labels) < 2:
        raise ValueError(f"{args.train}: found {len(labels)} label(s), a classifier needs at least 2")
    ctx = dist.setup(want_cuda=not args.cpu)
    try:
        log.rank = ctx.rank
        seed_everything(args.seed)
        tokenizer, model = _load(task, args.model, len(labels))
        limit = model.config.max_position_embeddings
        max_seq_length = min(128, limit) if args.max_seq_length is None else args.max_seq_length
        if max_seq_length > limit:
            raise UsageError(f"--max-seq-length {max_seq_length} exceeds the model's max_position_embeddings ({limit})")
        config = TrainConfig.from_args(args, task=task.name, max_seq_length=max_seq_length)
        if ctx.is_main:
            output_dir(out)
        log(f"{task.name}: {len(train_examples)} train / {len(dev_examples)} dev examples, {len(labels)} labels, "
            f"{ctx.world_size} process(es) on {ctx.device}, global batch "
            f"{args.batch_size * ctx.world_size * args.grad_accum}")
        history = train(config, ctx, tokenizer, model, Examples(train_examples, dev_examples, labels), log)
        best = history.best
        log(f"best epoch {best['epoch']}: dev {task.summary(best)}; saved to {out}")
        ctx.barrier()
        return history
    finally:
        ctx.close()


def _detect_format(path: str, task_name: str, labels: List[str]) -> str:
    from bert_port import data as D

    lines = [ln for ln in D.read_lines(path, encoding="utf-8-sig") if ln.strip()]
    if task_name == "classify":
        header = [h.strip() for h in lines[0].split("\t")] if lines else []
        return "tsv" if any(c in header for c in D.TEXT_A_COLUMNS) else "text"
    rows = [ln.split() for ln in lines if ln.split()[0] != D.DOCSTART]
    known = set(labels)
    if rows and all(len(r) >= 2 and r[-1] in known for r in rows):
        return "conll"
    if rows and all(len(r) == 1 for r in rows) and len(lines) < len(D.read_lines(path)):
        return "conll"  # one token per line, blank lines between sentences, no tags
    return "text"


def run_predict(args, log) -> None:
    import torch

    from bert_port import data as D
    from bert_port._finetune_tasks import ARCHITECTURES, Predicting, no_amp
    from bert_port.config import BertConfig
    from bert_port.pretrained import CONFIG_NAMES, find_file

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: not a directory (predict needs a directory written by `tag` or `classify`)")
    config = BertConfig.from_json_file(find_file(model_dir, CONFIG_NAMES, "config"))
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{model_dir}: architecture {arch!r} is not a fine-tuned tagger or classifier "
                         f"({' / '.join(ARCHITECTURES)})")
    task = ARCHITECTURES[arch]
    labels = D.label_map_from_config(config)
    fmt = args.format if args.format != "auto" else _detect_format(args.input, task.name, labels)
    if task.name == "tag" and fmt == "tsv" or task.name == "classify" and fmt == "conll":
        raise UsageError(f"--format {fmt} does not fit a {task.name} model")
    if task.name == "tag":
        examples = D.read_conll(args.input, require_tags=False) if fmt == "conll" else D.read_text(args.input)
    elif fmt == "tsv":
        examples = D.read_glue_tsv(args.input, require_labels=False)
    else:
        examples = [D.PairExample(*(ln.split("\t", 1) + [None])[:2]) for ln in D.read_lines(args.input) if ln.strip()]
    out_file = None
    if args.output:
        if Path(args.output).is_dir():
            raise ValueError(f"{args.output}: is a directory")
        out_file = Path(args.output)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tokenizer, model = _load(task, str(model_dir), None)
    model.to(device)
    window = min(args.max_seq_length, model.config.max_position_embeddings)
    predicted = task.predict(model, examples, Predicting(tokenizer, labels, window, args.batch_size, device, no_amp))
    text = _format_predictions(task.name, examples, predicted)
    if out_file is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out_file, text)  # whole or nothing; a link there is replaced, not followed
    gold = [e.tags if task.name == "tag" else e.label for e in examples]
    if examples and None not in gold and (task.name == "tag" or set(gold) <= set(labels)):
        scores = task.score(examples, predicted, labels).scores()
        log(f"{len(examples)} examples; against the gold labels in {args.input}: {task.summary(scores)}")


def _format_predictions(task_name: str, examples, predicted) -> str:
    """tag: `token predicted` (or `token gold predicted`, conlleval's column order) per line,
    a blank line after each sentence; classify: `predicted` (or `gold predicted`) per line."""
    lines = []
    if task_name == "tag":
        for s, tags in zip(examples, predicted):
            for i, (word, tag) in enumerate(zip(s.words, tags)):
                lines.append(f"{word} {s.tags[i]} {tag}" if s.tags is not None else f"{word} {tag}")
            lines.append("")
    else:
        for e, label in zip(examples, predicted):
            lines.append(f"{e.label} {label}" if e.label is not None else label)
    return "\n".join(lines) + ("\n" if lines else "")


class _Log:
    """Messages to stderr from rank 0 only (the rank is set once known)."""

    def __init__(self) -> None:
        self.rank = runner.dist_env().rank

    def __call__(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> None:
    log = _Log()
    if args.command == "predict":
        run_predict(args, log)
    else:
        started = time.time()
        run_train(args, log)
        log(f"done in {time.time() - started:.1f}s")


def main(argv: Optional[List[str]] = None) -> int:
    return runner.run(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
