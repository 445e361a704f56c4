"""Conversion of a BERT-large-sized TF checkpoint (with Adam slots, ~4 GB): time vs `cp`, peak RSS.

    python bench/bench_convert.py [--dir /tmp] [--rounds 3] [--layers 24]

Builds the checkpoint in a temporary directory (deleted afterwards; never committed): Google's
names for 24 layers, H=1024, I=4096, V=30522, plus `adam_m`/`adam_v` for every weight and
`global_step`. Then, alternately, `cp` of the checkpoint's bytes and `python -m converters.tf2torch`
in a fresh process (peak RSS from getrusage of the child). Targets (issue): conversion <= 2x the
copy time, peak RSS < 1.2x the output size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.mapping import RULES  # noqa: E402
from converters.tf_checkpoint import write_tf_checkpoint  # noqa: E402


def google_names(layers: int, H: int, I: int, V: int, P: int, T: int) -> dict:
    """Every TF1 variable of BertForPreTraining with its shape, from the shared mapping table."""
    shapes = {
        "bert/embeddings/word_embeddings": (V, H), "bert/embeddings/position_embeddings": (P, H),
        "bert/embeddings/token_type_embeddings": (T, H), "cls/predictions/output_bias": (V,),
        "cls/seq_relationship/output_weights": (2, H), "cls/seq_relationship/output_bias": (2,),
    }
    for tf_name, *_ in RULES:
        if tf_name in shapes or tf_name.startswith(("output_", "cls/squad")):
            continue
        names = [tf_name.replace("{i}", str(i)) for i in range(layers)] if "{i}" in tf_name else [tf_name]
        for name in names:
            if name.endswith("/kernel"):
                n_in = I if "/output/dense" in name and "attention" not in name else H
                n_out = I if "intermediate" in name else H
                shapes[name] = (n_in, n_out)
            else:  # bias / gamma / beta
                shapes[name] = (I,) if "intermediate" in name else (H,)
    return shapes


def build_checkpoint(prefix: Path, layers: int) -> int:
    shapes = google_names(layers, H=1024, I=4096, V=30522, P=512, T=2)
    pool = np.random.default_rng(0).standard_normal(40_000_000, dtype=np.float32) * 0.02  # shared source
    tensors = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        for suffix in ("", "/adam_m", "/adam_v"):
            start = (hash(name + suffix) % 1000) * 1000
            tensors[name + suffix] = pool[start:start + n].reshape(shape) if n <= pool.size - start else \
                np.resize(pool, n).reshape(shape)
    tensors["global_step"] = np.array(1000, dtype=np.int64)
    write_tf_checkpoint(prefix, tensors)
    return sum(p.stat().st_size for p in prefix.parent.iterdir())


def timed(cmd: list) -> tuple[float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    return elapsed, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bert_port_bench_", dir=args.dir))
    try:
        src = work / "ckpt"
        src.mkdir()
        t = time.perf_counter()
        total = build_checkpoint(src / "bert_model.ckpt", args.layers)
        print(f"built {total / 1e9:.2f} GB checkpoint in {time.perf_counter() - t:.1f} s")
        config = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16,
                      intermediate_size=4096, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)
        (work / "bert_config.json").write_text(json.dumps(config))
        copies, converts = [], []
        for r in range(args.rounds):
            shutil.rmtree(work / "copy", ignore_errors=True)
            shutil.rmtree(work / "out", ignore_errors=True)
            copies.append(timed(["cp", "-r", str(src), str(work / "copy")])[0])
            elapsed, rss_kb = timed([sys.executable, "-m", "converters.tf2torch", str(src / "bert_model.ckpt"),
                                     "--config", str(work / "bert_config.json"), "--out", str(work / "out")])
            converts.append(elapsed)
        out_bytes = (work / "out/model.safetensors").stat().st_size
        cp_med, conv_med = statistics.median(copies), statistics.median(converts)
        rss = rss_kb * 1024
        print(f"\n| what | median s (min-max), {args.rounds} rounds |\n|---|---|")
        print(f"| cp -r checkpoint ({total / 1e9:.2f} GB) | {cp_med:.2f} ({min(copies):.2f}-{max(copies):.2f}) |")
        print(f"| tf2torch -> model.safetensors ({out_bytes / 1e9:.2f} GB) | {conv_med:.2f} "
              f"({min(converts):.2f}-{max(converts):.2f}) |")
        print(f"\nconversion / cp = {conv_med / cp_med:.2f}x (target <= 2x)")
        print(f"peak RSS {rss / 1e9:.2f} GB = {rss / out_bytes:.2f}x the output size (target < 1.2x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
