"""Opt-in serving mode for batch-1 latency: `fast = prepack(model)`, then `fast(input_ids, ...)`.

Why: at batch 1 (1x32 .. 1x128 tokens) a BERT forward reads every weight once for a few dozen rows,
and F.linear re-lays each weight out for the GEMM on every call: at 1x32 that re-layout costs about
as much as the arithmetic. `prepack` packs each fp32 `nn.Linear` weight once (as ONNX Runtime
prepacks its weights when a session opens), with MKL's packed sgemm or oneDNN's reordered layout,
whichever runs the weight's shape faster on this machine (measured: bert_port.kernels.packing_for;
MKL's is 2x slower than oneDNN's on AMD Zen 4 and 7 % faster on an AMX Xeon); calls then run the GEMMs
on the packed copies. Same fp32 arithmetic: outputs within a few 1e-6 of the plain model. And each stock BertLayer
runs as straight-line code (`PackedLayer`: the module path's ops without its per-module and per-linear
Python, checked once per call), the same numbers bit for bit: between GEMMs that stream the weights
through the caches that Python costs several times its warm-cache time. Measured on BERT-base, 2
threads (bench/bench_inference.py, case single; bench/README.md): 1x32 ~20-25 % and 1x128 ~15-20 %
faster than the plain model on an AMX Xeon (PackedLayer's part: ~5 % at 1x32), 1x32 ~30 % and 1x128
~12 % on a Zen 4; 8x128 is unchanged.

What it costs, said plainly:
- memory: one packed copy of every linear weight, held by the returned object (`del fast` frees
  it): BERT-base's 326 MB of linear weights grew the process by 396 MB. Packing takes 0.1-0.5 s;
- a snapshot: the copies are of the weights at packing time. A weight changed in place (e.g.
  `load_state_dict`, an optimizer step) or replaced is packed again on its next call; a change made
  through `.data` cannot be seen: call `fast.repack()` after one. A layer's modules, hooks, modes and
  weights are checked when a call starts (a hook that changes them in the middle of a call is seen
  by the next one);
- a warm-up: choosing the packing measures each weight shape once per process (+0.26 s for
  BERT-base's four shapes, in the first `prepack`), and the first call in each row-count bucket
  (16-31, 32-63, 64-127, ... tokens in the batch) measures the candidate kernels once
  (bert_port.kernels): +0.13-0.16 s for BERT-base on 2 cores. A service warms up with one call per
  length bucket it expects;
- inference only: `prepack` puts the model in eval mode and calls run under `torch.no_grad()`; the
  model is otherwise not changed (its modules stay `nn.Linear`, its parameters stay in place, calling
  `model(...)` directly runs the plain path);
- torch builds with neither MKL nor oneDNN run the plain path, and every packed kernel is checked
  against F.linear on its first call of each shape (bert_port.kernels), so nothing depends on a
  packing working for every row count.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bert_port import kernels
from bert_port.attention import AttentionPlan
from bert_port.model import (BertAttention, BertIntermediate, BertLayer, BertLayerNorm, BertOutput, BertSelfAttention,
                             BertSelfOutput)


class Prepacked:
    """Calls `model(*args, **kwargs)` with its fp32 linear weights packed once (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.packed: kernels.PackedTable = {}
        self.layers: List[PackedLayer] = []
        self.repack()

    def repack(self) -> None:
        """Pack every fp32 nn.Linear weight of the model again (after changes made through `.data`):
        attention's query, key and value side by side as one GEMM, every other linear alone; and give
        every stock BertLayer whose GEMMs are all packed its straight-line forward (PackedLayer)."""
        self.packed = {}
        self.layers = []
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
        layers = (PackedLayer(m) for m in self.model.modules() if PackedLayer.stock(m))
        self.layers = [run for run in layers if all(key in self.packed for key, _ in run.linears)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), kernels.using_packed(self.table_now()):
            return self.model(*args, **kwargs)

    def table_now(self) -> kernels.PackedTable:
        """The packed weights, and the BertLayers that can run as one PackedLayer in this call (none while
        a global hook, a graph recording or a replaced method of the layer's classes must be honoured)."""
        if kernels.global_hooks_or_recording() or any(getattr(cls, name) is not f for cls, name, f in _METHODS):
            return self.packed
        ready = {run.layer: run for run in self.layers if run.ready(self.packed)}  # may pack weights again
        return {**self.packed, **ready}


class PackedLayer:
    """One BertLayer's inference forward as straight-line code on its packed weights.

    Why: at 1x32 the GEMMs stream ~340 MB of weights, which evicts the interpreter's code and data
    between them; the module path's Python between two GEMMs (9 module calls per layer, a kernel
    choice and its checks per linear) then costs several times what it costs on warm caches. This path
    checks the layer once and runs the same ops in the same order (the same numbers, bit for bit).

    It runs only while the layer is exactly as packed: the same stock modules in the same places, in
    eval mode, without hooks (none global) and with their own forwards (none replaced on the instance
    or the class), fp32 CPU input, an SDPA attention plan, no graph being recorded, and the packed
    kernel chosen for all four GEMMs at this row count. Otherwise (returns None) the module path runs,
    hooks, replaced forwards and swapped-in modules included.
    """

    def __init__(self, layer: BertLayer) -> None:
        self.layer = layer
        attention, inter, out = layer.attention, layer.intermediate, layer.output
        attn, attn_out = attention.self, attention.output
        # (parent, name, module) of every module the module path calls: checked as each call starts (ready)
        self.slots = tuple((parent, name, parent._modules[name]) for parent, names in (
            (layer, ("attention", "intermediate", "output")), (attention, ("self", "output")),
            (attn, ("query", "key", "value")), (attn_out, ("dense", "LayerNorm")), (inter, ("dense",)),
            (out, ("dense", "LayerNorm"))) for name in names)
        self.attn, self.inter = attn, inter
        self.ln1, self.ln2 = attn_out.LayerNorm, out.LayerNorm
        # (packed-table key, its modules) of the four GEMMs: query+key+value as one, then the three dense layers
        self.linears = ((attn.projections(), attn.projections()),) + tuple(
            (m, (m,)) for m in (attn_out.dense, inter.dense, out.dense))
        self.width = attn.query.in_features

    @staticmethod
    def stock(layer: nn.Module) -> bool:
        """A BertLayer made of bert_port's own modules (the ones whose forward this class reproduces)."""
        if type(layer) is not BertLayer:
            return False
        att = layer._modules.get("attention")
        parts = (att, layer._modules.get("intermediate"), layer._modules.get("output"))
        if tuple(map(type, parts)) != (BertAttention, BertIntermediate, BertOutput):
            return False
        attn, attn_out = att._modules.get("self"), att._modules.get("output")
        return (type(attn) is BertSelfAttention and type(attn_out) is BertSelfOutput
                and all(type(m._modules.get("LayerNorm")) is BertLayerNorm for m in (attn_out, parts[2])))

    def ready(self, table: kernels.PackedTable) -> bool:
        """Is the layer as packed: the same modules in the same places, in eval mode, without hooks or a
        forward replaced on the instance, its weights packed as they are now (packed again here if one
        changed in place)? Checked when a call starts, for all layers in one pass: BERT-base 1x32,
        ~0.45 ms there against ~1 ms spread between the GEMMs (which leave the caches cold)."""
        layer = self.layer
        if layer.training or layer._forward_hooks or layer._forward_pre_hooks:
            return False
        for parent, name, m in self.slots:
            if (parent._modules.get(name) is not m or m.training or m._forward_hooks or m._forward_pre_hooks
                    or "forward" in m.__dict__):
                return False
        return all(kernels.current(table, key, modules) is not None for key, modules in self.linears)

    def __call__(self, layer: BertLayer, h: torch.Tensor, plan: Any) -> Optional[torch.Tensor]:
        """(B, S, H) -> (B, S, H): the layer's forward on packed weights, or None (the module path runs)."""
        if (type(plan) is not AttentionPlan or plan.path not in ("sdpa", "sdpa_masked") or plan.unpadded
                or type(h) is not torch.Tensor
                or h.dtype != torch.float32 or not h.is_cpu or h.dim() != 3 or h.shape[-1] != self.width):
            return None
        table, rows, act = kernels.packed_table(), h.shape[0] * h.shape[1], self.inter.intermediate_act_fn
        qkv, o, i, o2 = (table[key] for key, _ in self.linears)
        if not (kernels.packed_chosen(qkv, "group/3", rows) and kernels.packed_chosen(o, "add", rows)
                and kernels.packed_chosen(i, kernels.epilogue(act, None), rows) and kernels.packed_chosen(o2, "add", rows)):
            return None  # a kernel not yet decided at this row count (the module path decides it), or not packed
        # the module path's ops in its order: BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput
        attn, ln1, ln2 = self.attn, self.ln1, self.ln2
        # (B, S, 3H) -> q, k, v (B, A, S, D): the views `split` + `transpose_for_scores` give, in 3 ops instead of 7
        q, k, v = kernels.run_packed(qkv, h, None, None).view(
            *h.shape[:-1], len(qkv.splits), attn.num_attention_heads, attn.attention_head_size).permute(2, 0, 3, 1, 4)
        mask = None if plan.mask is None else plan.mask.to(q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        ctx = ctx.transpose(1, 2).reshape(*h.shape[:-1], attn.all_head_size)
        a = F.layer_norm(kernels.run_packed(o, ctx, None, h), ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        y = kernels.run_packed(o2, kernels.run_packed(i, a, act, None), None, a)
        return F.layer_norm(y, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)


_STOCK = (BertAttention, BertSelfAttention, BertSelfOutput, BertLayerNorm, BertIntermediate, BertOutput, BertLayerNorm)
# The methods whose work PackedLayer reproduces, as imported: one replaced later on its class (by a
# library that patches it) makes every layer run its modules, so the replacement runs.
_METHODS = tuple((cls, name, getattr(cls, name)) for cls, name in (
    [(cls, "forward") for cls in (nn.Linear,) + _STOCK]
    + [(BertSelfAttention, "transpose_for_scores"), (BertSelfAttention, "projections")]))


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"


def prepack(model: nn.Module) -> Prepacked:
    """A callable with `model`'s forward signature whose linears run on packed weights (see the module docstring)."""
    return Prepacked(model)
