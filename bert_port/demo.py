"""`python -m bert_port.demo`: a MegEngine BERT token tagger, converted and run in PyTorch, offline.

The package ships a tiny tagger saved by MegEngine (bert_port/demo_data/: hub-style pickle,
bert_config.json, vocab.txt) and what MegEngine computed for one sentence (reference.json). The
demo converts the pickle, tokenizes the sentence, runs the model, and checks the logits against
MegEngine's: exit 0 when they agree to 1e-5. `--model NAME` runs a hub model instead (downloaded
and cached); its tagging head is new and untrained, so there is nothing to compare against.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

DEMO = Path(__file__).resolve().parent / "demo_data"
TOLERANCE = 1e-5


def tag(model, tokenizer, sentence: str):
    """Tokens, their ids and the model's logits (1, S, num_labels) for one sentence."""
    tokens = ["[CLS]"] + tokenizer.tokenize(sentence) + ["[SEP]"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    return tokens, ids, logits[0]


def show(tokens: List[str], ids: List[int], tags: List[int]) -> None:
    width = max(len(t) for t in tokens) + 2
    print(f"{'token':{width}} {'id':>5}  tag")
    for token, i, t in zip(tokens, ids, tags):
        print(f"{token:{width}} {i:>5}  {t}")


def run_packaged() -> int:
    from bert_port import BertForTokenTagging, BertTokenizer
    from converters.mge2torch import convert

    ref = json.loads((DEMO / "reference.json").read_text(encoding="utf-8"))
    print(f"MegEngine token tagger: {DEMO / 'demo_tagger.pkl'}")
    with tempfile.TemporaryDirectory(prefix="bert_port_demo.") as tmp:
        out = Path(tmp) / "model"
        convert(DEMO / "demo_tagger.pkl", DEMO / "bert_config.json", out, vocab=DEMO / "vocab.txt")
        model = BertForTokenTagging.from_pretrained(out, num_labels=ref["num_labels"]).eval()
        tokenizer = BertTokenizer.from_pretrained(out, do_lower_case=True)
    print(f"sentence: {ref['sentence']}\n")
    tokens, ids, logits = tag(model, tokenizer, ref["sentence"])
    show(tokens, ids, logits.argmax(-1).tolist())
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
    show(tokens, ids, logits.argmax(-1).tolist())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bert_port.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a pretrained name (e.g. bert-base-uncased) instead of the packaged tagger")
    parser.add_argument("--sentence", default="The quick brown fox jumps over the lazy dog in Zürich.",
                        help="with --model: the text to tag")
    parser.add_argument("--num-labels", type=int, default=5, help="with --model: size of the tag head")
    parser.add_argument("--cache-dir", help="with --model: cache root (default $BERT_PORT_CACHE)")
    args = parser.parse_args(argv)
    if args.num_labels < 1:
        parser.error("--num-labels must be at least 1")
    try:
        if args.model:
            return run_hub(args.model, args.sentence, args.num_labels, args.cache_dir)
        return run_packaged()
    except (OSError, ValueError, KeyError) as e:  # HubError, ConversionError, unknown names, vocab misses
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
