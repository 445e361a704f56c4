"""`python -m bert_port.demo`: a MegEngine BERT token tagger, converted and run in PyTorch, offline.

The package ships a tiny tagger saved by MegEngine (bert_port/demo_data/: hub-style pickle,
bert_config.json with its tag names, vocab.txt) and what MegEngine computed for one sentence
(reference.json). The demo converts the pickle into --out (default ./bert_port-demo-model, kept so
that the README's examples can load it), tokenizes the sentence, runs the model, and checks the
logits against MegEngine's: exit 0 when they agree to 1e-5. Its weights are random: the tags show
the pipeline, not a trained tagger. `--model NAME` runs a hub model instead (downloaded and
cached); its tagging head is new and untrained, so there is nothing to compare against.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from converters import runner

DEMO = Path(__file__).resolve().parent / "demo_data"
DEFAULT_OUT = "bert_port-demo-model"
DEFAULT_SENTENCE = "The quick brown fox jumps over the lazy dog in Zürich."
TOLERANCE = 1e-5


def tag(model, tokenizer, sentence: str):
    """Tokens, their ids and the model's logits (1, S, num_labels) for one sentence."""
    tokens = ["[CLS]"] + tokenizer.tokenize(sentence) + ["[SEP]"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    return tokens, ids, logits[0]


def label_names(model) -> List[str]:
    """The model's tag names (config.json id2label), LABEL_i where it has none."""
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(model.num_labels)]


def show(tokens: List[str], ids: List[int], tags: List[int], names: List[str]) -> None:
    width = max(len(t) for t in tokens) + 2
    print(f"{'token':{width}} {'id':>5}  tag")
    for token, i, t in zip(tokens, ids, tags):
        print(f"{token:{width}} {i:>5}  {names[t]}")


def run_packaged(out: Path) -> int:
    from bert_port import BertForTokenTagging, BertTokenizer
    from converters.mge2torch import convert

    ref = json.loads((DEMO / "reference.json").read_text(encoding="utf-8"))
    print(f"MegEngine token tagger: {DEMO / 'demo_tagger.pkl'} (random weights: the tags show the pipeline)")
    # force replaces only a directory of converter outputs (any other file there is refused)
    convert(DEMO / "demo_tagger.pkl", DEMO / "bert_config.json", out, vocab=DEMO / "vocab.txt", force=True)
    print(f"converted to {out} (kept: load it with BertForTokenTagging.from_pretrained({str(out)!r}))")
    model = BertForTokenTagging.from_pretrained(out).eval()
    tokenizer = BertTokenizer.from_pretrained(out, do_lower_case=True)
    print(f"sentence: {ref['sentence']}\n")
    tokens, ids, logits = tag(model, tokenizer, ref["sentence"])
    show(tokens, ids, logits.argmax(-1).tolist(), label_names(model))
    if (tokens, ids) != (ref["tokens"], ref["input_ids"]):
        print(f"\ntokenization differs from the recorded one:\n  ours      {tokens}\n  MegEngine {ref['tokens']}")
        return 1
    expected = torch.tensor(ref["logits"], dtype=torch.float32)
    diff = (logits - expected).abs().max().item()
    same_tags = torch.equal(logits.argmax(-1), expected.argmax(-1))
    print(f"\ntags equal MegEngine's: {'yes' if same_tags else 'NO'}")
    print(f"max |torch - megengine| = {diff:.3g} (tolerance {TOLERANCE:g}): {'OK' if diff < TOLERANCE else 'FAIL'}")
    return 0 if diff < TOLERANCE and same_tags else 1


def run_hub(name: str, sentence: str, num_labels: int, cache_dir: Optional[str]) -> int:
    from bert_port import BertForTokenTagging, BertTokenizer

    torch.manual_seed(0)  # the new tagging head: the same tags on every run
    model = BertForTokenTagging.from_pretrained(name, num_labels=num_labels, cache_dir=cache_dir).eval()
    tokenizer = BertTokenizer.from_pretrained(name, cache_dir=cache_dir)
    print(f"{name}: pretrained encoder + an untrained {num_labels}-tag head (no MegEngine reference)")
    print(f"sentence: {sentence}\n")
    tokens, ids, logits = tag(model, tokenizer, sentence)
    show(tokens, ids, logits.argmax(-1).tolist(), label_names(model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = runner.parser("python -m bert_port.demo", __doc__.split("\n\n")[0])
    p.add_argument("--out", help=f"where the packaged tagger is converted to (default: ./{DEFAULT_OUT}; "
                                 "an existing directory is replaced only if it holds converter outputs alone)")
    p.add_argument("--model", help="a pretrained name (e.g. bert-base-uncased) to run instead of the packaged "
                                   "tagger (default: the packaged tagger)")
    p.add_argument("--sentence", help=f"with --model: the text to tag (default: {DEFAULT_SENTENCE!r})")
    p.add_argument("--num-labels", type=int, help="with --model: size of the new tag head (default: 5)")
    p.add_argument("--cache-dir", help="with --model: cache root (default: $BERT_PORT_CACHE or ~/.cache/bert_port)")
    return p


def _run(args: argparse.Namespace) -> int:
    if not args.model:
        given = [flag for flag, value in (("--sentence", args.sentence), ("--num-labels", args.num_labels),
                                          ("--cache-dir", args.cache_dir)) if value is not None]
        if given:
            raise runner.UsageError(f"{', '.join(given)}: only with --model (the packaged tagger runs its "
                                    "recorded sentence with its 5 tags)")
        return run_packaged(Path(args.out or DEFAULT_OUT))
    if args.out is not None:
        raise runner.UsageError("--out applies to the packaged tagger, not to --model (which is cached)")
    if args.num_labels is not None and args.num_labels < 1:
        raise runner.UsageError("--num-labels must be at least 1")
    return run_hub(args.model, args.sentence or DEFAULT_SENTENCE, args.num_labels or 5, args.cache_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runner.run(build_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
