"""torch.compile on CPU: graph breaks (torch._dynamo.explain) and eager vs compiled time, BERT-base fp32.

1. explain() on bert_port's BertModel with no mask, an all-ones mask and a padded mask, with and
   without autograd: the target is one graph, no breaks. (Compiled, the padded path uses the
   additive-mask branch: it computes the padding, since T is data-dependent.)
2. Inference time, eager vs torch.compile (default inductor), 8x128 and the padded batch
   32x(16-128); HF sdpa eager and compiled as anchors at 8x128.

    /work/venv/bin/python bench/bench_compile.py     # ~4 min (compiling takes ~20-40 s a model)
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402


def explain_rows(model):
    rows = []
    cases = [("no mask", C.make_batch(2, 32)[:2] + (None,)), ("all-ones mask", C.make_batch(2, 32)),
             ("padded mask", C.make_batch(2, 32, (5, 32)))]
    for label, inputs in cases:
        for mode, ctx in (("no_grad", torch.no_grad), ("autograd", torch.enable_grad)):
            torch._dynamo.reset()
            with ctx():
                e = torch._dynamo.explain(model)(*inputs, output_all_encoded_layers=False)
            reasons = "; ".join(sorted({str(b.reason).splitlines()[0][:80] for b in e.break_reasons})) or "—"
            rows.append([label, mode, e.graph_count, e.graph_break_count, reasons])
    torch._dynamo.reset()
    return rows


def main() -> None:
    p = C.arg_parser(__doc__)
    p.set_defaults(reps=6)
    args = p.parse_args()
    C.setup(args.threads)
    warnings.filterwarnings("ignore")
    print(C.machine())
    ours = C.make_model("ours")
    print("\n### Graph breaks (torch._dynamo.explain, bert_port BertModel)\n")
    print(C.table(["inputs", "mode", "graphs", "graph breaks", "reasons"], explain_rows(ours)))

    hf = C.make_model("hf_sdpa")
    fns = {"ours eager": C.forward_fn("ours", ours), "hf_sdpa eager": C.forward_fn("hf_sdpa", hf)}
    compiled = {"ours compiled": ("ours", ours), "hf_sdpa compiled": ("hf_sdpa", hf)}
    full, padded = C.make_batch(8, 128), C.make_batch(32, 128, (16, 128), seed=1)
    compile_s = {}
    with torch.inference_mode():
        for name, (impl, model) in compiled.items():
            fn = C.forward_fn(impl, torch.compile(model))
            t0 = time.perf_counter()
            fn(*full)
            compile_s[name] = time.perf_counter() - t0
            fns[name] = fn
        ref = fns["hf_sdpa eager"](*full)
        for name, fn in fns.items():
            assert C.max_diff_at_real(fn(*full), ref, full[2]) < 2e-4, name
        t_full = C.time_alternating({n: (lambda f=f: f(*full)) for n, f in fns.items()}, args.reps, 1)
        pad_fns = {n: fns[n] for n in ("ours eager", "ours compiled", "hf_sdpa eager")}
        t0 = time.perf_counter()
        pad_fns["ours compiled"](*padded)  # recompiles for the new shape
        compile_s["ours compiled (32×128)"] = time.perf_counter() - t0
        ref = fns["hf_sdpa eager"](*padded)
        for name, fn in pad_fns.items():
            assert C.max_diff_at_real(fn(*padded), ref, padded[2]) < 2e-4, name
        t_pad = C.time_alternating({n: (lambda f=f: f(*padded)) for n, f in pad_fns.items()}, args.reps, 1)

    rows = []
    for label, times in (("fp32 8×128", t_full), ("fp32 32×128 padded (16–128)", t_pad)):
        for name, ts in times.items():
            rows.append([label, name, C.fmt_ms(ts), f"{C.paired_ratio(times['ours eager'], ts):.2f}×",
                         f"{C.paired_ratio(times['hf_sdpa eager'], ts):.2f}×"])
    print("\n### Eager vs torch.compile (inference)\n")
    print(C.table(["case", "impl", "ms median (min–max)", "speed vs ours eager", "speed vs HF sdpa eager"], rows))
    print("\nfirst-call (compile) seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in compile_s.items()))


if __name__ == "__main__":
    main()
