"""Training-step benchmark, BERT-base sequence classification (random weights), CPU fp32.

One step = forward + loss + backward + AdamW step (fused=True; --unfused-adamw for the
for-loop default), dropout on (train mode). "ours" draws dropout exactly as pytorch_pretrained_bert
(padded computation, explicit attention dropout); "ours_fast" is the opt-in BertConfig(fast_dropout=True). tokens/s counts real
(non-padding) tokens. Cases: 8x128 full length, and batch 32 with lengths uniform in 16-128
padded to 128. Before timing, loss and gradients are checked against HF in eval mode.

    /work/venv/bin/python bench/bench_train.py             # ~5 min on 2 cores
    /work/venv/bin/python bench/bench_train.py --quick     # 8x128 only
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402

IMPLS = ["ours", "ours_fast", "hf_sdpa"]  # ours_fast: BertConfig(fast_dropout=True), the opt-in


def check_gradients(models, losses, inputs, labels) -> str:
    """Eval mode (no dropout): same loss and same gradients as HF, before any timing."""
    grads, values = {}, {}
    for impl in IMPLS:
        m = models[impl].eval()
        m.zero_grad(set_to_none=True)
        loss = losses[impl](*inputs, labels)
        loss.backward()
        values[impl] = loss.item()
        grads[impl] = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
        m.train()
    ref, ours = grads["hf_sdpa"], grads["ours"]
    # Relative to each tensor's scale, floored at 1e-3 of the largest gradient: the attention key
    # bias has an exactly-zero true gradient (softmax ignores a constant shift), i.e. pure rounding noise.
    floor = 1e-3 * max(float(r.abs().max()) for r in ref.values())
    worst = 0.0
    for name, g in ours.items():
        r = ref[name]
        worst = max(worst, float((g - r).abs().max()) / max(float(r.abs().max()), floor))
    assert abs(values["ours"] - values["hf_sdpa"]) < 1e-4, values
    assert worst < 1e-3, f"gradients disagree with HF: max relative diff {worst:.2e}"
    for m in models.values():
        m.zero_grad(set_to_none=True)
    return f"loss ours {values['ours']:.6f} hf {values['hf_sdpa']:.6f}; max rel grad diff {worst:.1e}"


def main() -> None:
    p = C.arg_parser(__doc__)
    p.set_defaults(warmup=1)  # the first step also allocates the AdamW state
    p.add_argument("--unfused-adamw", action="store_true", help="PyTorch's default (for-loop) AdamW")
    args = p.parse_args()
    C.setup(args.threads)
    print(C.machine())
    print(f"reps={args.reps} warmup={args.warmup}\n")
    models = {impl: C.make_model(impl, head="cls").train() for impl in IMPLS}
    losses = {impl: C.loss_fn(impl, m) for impl, m in models.items()}
    # fused=True: PyTorch's CPU default is the per-tensor loop, ~0.5 s a step on BERT-base here,
    # the same cost for every implementation; the fused kernel makes the model's share visible.
    opts = {impl: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=not args.unfused_adamw)
            for impl, m in models.items()}

    cases = [("8×128", C.make_batch(8, 128, seed=4))]
    if not args.quick:
        cases.append(("32×128 padded (16–128)", C.make_batch(32, 128, (16, 128), seed=5)))
    rows, summary = [], []
    for label, inputs in cases:  # all checks first: training steps make the models drift apart
        labels = torch.arange(inputs[0].shape[0]) % 2
        print(f"{label}: {check_gradients(models, losses, inputs, labels)}")
    for label, inputs in cases:
        labels = torch.arange(inputs[0].shape[0]) % 2

        def step(impl, inputs=inputs, labels=labels):
            opts[impl].zero_grad(set_to_none=True)
            losses[impl](*inputs, labels).backward()
            opts[impl].step()

        times = C.time_alternating({impl: (lambda i=impl: step(i)) for impl in IMPLS}, args.reps,
                                   max(args.warmup, 1))
        tokens = C.real_tokens(inputs[2])
        for impl, ts in times.items():
            rows.append([label, impl, C.fmt_ms(ts), f"{tokens / C.med(ts):.0f}",
                         f"{C.paired_ratio(times['hf_sdpa'], ts):.2f}×"])
        goal = 1.4 if "padded" in label else 1.0
        summary.append((f"train tokens/s {label}, ours (ppb dropout) vs HF (report)",
                        C.paired_ratio(times["hf_sdpa"], times["ours"]), None))
        summary.append((f"train tokens/s {label}, ours_fast vs HF ≥ {goal}",
                        C.paired_ratio(times["hf_sdpa"], times["ours_fast"]), goal))

    print()
    print(C.table(["case", "impl", "ms/step median (min–max)", "real tok/s", "speedup vs HF ×"], rows))
    print()
    print(C.table(["target", "measured", "met"],
                  [(n, f"{r:.2f}×", "report" if g is None else ("yes" if r >= g else "NO")) for n, r, g in summary]))


if __name__ == "__main__":
    main()
