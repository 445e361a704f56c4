"""The GEMMs of one BERT-base forward at batch 1, per kernel: why `inference.prepack` packs weights.

72 linears (12 layers x query, key, value, attention output, intermediate, output; 340 MB of fp32
weights, distinct per layer, cycled as a forward does) at 32 and 128 rows, on each kernel torch
offers for fp32 on x86: F.linear (MKL sgemm, the weight re-laid out per call), oneDNN's linear
(`mkldnn._linear_pointwise`), and the two packings `prepack` chooses between per weight shape
(`kernels.packing_for`): oneDNN on weights reordered once (`mkldnn._reorder_linear_weight`) and MKL's
packed sgemm on weights packed once (`mkl._mkl_reorder_linear_weight`);
and, as the anchor, ONNX Runtime running the same 72 linears as one graph of `Gemm` nodes (its MLAS
sgemm on weights it prepacks when the session opens, as in the exported model of bench_inference.py).
Prints the median ms per forward's worth of GEMMs, and each kernel's largest difference to F.linear.

    python bench/bench_linear.py            # ~30 s
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
    xs = xs_for(rows)
    mkldnn = [[(torch.ops.mkldnn._reorder_linear_weight(w, rows), b) for w, b in layer] for layer in layers]
    mkl = [[(torch.ops.mkl._mkl_reorder_linear_weight(w, 128), w, b) for w, b in layer] for layer in layers]
    return {
        "F.linear": lambda: [[F.linear(xs[w.shape[1]], w, b) for w, b in layer] for layer in layers],
        "oneDNN": lambda: [[torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, b, "none", [], "")
                            for w, b in layer] for layer in layers],
        "oneDNN, reordered once": lambda: [[torch.ops.mkldnn._linear_pointwise(xs[p.size(1)], p, b, "none", [], "")
                                            for p, b in layer] for layer in mkldnn],
        "MKL packed once": lambda: [[torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, b, rows)
                                               for p, w, b in layer] for layer in mkl],
    }


def onnx_runtime(rows: int, layers, threads: int) -> Callable:
    """The same linears as ONNX Runtime `Gemm` nodes (B transposed, bias added) in one session, all
    graph optimisations on, `threads` intra-op threads, no idle spinning (as bench/common.make_ort)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights, outputs = [], [], []
    for i, (w, b) in enumerate(wb for layer in layers for wb in layer):
        weights += [numpy_helper.from_array(w.numpy(), f"w{i}"), numpy_helper.from_array(b.numpy(), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [f"x{w.shape[1]}", f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [rows, w.shape[0]]))
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [rows, k]) for k in (768, 3072)]
    graph = helper.make_graph(nodes, "linears", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {f"x{k}": x.numpy() for k, x in xs_for(rows).items()}
    per_layer = len(layers[0])

    def run():
        out = [torch.from_numpy(y) for y in session.run(None, feed)]
        return [out[i:i + per_layer] for i in range(0, len(out), per_layer)]
    return run


def xs_for(rows: int) -> Dict[int, torch.Tensor]:
    """The inputs of `rows` rows (the same values for every kernel)."""
    g = torch.Generator().manual_seed(rows)
    return {k: torch.randn(rows, k, generator=g) for k in (768, 3072)}


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
        try:
            fns["ONNX Runtime Gemm (MLAS, prepacked)"] = onnx_runtime(rows, layers, args.threads)
        except ImportError as e:  # the anchor is optional: pip install -e ".[export]"
            print(f"(ONNX Runtime row skipped: {e})")
        ref = fns["F.linear"]()
        for name, fn in fns.items():
            diff = max(float((o - r).abs().max()) for lo, lr in zip(fn(), ref) for o, r in zip(lo, lr))
            rows_out.append((f"1×{rows}", name, f"{median_ms(fn, max(args.reps, 20)):.1f}", f"{diff:.1e}"))
    print(C.table(["input", "kernel", "ms per forward's GEMMs (median)", "max |diff| to F.linear"], rows_out))


if __name__ == "__main__":
    main()
