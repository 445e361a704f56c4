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

So nothing is assumed: the first call of each (dtype, in, out, epilogue, rows bucket) runs both
kernels, checks that they agree and keeps oneDNN only if it is measurably faster (5 %). Set
`BERT_PORT_LINEAR=torch` (or `onednn`) to force a choice; `choices()` shows what was decided.
Tracing, scripting, ONNX export, torch.compile / torch.export and tensor subclasses always get
"torch", the kernel every exporter knows.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

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

Key = Tuple[torch.dtype, int, int, str, int, bool]
_choices: Dict[Key, str] = {}


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x * Phi(x): pytorch_pretrained_bert's and HF's "gelu"."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): Google's and MegEngine's "gelu", HF's "gelu_new"."""
    return F.gelu(x, approximate="tanh")


# Activations oneDNN can apply inside the matmul: function -> (post-op, algorithm).
_FUSABLE: Dict[Callable, Tuple[str, str]] = {gelu: ("gelu", "none"), gelu_tanh: ("gelu", "tanh"), F.relu: ("relu", "")}


def choices() -> Dict[Key, str]:
    """What was decided so far: (dtype, in_features, out_features, epilogue, rows bucket, autograd) -> kernel."""
    return dict(_choices)


def reset() -> None:
    """Forget the decisions (e.g. after changing the thread count)."""
    _choices.clear()


def linear(module: nn.Module, x: torch.Tensor, act: Optional[Callable] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(module(x)) + residual, on the kernel chosen for this machine."""
    if _plain(module, x, residual):
        rows = x.numel() // x.shape[-1]
        key = (x.dtype, module.in_features, module.out_features, _epilogue(act, residual), rows.bit_length(),
               _needs_grad(module, x, residual))
        choice = _choices.get(key) or _decide(key, module, x, act, residual, rows)
        if choice == "onednn":
            return _onednn(module, x, act, residual)
    y = module(x)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def _plain(module: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """A standard nn.Linear, no hooks, plain CPU tensors, nothing recording a graph: oneDNN may run it."""
    return (_ONEDNN_OP is not None and type(module) is nn.Linear and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and module.weight.dtype == x.dtype and type(module.weight) is nn.Parameter
            and (residual is None or (type(residual) is torch.Tensor and residual.dtype == x.dtype))
            and not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                     or nn.modules.module._global_forward_pre_hooks)
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export() and not torch.is_autocast_enabled("cpu")
            and not torch._C._are_functorch_transforms_active())


def _epilogue(act: Optional[Callable], residual: Optional[torch.Tensor]) -> str:
    if act is not None:
        return _FUSABLE[act][0] + "/" + _FUSABLE[act][1] if act in _FUSABLE else "other"
    return "add" if residual is not None else "none"


def _needs_grad(module: nn.Linear, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (module.weight.requires_grad or x.requires_grad
                                        or (module.bias is not None and module.bias.requires_grad)
                                        or (residual is not None and residual.requires_grad))


def _decide(key: Key, module, x, act, residual, rows: int) -> str:
    """Run both kernels once, check they agree, time them (forward, plus backward under autograd)."""
    forced = os.environ.get("BERT_PORT_LINEAR", "auto").strip().lower()
    if forced not in ("auto", "torch", "onednn"):
        raise ValueError(f"BERT_PORT_LINEAR={forced!r}: use auto, torch or onednn")
    choice = "torch"
    if forced == "onednn" or (forced == "auto" and rows >= MIN_ROWS):
        grad = key[-1]
        # Detached copies: measuring must not touch the module's .grad, the caller's autograd graph,
        # or the global random stream (building an nn.Linear would draw its init from it).
        probe = SimpleNamespace(weight=module.weight.detach().clone().requires_grad_(grad),
                                bias=None if module.bias is None else module.bias.detach().clone().requires_grad_(grad))
        xs, rs = x.detach(), None if residual is None else residual.detach()

        def run(kernel):
            with torch.set_grad_enabled(grad):
                y = kernel(probe, xs, act, rs)
                if grad:
                    y.backward(torch.ones_like(y))
            return y.detach()

        try:
            fast = run(_onednn)
        except RuntimeError:  # e.g. no bf16 primitive on an AVX2-only CPU
            fast = None
        ref = run(linear_reference)
        tol = 1e-4 if x.dtype == torch.float32 else 3e-2
        if fast is not None and torch.allclose(fast.float(), ref.float(), rtol=tol,
                                               atol=tol * (1 + float(ref.abs().max()))):
            if forced == "onednn" or _faster(lambda: run(_onednn), lambda: run(linear_reference)):
                choice = "onednn"
    _choices[key] = choice
    return choice


def linear_reference(module: nn.Module, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    """The standard computation: F.linear, then the activation, then the residual add."""
    y = F.linear(x, module.weight, module.bias)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def _faster(candidate: Callable[[], torch.Tensor], reference: Callable[[], torch.Tensor], repeats: int = 5) -> bool:
    """Is `candidate` faster than `reference` by the MARGIN? Best of `repeats` calls each,
    interleaved so that a burst of load from elsewhere hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((candidate, reference)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0] < MARGIN * best[1]


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
