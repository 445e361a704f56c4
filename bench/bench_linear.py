"""The GEMMs of one BERT-base forward at batch 1, per kernel: why `inference.prepack` packs weights.

72 linears (12 layers x query, key, value, attention output, intermediate, output; 340 MB of fp32
weights, distinct per layer, cycled as a forward does) at 32 and 128 rows, on each kernel torch
offers for fp32 on x86: F.linear (MKL sgemm, the weight re-laid out per call), oneDNN's linear
(`mkldnn._linear_pointwise`), oneDNN on weights reordered once (`mkldnn._reorder_linear_weight`) and
MKL's packed sgemm on weights packed once (`mkl._mkl_reorder_linear_weight`, what `prepack` uses).
Prints the median ms per forward's worth of GEMMs, and each kernel's largest difference to F.linear.

    python bench/bench_linear.py            # ~1 min
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402

SHAPES = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]  # (in, out) of one layer's six linears


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * C.med(times)


def kernels(rows: int, layers) -> Dict[str, Callable]:
    """kernel name -> a function running every layer's linears on an input of `rows` rows."""
    xs = {k: torch.randn(rows, k) for k in (768, 3072)}
    mkldnn = [[(torch.ops.mkldnn._reorder_linear_weight(w, rows), b) for w, b in layer] for layer in layers]
    mkl = [[(torch.ops.mkl._mkl_reorder_linear_weight(w, 128), w, b) for w, b in layer] for layer in layers]
    return {
        "F.linear": lambda: [[F.linear(xs[w.shape[1]], w, b) for w, b in layer] for layer in layers],
        "oneDNN": lambda: [[torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, b, "none", [], "")
                            for w, b in layer] for layer in layers],
        "oneDNN, reordered once": lambda: [[torch.ops.mkldnn._linear_pointwise(xs[p.size(1)], p, b, "none", [], "")
                                            for p, b in layer] for layer in mkldnn],
        "MKL packed once (prepack)": lambda: [[torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, b, rows)
                                               for p, w, b in layer] for layer in mkl],
    }


def main() -> None:
    args = C.arg_parser(__doc__).parse_args()
    C.setup(args.threads)
    print(C.machine() + "\n")
    g = torch.Generator().manual_seed(0)
    layers = [[(torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g)) for k, n in SHAPES]
              for _ in range(12)]
    rows_out = []
    for rows in (32, 128):
        fns = kernels(rows, layers)
        ref = fns["F.linear"]()
        for name, fn in fns.items():
            diff = max(float((o - r).abs().max()) for lo, lr in zip(fn(), ref) for o, r in zip(lo, lr))
            rows_out.append((f"1×{rows}", name, f"{median_ms(fn, max(args.reps, 20)):.1f}", f"{diff:.1e}"))
    print(C.table(["input", "kernel", "ms per forward's GEMMs (median)", "max |diff| to F.linear"], rows_out))


if __name__ == "__main__":
    main()
