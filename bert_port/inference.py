"""Opt-in serving mode for batch-1 latency: `fast = prepack(model)`, then `fast(input_ids, ...)`.

Why: at batch 1 (1x32 .. 1x128 tokens) a BERT forward reads every weight once for a few dozen rows,
and F.linear re-lays each weight out for the GEMM on every call: at 1x32 that re-layout costs about
as much as the arithmetic. `prepack` packs each fp32 `nn.Linear` weight once with MKL's packed sgemm
(as ONNX Runtime prepacks its weights when a session opens); calls then run the GEMMs on the packed
copies. Same fp32 arithmetic: outputs within a few 1e-6 of the plain model. Measured on BERT-base, 2
threads, AMX Xeon (bench/bench_inference.py, case single): 1x32 ~20 % and 1x128 ~15 % faster than
the plain model; larger batches are unchanged.

What it costs, said plainly:
- memory: one packed copy of every linear weight, held by the returned object (`del fast` frees
  it): BERT-base's 326 MB of linear weights grew the process by 396 MB. Packing takes 0.1-0.5 s;
- a snapshot: the copies are of the weights at packing time. A weight changed in place (e.g.
  `load_state_dict`, an optimizer step) or replaced is packed again on its next call; a change made
  through `.data` cannot be seen: call `fast.repack()` after one;
- a warm-up: the first call in each row-count bucket (16-31, 32-63, 64-127, ... tokens in the batch)
  measures the candidate kernels once (bert_port.kernels): +0.13-0.16 s for BERT-base on 2 cores. A
  service warms up with one call per length bucket it expects;
- inference only: `prepack` puts the model in eval mode and calls run under `torch.no_grad()`; the
  model is otherwise not changed (its modules stay `nn.Linear`, its parameters stay in place, calling
  `model(...)` directly runs the plain path);
- torch builds without MKL (e.g. ARM) run the plain path, and every packed kernel is checked against
  F.linear on its first call of each shape (bert_port.kernels), so nothing depends on MKL packing
  working for every row count.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bert_port import kernels
from bert_port.model import BertSelfAttention


class Prepacked:
    """Calls `model(*args, **kwargs)` with its fp32 linear weights packed once (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.packed: kernels.PackedTable = {}
        self.repack()

    def repack(self) -> None:
        """Pack every fp32 nn.Linear weight of the model again (after changes made through `.data`):
        attention's query, key and value side by side as one GEMM, every other linear alone."""
        self.packed = {}
        if not kernels.can_pack():
            return
        grouped = set()
        for m in self.model.modules():
            group = m.projections() if isinstance(m, BertSelfAttention) else ()
            if group and all(_packable(p) for p in group) and len({p.bias is None for p in group}) == 1:
                self.packed[group] = kernels.PackedWeight.of(*group)
                grouped.update(group)
        self.packed.update({m: kernels.PackedWeight.of(m) for m in self.model.modules()
                            if _packable(m) and m not in grouped})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), kernels.using_packed(self.packed):
            return self.model(*args, **kwargs)


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"


def prepack(model: nn.Module) -> Prepacked:
    """A callable with `model`'s forward signature whose linears run on packed weights (see the module docstring)."""
    return Prepacked(model)
