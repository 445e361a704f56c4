"""Which kernel runs an `nn.Linear` (and its activation / residual epilogue), decided on this machine.

The model calls `linear(module, x, act, residual)` instead of `module(x)`. The module stays a plain
`nn.Linear` with its parameters: quantisation, pruning, LoRA wrappers and module walkers see what
they expect, and anything that is not a plain, hook-free `nn.Linear` on a plain CPU tensor is
simply called (`module(x)`), so a swapped-in module always runs its own forward.

For plain modules there are two kernels:
- "torch":  `F.linear` then the epilogue (MKL sgemm for fp32 on x86 wheels);
- "onednn": `torch.ops.mkldnn._linear_pointwise`, with GELU/ReLU or the residual add fused into
  the matmul at inference. On some x86 CPUs oneDNN's fp32 GEMMs run twice as fast as MKL's; on
  others they are equal, and oneDNN bf16 needs AVX-512 (elsewhere it cannot build a primitive).

- "packed": MKL's sgemm on a weight packed once ahead of time (`cblas_sgemm_pack`), fp32 inference
  only, and only inside `using_packed(...)` (`bert_port.inference.prepack` sets it up): the packed
  copy costs as much memory as the weight, so nobody pays for it without asking. At batch 1 the
  per-call re-layout of the weight is as costly as the matmul itself; packed once, 1x32 runs ~20 %
  faster on BERT-base. Activation and residual run after it.

So nothing is assumed: the first call of each (dtype, in, out, epilogue, rows bucket, autograd,
packed) runs every candidate kernel, checks that they agree and keeps another kernel than F.linear
only if it is measurably faster (5 %). Set `BERT_PORT_LINEAR=torch` (or `onednn`, `packed`) to force
a choice; `choices()` shows what was decided.
Tracing, scripting, ONNX export, torch.compile / torch.export and tensor subclasses always get
"torch", the kernel every exporter knows.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, List, MutableMapping, Optional, Sequence, Tuple, Union

# oneDNN keeps 1024 compiled primitives by default; each fused linear (shape, dtype, epilogue) is one,
# so a process that runs several shapes and dtypes evicts and rebuilds them every call: the bf16 case
# of bench_inference.py measured 229 ms with the default and 206 ms with 8192 (HF bf16: 207-210 ms).
# Read by oneDNN when its cache is first used, so it is set before torch runs anything; a value the
# user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# Rows below this: small GEMMs where the choice cannot matter much; never measured.
MIN_ROWS = 16
# oneDNN must beat F.linear by this factor to be chosen: a tie goes to the standard kernel.
MARGIN = 0.95

Key = Tuple[torch.dtype, int, int, str, int, bool, bool]
_choices: Dict[Key, str] = {}
# The packing's row count: MKL lays the weight out for GEMMs of about this many rows, and the packed
# copy then serves any row count (checked against F.linear on the first call of each key). Packing for
# 128 rows measured fastest from 1x32 to 8x128 rows; packing for 16 is ~20 % slower at >= 32 rows.
PACK_ROWS = 128


@dataclass(frozen=True)
class PackedWeight:
    """Linear weights packed by MKL (one, or several side by side as one GEMM), with the identity and
    version of each tensor they were packed from."""

    data: torch.Tensor
    sources: Tuple[torch.Tensor, ...]
    versions: Tuple[int, ...]
    shape: torch.Tensor  # (out, in) without storage: the op reads the original weight's shape only

    @classmethod
    def of(cls, *weights: torch.Tensor) -> "PackedWeight":
        w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        # The packed buffer must stay where MKL wrote it (MKL's rule), so it is never copied or saved.
        data = torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
        return cls(data, weights, tuple(w._version for w in weights), torch.zeros((), dtype=w.dtype).expand(w.shape))

    def fits(self, weights: Sequence[torch.Tensor]) -> bool:
        """Still the same weights, unchanged since packing (in-place changes bump `_version`; changes
        made through `.data` cannot be seen: pack again after those)."""
        return len(weights) == len(self.sources) and all(
            w is s and w._version == v for w, s, v in zip(weights, self.sources, self.versions))


# nn.Linear -> its packed weight; a tuple of nn.Linear with the same input -> their weights packed as one
PackedTable = MutableMapping[Union[nn.Module, Tuple[nn.Module, ...]], PackedWeight]
_packed: contextvars.ContextVar[Optional[PackedTable]] = contextvars.ContextVar("bert_port_packed", default=None)


def can_pack() -> bool:
    """Does this torch build have MKL's packed sgemm (x86 builds with MKL)?"""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


@contextlib.contextmanager
def using_packed(table: PackedTable) -> Iterator[None]:
    """Within this block, `linear` may run the modules in `table` on their packed weights (fp32,
    no autograd). A weight changed in place since packing is packed again on its next call."""
    token = _packed.set(table)
    try:
        yield
    finally:
        _packed.reset(token)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x): pytorch_pretrained_bert's and HF's "gelu"."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): Google's and MegEngine's "gelu", HF's "gelu_new"."""
    return F.gelu(x, approximate="tanh")


# Activations oneDNN can apply inside the matmul: function -> (post-op, algorithm).
_FUSABLE: Dict[Callable, Tuple[str, str]] = {gelu: ("gelu", "none"), gelu_tanh: ("gelu", "tanh"), F.relu: ("relu", "")}


# The same activations, in place.
_IN_PLACE: Dict[Callable, Callable] = {gelu: torch.ops.aten.gelu_, F.relu: torch.relu_,
                                       gelu_tanh: lambda y: torch.ops.aten.gelu_(y, approximate="tanh")}


def choices() -> Dict[Key, str]:
    """What was decided so far: (dtype, in_features, out_features, epilogue, rows bucket, autograd, packed) -> kernel."""
    return dict(_choices)


def reset() -> None:
    """Forget the decisions (e.g. after changing the thread count)."""
    _choices.clear()


def linear(module: nn.Module, x: torch.Tensor, act: Optional[Callable] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(module(x)) + residual, on the kernel chosen for this machine."""
    if _plain(module, x, residual):
        rows = x.numel() // x.shape[-1]
        grad = _needs_grad(module, x, residual)
        packed = None if grad else _packed_weight(module)
        key = (x.dtype, module.in_features, module.out_features, _epilogue(act, residual), rows.bit_length(),
               grad, packed is not None)
        choice = _choices.get(key) or _decide_linear(key, module, x, act, residual, rows, packed)
        if choice == "onednn":
            return _onednn(module, x, act, residual)
        if choice == "packed":
            return _mkl_packed(module, x, act, residual, packed)
    y = module(x)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def linears(modules: Sequence[nn.Module], x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """`linear(m, x)` for each module (attention's query, key and value); one GEMM on their weights
    packed side by side when `using_packed` holds them as a group."""
    group = tuple(modules)
    table = _packed.get()
    if table is not None and group in table and len({m.bias is None for m in group}) == 1 and all(
            _plain(m, x, None) and not _needs_grad(m, x, None) for m in group):
        packed = _packed_weight(group)
    else:
        packed = None
    if packed is not None:
        rows = x.numel() // x.shape[-1]
        key = (x.dtype, x.shape[-1], packed.shape.shape[0], f"group/{len(group)}", rows.bit_length(), False, True)
        if (_choices.get(key) or _decide(key, rows, lambda: torch.cat([linear_reference(m, x) for m in group], -1),
                                         {"packed": lambda: _mkl_packed(group, x, None, None, packed)})) == "packed":
            return _mkl_packed(group, x, None, None, packed).split([m.out_features for m in group], -1)
    return tuple(linear(m, x) for m in group)


def _packed_weight(key: Union[nn.Module, Tuple[nn.Module, ...]]) -> Optional[PackedWeight]:
    """The packed fp32 weight of a module (or group) inside `using_packed`, packed again if a weight changed."""
    table = _packed.get()
    entry = None if table is None else table.get(key)
    if entry is None:
        return None
    weights = [m.weight for m in (key if isinstance(key, tuple) else (key,))]
    if any(w.dtype != torch.float32 for w in weights):
        return None
    if not entry.fits(weights):
        entry = table[key] = PackedWeight.of(*weights)
    return entry


def _plain(module: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """A standard nn.Linear, no hooks, plain CPU tensors, nothing recording a graph: oneDNN may run it."""
    return (_ONEDNN_OP is not None and type(module) is nn.Linear and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and module.weight.dtype == x.dtype and type(module.weight) is nn.Parameter
            and (residual is None or (type(residual) is torch.Tensor and residual.dtype == x.dtype))
            and not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                     or nn.modules.module._global_forward_pre_hooks)
            # (an ONNX export traces (is_tracing) or compiles (is_compiling))
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")
            and not torch._C._are_functorch_transforms_active())


def _epilogue(act: Optional[Callable], residual: Optional[torch.Tensor]) -> str:
    if act is not None:
        return _FUSABLE[act][0] + "/" + _FUSABLE[act][1] if act in _FUSABLE else "other"
    return "add" if residual is not None else "none"


def _needs_grad(module: nn.Linear, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (module.weight.requires_grad or x.requires_grad
                                        or (module.bias is not None and module.bias.requires_grad)
                                        or (residual is not None and residual.requires_grad))


def _decide_linear(key: Key, module, x, act, residual, rows: int, packed: Optional[PackedWeight]) -> str:
    """`_decide` for one linear: every kernel on detached copies, forward plus backward under autograd."""
    grad = key[5]
    # Detached copies: measuring must not touch the module's .grad, the caller's autograd graph,
    # or the global random stream (building an nn.Linear would draw its init from it).
    probe = SimpleNamespace(weight=module.weight.detach().clone().requires_grad_(grad),
                            bias=None if module.bias is None else module.bias.detach().clone().requires_grad_(grad))
    xs, rs = x.detach(), None if residual is None else residual.detach()

    def run(kernel):
        def call():
            with torch.set_grad_enabled(grad):
                y = kernel(probe, xs, act, rs)
                if grad:
                    y.backward(torch.ones_like(y))
            return y.detach()
        return call

    candidates = {} if _ONEDNN_OP is None else {"onednn": run(_onednn)}
    if packed is not None:
        candidates["packed"] = run(lambda m, xs, a, r: _mkl_packed(m, xs, a, r, packed))
    return _decide(key, rows, run(linear_reference), candidates)


def _decide(key: Key, rows: int, reference: Callable[[], torch.Tensor],
            candidates: Dict[str, Callable[[], torch.Tensor]]) -> str:
    """Run every candidate kernel once, keep those that agree with the reference (F.linear), time
    them and choose the fastest if it beats the reference by the MARGIN; or what BERT_PORT_LINEAR forces."""
    forced = os.environ.get("BERT_PORT_LINEAR", "auto").strip().lower()
    if forced not in ("auto", "torch", "onednn", "packed"):
        raise ValueError(f"BERT_PORT_LINEAR={forced!r}: use auto, torch, onednn or packed")
    if forced != "auto":
        candidates = {name: fn for name, fn in candidates.items() if name == forced}
    elif rows < MIN_ROWS:
        candidates = {}
    choice = "torch"
    if candidates:
        ref = reference()
        tol = 1e-4 if ref.dtype == torch.float32 else 3e-2
        agree = []
        for name, fn in candidates.items():
            try:
                y = fn()
            except RuntimeError:  # e.g. no bf16 primitive on an AVX2-only CPU
                continue
            if torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol * (1 + float(ref.abs().max()))):
                agree.append((name, fn))
        if forced != "auto":
            choice = agree[0][0] if agree else "torch"
        elif agree:
            choice = _fastest(agree, reference)
    _choices[key] = choice
    return choice


def linear_reference(module: nn.Module, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    """The standard computation: F.linear, then the activation, then the residual add."""
    y = F.linear(x, module.weight, module.bias)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def _fastest(candidates: List[Tuple[str, Callable[[], torch.Tensor]]], reference: Callable[[], torch.Tensor],
             repeats: int = 5) -> str:
    """The fastest candidate if it beats `reference` by the MARGIN, else "torch". Best of `repeats`
    calls each, interleaved so that a burst of load from elsewhere hits all alike."""
    fns = [reference] + [fn for _, fn in candidates]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    i = min(range(1, len(fns)), key=best.__getitem__)
    return candidates[i - 1][0] if best[i] < MARGIN * best[0] else "torch"


def _onednn(module: nn.Linear, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    w, b = module.weight, module.bias
    x2 = x.reshape(-1, x.shape[-1])
    if _needs_grad(module, x, residual):  # autograd: plain matmul forward and backward on oneDNN, epilogue in torch
        if x.dtype != torch.float32:
            return linear_reference(module, x, act, residual)
        y = _OneDnnLinear.apply(x2.contiguous(), w, b).view(*x.shape[:-1], -1)
        y = y if act is None else act(y)
        return y if residual is None else y + residual
    if residual is not None and act is None:  # the residual add fused into the matmul
        y = _ONEDNN_OP.binary(x2, residual.reshape(x2.shape[0], -1).contiguous(), w, b, "add")
        return y.view(*x.shape[:-1], -1)
    post_op, algorithm = _FUSABLE.get(act, ("none", "")) if act is not None else ("none", "")
    y = _ONEDNN_OP(x2, w, b, post_op, [], algorithm).view(*x.shape[:-1], -1)
    if act is not None and act not in _FUSABLE:
        y = act(y)
    return y if residual is None else y + residual


def _mkl_packed(modules, x: torch.Tensor, act, residual, packed: PackedWeight) -> torch.Tensor:
    """MKL's GEMM on the packed weight; `modules` is one linear (or a group, whose biases are concatenated)."""
    x2 = x.reshape(-1, x.shape[-1])
    bias = modules.bias if not isinstance(modules, tuple) else (
        None if modules[0].bias is None else torch.cat([m.bias for m in modules]))
    # the last argument is the row count the op checks against: every row count runs on the packed copy
    y = _MKL_LINEAR(x2, packed.data, packed.shape, bias, x2.shape[0]).view(*x.shape[:-1], -1)
    if act is not None:  # in place where the activation allows: no second (rows, out) buffer
        y = _IN_PLACE[act](y) if act in _IN_PLACE else act(y)
    return y if residual is None else y.add_(residual)


class _OneDnnLinear(torch.autograd.Function):
    """fp32 x @ W^T + b whose backward matmuls run on oneDNN too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_OP(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _ONEDNN_OP(grad, weight.t(), None, "none", [], "") if need_x else None  # grad @ W
        grad_w = _ONEDNN_OP(grad.t(), x.t(), None, "none", [], "") if need_w else None  # grad^T @ x
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def _find_onednn_op():
    """The oneDNN linear op of this torch build, or None (non-x86 builds, builds without mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_OP = _find_onednn_op()
_MKL_LINEAR = torch.ops.mkl._mkl_linear.default if can_pack() else None
