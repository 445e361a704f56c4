"""int8 inference: `quantize_int8(model)` returns a new model whose encoder linears run int8 GEMMs.

The scheme, and why it is this one:
- weights: symmetric int8 with one scale per output channel (row of W), computed once;
- activations: asymmetric 8-bit (uint8) with one scale and zero point per token (row of x), taken
  from that row's min and max at every call (dynamic: no calibration data, nothing to re-tune per task);
- y = s_x s_w (x_q @ W_q^T - zero rowsum(W_q)) + b, the u8 x s8 product on oneDNN's int8 linear with a
  prepacked weight (AMX or VNNI instructions where the CPU has them; `torch._int_mm` elsewhere).
  The prepacked copy lives beside the module (not in its state), made on first use.
- the input is quantized once per tensor, and query, key and value, which read the same one, run as one
  int8 GEMM on their weights side by side (see _quantized_input, QuantizedLinear.forward_group).
The quantization of a token does not depend on the batch, except which 2 input channels stay in
floating point (the largest in the batch; see OUTLIER_COLUMNS).
One scale per tensor for the activations (`torch.ao.quantization.quantize_dynamic`'s scheme) lets
a single large token coarsen every other token of the batch: on all-MiniLM-L6-v2 it moves sentence
embeddings to cosine 0.93. Per-token scales, with the two largest input channels of each call kept
in floating point, keep them above 0.99 (bench/README.md).

What is quantized: every `nn.Linear` inside the encoder (`BertEncoder`): six per layer, almost all
of the FLOPs. Embeddings, attention softmax, LayerNorm, the pooler and task heads stay in floating
point. The returned model is a deep copy in eval mode (the input model is not touched); module
names and the forward signature are the input's, each quantized linear is a `QuantizedLinear` with
`weight_int8` / `weight_scale` / `bias` buffers (so `state_dict()` and module walkers see them).
It is for inference only: no gradients flow through a `QuantizedLinear`. Save the fp32 model and
quantize after loading: the copy's `save_pretrained` raises (from_pretrained would read its int8
buffers as missing fp32 weights).

Speed: made for batches (BERT-base 8x128: ~2x the fp32 model). At batch 1 the eager ops around each
int8 GEMM dominate: 1x128 runs ~1.4x the fp32 model under `inference.prepack`, 1x32 ~1.2x, and ONNX
Runtime's int8 is faster there: ~1.25x at 1x128 and ~1.7x at 1x32 on a Xeon without AMX (3-4x on one
with AMX, measured before the changes that brought 1x32 from level with `prepack` to 1.2x)
(bench/bench_inference.py case int8, bench/README.md).

Memory: besides the int8 weights (oneDNN's packed copy of them, and each linear's last correction terms:
4 x out_features floats, 1.3 MB for BERT-base), each thread that runs a quantized model keeps three work
buffers for the activations it quantizes (7 bytes per value of the largest input: 22 MB for
BERT-base at 8x128, at most 112 MB; see WORKSPACE_VALUES), freed with the thread.

Export: a quantized model does not export to ONNX (ONNX has no per-token dynamic int8 matmul that
ONNX Runtime runs fast); `torch.onnx.export` raises a RuntimeError saying so. To deploy int8 on
ONNX Runtime, export the fp32 model (`python -m bert_port.export`) and quantize the ONNX file with
`onnxruntime.quantization.quantize_dynamic`; bench/bench_inference.py compares both.
torch.compile, torch.export and torch.jit.trace do record a quantized model: while a graph is recorded
a `QuantizedLinear` runs `torch._int_mm` on fresh buffers (ops every compiler knows) instead of
oneDNN's packed kernel and the per-thread workspace; the same integers (inductor's fused arithmetic
may round a tie to the other code), but slower: BERT-base 8x128 compiled 653 ms, eager 386 ms.
"""
from __future__ import annotations

import copy
import functools
import threading
import weakref
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import nn

from bert_port import kernels

# Input channels per call kept in floating point (see _quantized_input); on all-MiniLM-L6-v2, 2 lift the
# worst of 22 sentence embeddings from cosine 0.988 to 0.994 (pairwise change 0.023 -> 0.016); 4-16 do no better.
OUTLIER_COLUMNS = 2

EXPORT_ERROR = ("QuantizedLinear (bert_port.quantize_int8) does not export to ONNX: export the fp32 model and "
                "quantize the .onnx file with onnxruntime.quantization.quantize_dynamic instead")


@kernels.runs_as_group  # query, key and value: one GEMM (forward_group)
@kernels.returns_new_tensor  # its epilogue (GELU, residual add) runs in place
class QuantizedLinear(nn.Module):
    """y = x W^T + b with int8 W (one scale per output row) and int8 x (one scale per token)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        # -s_w * rowsum(W_q): what an activation zero point costs each output (see _linears).
        self.register_buffer("weight_zero_term", torch.zeros(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "QuantizedLinear":
        """Quantize an nn.Linear's weight per output channel; the bias stays in floating point."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        with torch.no_grad():
            w_int8, w_scale = quantize_rows(linear.weight.detach().float())
            q.weight_int8.copy_(w_int8)
            q.weight_scale.copy_(w_scale.squeeze(1))
            q.weight_zero_term.copy_(-w_scale.squeeze(1) * w_int8.sum(1, dtype=torch.int32).float())
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError(EXPORT_ERROR)
        recording = kernels.recording_or_transformed()
        return _linears((self,), x, None if recording else _prepared((self,)))[0]

    @staticmethod
    def forward_group(modules: Tuple["QuantizedLinear", ...], x: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
        """Modules that read the same x (attention's query, key and value; see kernels.runs_as_group) as one
        int8 GEMM on their weights side by side, packed once: the same output as one by one, one call instead
        of three (BERT-base 8x128, in the model: 3.56 ms for the 768->2304 GEMM against 3 x 1.23 ms; whole
        forward 1x32 1.04x, 1x128 1.03x, 8x128 level; bench/README.md).
        None where oneDNN's int8 linear does not run them (then they run one by one)."""
        prepared = _prepared(modules)
        return None if prepared.packed is None else _linears(modules, x, prepared)

    def _int8_matmul(self, xq: torch.Tensor) -> torch.Tensor:
        """(xq @ W_q^T) * s_w in fp32 for uint8 xq without oneDNN's packed weight (recording a graph, or no
        int8 primitive): torch._int_mm (s8 x s8: xq - 128, and 128 rowsum(W_q) added back) and a multiply."""
        xs8 = xq.to(torch.int16).sub_(128).to(torch.int8)  # (not a dtype view: jit.trace cannot record one)
        y = torch._int_mm(xs8, self.weight_int8.t()).float()
        return y.mul_(self.weight_scale).sub_(self.weight_zero_term, alpha=128.0)  # weight_zero_term: -s_w rowsum

    def _correction_rhs(self, cols: torch.Tensor) -> torch.Tensor:
        """[-s_w rowsum(W_q); W[:, cols]^T dequantized; b], (2 + k, N)."""
        w_out = self.weight_int8.index_select(1, cols).float().mul_(self.weight_scale[:, None])
        bias = self.bias.float() if self.bias is not None else self.weight_scale.new_zeros(())
        return torch.cat([self.weight_zero_term[None], w_out.t(), bias[None]], 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _find_qlinear():
    """oneDNN's int8 linear of this torch build (x86 builds with mkldnn), or None."""
    try:
        return torch.ops.onednn.qlinear_pointwise.tensor if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_QLINEAR = _find_qlinear()
_ONE, _ZERO = torch.ones(()), torch.zeros((), dtype=torch.int64)


class _Prepared:
    """What one QuantizedLinear, or query, key and value run as one GEMM, keeps beside itself between calls
    (beside the modules, so that state_dict, deepcopy and .to() see only plain tensors):
    - sources: kernels.stamps of every buffer of the modules, checked once per call (kernels.unchanged) and
      all of this made again when one changed. One check for all of it: at batch 1 it runs ~50 times per
      forward, and BERT-base 1x32 ran 1.09x faster than with a key built per cache (bench/README.md);
    - packed: (oneDNN-packed int8 weight, fp32 per-channel scale) of the weights stacked along the output, or
      None where oneDNN's int8 linear does not run them (no such op or primitive, not CPU, not fp32 scales);
    - last: (outlier columns, correction rhs side by side) of the last call: a model's outlier channels are
      mostly the same from call to call, and gathering two columns of the row-major int8 weight reads a
      cache line per row (~46 us a call at batch 1, bench/README.md)."""

    __slots__ = ("sources", "packed", "last")

    def __init__(self, modules: Tuple["QuantizedLinear", ...]) -> None:
        self.sources = kernels.stamps(_buffers(modules))
        self.packed = _pack(modules)
        self.last: Optional[Tuple[Tuple[int, ...], torch.Tensor]] = None


# first module -> {module count: its _Prepared} (one module alone, or its group)
_state: "weakref.WeakKeyDictionary[QuantizedLinear, dict]" = weakref.WeakKeyDictionary()


def _buffers(modules: Tuple["QuantizedLinear", ...]) -> Iterator[Optional[torch.Tensor]]:
    return (t for m in modules for t in m._buffers.values())


def _prepared(modules: Tuple["QuantizedLinear", ...]) -> _Prepared:
    """The modules' _Prepared, made on first use and again once one of their buffers changed."""
    entries = _state.get(modules[0])
    if entries is None:
        entries = _state[modules[0]] = {}
    entry = entries.get(len(modules))
    if entry is None or not kernels.unchanged(entry.sources, _buffers(modules)):
        entry = entries[len(modules)] = _Prepared(modules)
    return entry


def _pack(modules: Tuple["QuantizedLinear", ...]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if _QLINEAR is None or any(m.weight_int8.device.type != "cpu" or m.weight_scale.dtype != torch.float32
                               for m in modules):
        return None
    weight, scale = ((torch.cat([m.weight_int8 for m in modules]), torch.cat([m.weight_scale for m in modules]))
                     if len(modules) > 1 else (modules[0].weight_int8, modules[0].weight_scale))
    try:
        return torch.ops.onednn.qlinear_prepack(weight, None), scale
    except RuntimeError:  # no int8 primitive on this CPU
        return None


def _correction(modules: Tuple["QuantizedLinear", ...], cols: torch.Tensor,
                prepared: Optional[_Prepared]) -> torch.Tensor:
    """The modules' correction rhs side by side for these outlier columns: the last call's where they are the same."""
    key = tuple(cols.tolist()) if prepared is not None and cols.is_cpu else None
    last = prepared.last if key is not None else None  # (read once: another thread may replace it)
    if last is not None and last[0] == key:
        return last[1]
    rhs = [m._correction_rhs(cols) for m in modules]
    rhs = rhs[0] if len(rhs) == 1 else torch.cat(rhs, 1)
    if key is not None:
        prepared.last = (key, rhs)
    return rhs


def _linears(modules: Tuple[QuantizedLinear, ...], x: torch.Tensor,
             prepared: Optional[_Prepared]) -> Tuple[torch.Tensor, ...]:
    """Each module's x W^T + b, as one int8 GEMM on their weights side by side (prepared.packed), or on
    torch._int_mm (one module) where oneDNN's does not run it.
    While a graph is recorded (torch.compile, torch.export, jit.trace; prepared is None, one module): fresh
    buffers, no cache and torch._int_mm, ops every compiler knows (oneDNN's packed weight and per-thread
    state are not)."""
    outliers = min(OUTLIER_COLUMNS, x.shape[-1])
    xq, x_scale, lhs, cols = _quantize_input(x, outliers) if prepared is None else _quantized_input(x, outliers)
    packed = None if prepared is None else prepared.packed
    if packed is None:
        y = modules[0]._int8_matmul(xq)
    else:  # oneDNN's u8 x s8 linear (AMX/VNNI), s_w applied inside
        y = _QLINEAR(xq, _ONE, _ZERO, packed[0], packed[1], _zeros(packed[1].shape[0]), None, 1.0, 0,
                     torch.float32, "none", [], "")
    y.mul_(x_scale)  # s_x s_w (xq @ W_q^T)
    # x ~= (xq - zero) s_x + outliers and W ~= W_q s_w, so x W^T + b ~= s_x s_w (xq W_q^T - zero rowsum(W_q))
    # + outliers W[:, cols]^T + b: the zero-point, outlier and bias terms are one thin GEMM added in place,
    # lhs = [zero s_x, outlier values, 1] (M, 2 + k) and rhs = [-s_w rowsum(W_q); W[:, cols]^T; b].
    y.addmm_(lhs, _correction(modules, cols, prepared))
    y = y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])
    return (y,) if len(modules) == 1 else y.split([m.out_features for m in modules], -1)


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


_last = threading.local()  # the last input quantized in this thread: query, key and value share it

# Values up to which each thread quantizes activations in three work buffers it keeps (fp32, int16 and uint8, 7
# bytes a value: 112 MB at most; BERT-base 8x128 needs 22 MB). Why keep them: buffers of that size, freed and allocated
# again, often come back as fresh pages from the kernel; BERT-base 8x128 took 60k page faults per forward without
# them and 12k with them (~1.5 us each on the 2-core VM of bench/README.md). Larger inputs get fresh buffers.
WORKSPACE_VALUES = 2**24
_workspace = threading.local()


def _work_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) buffer of this thread's workspace (CPU), overwritten by the next call for `dtype` in
    this thread; a fresh one on other devices and above WORKSPACE_VALUES."""
    n = rows * cols
    if device.type != "cpu" or n > WORKSPACE_VALUES:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
            buf = buffers[dtype] = torch.empty(n, dtype=dtype)
    return buf[:n].view(rows, cols)


def _fresh_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=dtype, device=device)


def _quantized_input(x: torch.Tensor, outliers: int):
    """(uint8 tokens, scale, correction lhs, outlier columns) of x, reused when the same tensor
    object comes again unmodified (its version counter; tensors made under torch.inference_mode have
    none, there the object decides): query, key and value read one hidden state.
    The uint8 tokens live in this thread's workspace, valid until the next input quantized here (the
    cache is per thread too, so a cached entry's tokens are always the workspace's)."""
    version = None if x.is_inference() else x._version
    cached = getattr(_last, "entry", None)
    if cached is not None and cached[0]() is x and cached[1] == version:
        return cached[2]
    result = _quantize_input(x, outliers, _work_buffer)
    _last.entry = (weakref.ref(x), version, result)
    return result


def _quantize_input(x: torch.Tensor, outliers: int, buffer: Callable[..., torch.Tensor] = _fresh_buffer):
    """(uint8 tokens (M, K), scale (M, 1), correction lhs [zero scale, outlier values, 1] (M, 2 + k), outlier
    columns (k,)) of x, in buffers from `buffer(rows, cols, dtype, device)` (fresh ones by default)."""
    x2 = x.detach().reshape(-1, x.shape[-1])  # no gradient flows through int8 tokens
    # The `outliers` (OUTLIER_COLUMNS) input channels with the largest |value| in this batch stay in
    # floating point: in BERT's residual stream a few channels carry most of some tokens' energy
    # ([CLS], [SEP]), and a per-token scale set by them would leave the other channels ~2 levels.
    cols = torch.maximum(x2.amax(0), x2.amin(0).neg_()).topk(outliers).indices
    values = x2.index_select(1, cols).float()
    work = buffer(*x2.shape, torch.float32, x.device).copy_(x2).index_fill_(1, cols, 0.0)
    q, scale, zero = quantize_tokens_(work, buffer(*x2.shape, torch.uint8, x.device),
                                      buffer(*x2.shape, torch.int16, x.device))
    return q, scale, torch.cat([zero * scale, values, torch.ones_like(scale)], 1), cols


def quantize_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row (the weights): (q int8 (N, K), scale (N, 1)), w ~= q * scale."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127
    return (w / scale).round_().to(torch.int8), scale


def quantize_tokens_(x: torch.Tensor, out: torch.Tensor, via: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """Asymmetric 8-bit with one scale and zero point per row (the tokens): (q, scale, zero), x ~= (q - zero) * scale,
    q written into `out` (uint8, x's shape) through `via` (int16, x's shape). Overwrites x (2-D fp32, the
    caller's work buffer).

    Asymmetric because several inputs are far from symmetric (GELU outputs lie in [-0.17, inf)):
    the full 256 levels cover [min, max] of each token. On all-MiniLM-L6-v2 this moves the worst of 12
    sentence embeddings from cosine 0.984 (symmetric per token) to 0.994 (bench/README.md).
    """
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)  # (torch.aminmax is 6x slower here)
    # A real-valued zero point (the matmul's correction term takes any value) maps lo to 0.505 and hi to
    # 255.495: every value within half a level of its code. Plus 0.5 that is [1.005, 255.995], so truncating
    # to uint8 rounds, without a clamp or a rounding pass. Two in-place passes, not addcmul: with two
    # broadcast (rows, 1) operands addcmul runs a scalar loop, ~2x slower here.
    inv = 254.99 / (hi - lo).clamp_(min=1e-12)
    zero = torch.addcmul(torch.full_like(lo, 0.505), lo, inv, value=-1.0)
    # fp32 -> int16 -> uint8: torch converts fp32 to uint8 in a scalar loop (944 us at 1024x3072 on a Zen 4),
    # these two conversions are vectorised (334 us); the same codes, all of them in [1, 255] before truncation.
    q = out.copy_(via.copy_(x.mul_(inv).add_(zero + 0.5)))
    return q, inv.reciprocal(), zero  # q = round(x / scale + zero)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A new model whose encoder nn.Linear modules are `QuantizedLinear` (int8); `model` is unchanged.

    Works on `BertModel` and every head (anything containing a bert_port `BertEncoder`). The copy
    is in eval mode and is meant for inference (`torch.no_grad()` / `torch.inference_mode()`).
    """
    from bert_port.model import BertEncoder

    encoders = [m for m in model.modules() if isinstance(m, BertEncoder)]
    if not encoders:
        raise ValueError(f"quantize_int8: {type(model).__name__} contains no bert_port BertEncoder to quantize")
    # deepcopy's memo maps each encoder Linear to its quantized replacement: the copy gets the
    # QuantizedLinear in its place and the fp32 weight is never duplicated.
    memo = {id(m): QuantizedLinear.from_float(m) for enc in encoders for m in enc.modules() if isinstance(m, nn.Linear)}
    quantized = copy.deepcopy(model, memo).eval()
    if hasattr(quantized, "save_pretrained"):
        quantized.save_pretrained = _refuse_save  # from_pretrained would read it as an fp32 model missing weights
    return quantized


def _refuse_save(*args, **kwargs):
    raise ValueError("save_pretrained: this is a quantize_int8 model, which from_pretrained cannot load; "
                     "save the fp32 model and call bert_port.quantize_int8 after loading it (about a second)")


def quantized_modules(model: nn.Module) -> int:
    """How many QuantizedLinear modules `model` has (0 for a float model)."""
    return sum(isinstance(m, QuantizedLinear) for m in model.modules())
