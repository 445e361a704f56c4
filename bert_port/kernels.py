"""Which kernel runs an `nn.Linear` (and its activation / residual epilogue), decided on this machine.

The model calls `linear(module, x, act, residual)` instead of `module(x)`. The module stays a plain
`nn.Linear` with its parameters: quantisation, pruning, LoRA wrappers and module walkers see what
they expect, and anything that is not a plain, hook-free `nn.Linear` (its forward not replaced) on
a plain CPU tensor is simply called (`module(x)`), so a swapped-in module always runs its own forward.
(Its activation and residual add then run out of place, except for a class registered with
`returns_new_tensor`, such as quantize.QuantizedLinear, whose outputs nobody else holds.)

For plain modules there are two kernels:
- "torch":  `F.linear` then the epilogue (MKL sgemm for fp32 on x86 wheels);
- "onednn": `torch.ops.mkldnn._linear_pointwise`, with GELU/ReLU or the residual add fused into
  the matmul at inference. On some x86 CPUs oneDNN's fp32 GEMMs run twice as fast as MKL's; on
  others they are equal, and oneDNN bf16 needs AVX-512 (elsewhere it cannot build a primitive).

- "packed": a GEMM on a weight packed once ahead of time, fp32 inference only, and only inside
  `using_packed(...)` (`bert_port.inference.prepack` sets it up): the packed copy costs as much
  memory as the weight, so nobody pays for it without asking. At batch 1 the per-call re-layout of
  the weight is as costly as the matmul itself; packed once, 1x32 runs ~20 % faster on BERT-base.
  Two packings exist, and which one runs a weight shape is measured too (`packing_for`): MKL's
  packed sgemm (`cblas_sgemm_pack`; 7 % faster than oneDNN's on an AMX Xeon) and oneDNN's reordered
  weight (2x faster than MKL's on an AMD Zen 4, where MKL's packed GEMM is slower than F.linear).
  The same table can hold a whole BertLayer's straight-line forward (`packed_forward`,
  `inference.PackedLayer`).

So nothing is assumed: the first call of each (dtype, in, out, epilogue, rows bucket, autograd,
packed) runs every candidate kernel, checks that they agree and times them on weights that are not
in the caches (as in a forward); another kernel than the default (F.linear; the packed one where
`prepack` packed the weight) is kept only if it is measurably faster (5 % in fp32; in bf16 a tie
goes to the fused oneDNN call, see MARGIN). Set `BERT_PORT_LINEAR=torch`
(or `onednn`, `packed`) to force a choice, `BERT_PORT_PACKING=mkl` (or `onednn`) to force a packing;
`choices()` shows what was decided.
Tracing, scripting, ONNX export, torch.compile / torch.export and tensor subclasses always get
"torch", the kernel every exporter knows.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, Iterable, Iterator, List, MutableMapping, Optional, Sequence, Tuple, Union

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
# A candidate is chosen if its time is below this factor times F.linear's. fp32: it must be 5 % faster,
# a tie goes to the standard kernel. bf16: F.linear itself runs oneDNN's matmul there (on every CPU
# where oneDNN builds a bf16 primitive at all), through an entry that cannot fuse the activation or the
# residual add, so a tie (within 5 %) goes to the fused oneDNN call. In BERT-base bf16 8x128 on AMX,
# oneDNN for every linear ran 1.055-1.08x HF bf16 and F.linear for every linear 0.99-1.00x, while
# single-GEMM timings differ by less than their noise (with 0.95 the choice flipped from run to run).
MARGIN = {torch.float32: 0.95, torch.bfloat16: 1.05}
# Weight copies a kernel measurement cycles through, so that each timed call reads cold weights (_decide_linear).
COLD_BYTES = 32 * 2**20

Key = Tuple[torch.dtype, int, int, str, int, bool, str]
_choices: Dict[Key, str] = {}
# The packing's row count: MKL lays the weight out for GEMMs of about this many rows, and the packed
# copy then serves any row count (checked against F.linear on the first call of each key). Packing for
# 128 rows measured fastest from 1x32 to 8x128 rows; packing for 16 is ~20 % slower at >= 32 rows.
# (oneDNN takes it as a hint; its layout for fp32 was the same for 1, 32 and 128 rows.)
PACK_ROWS = 128
# (in_features, out_features, threads) -> the packing chosen for weights of that shape (packing_for)
_packings: Dict[Tuple[int, int, int], str] = {}


@dataclass(frozen=True)
class PackedWeight:
    """The weight of one nn.Linear, or of several with the same input side by side (one GEMM), packed
    by MKL or reordered by oneDNN (`kind`); with their bias (side by side too) and the tensors it was
    built from."""

    kind: str  # "mkl" or "onednn"
    data: torch.Tensor
    bias: Optional[torch.Tensor]
    shape: torch.Tensor  # (out, in) without storage: the op reads the original weight's shape only
    splits: Tuple[int, ...]  # out_features of each linear
    sources: Tuple[Tuple[torch.Tensor, int, int], ...]  # stamps(...) of every weight and bias

    @classmethod
    def of(cls, *modules: nn.Linear, kind: Optional[str] = None) -> "PackedWeight":
        """Pack the modules' weights with `kind`, or with the packing measured fastest here for their shape."""
        if len({m.bias is None for m in modules}) != 1:
            raise ValueError("linears packed as one GEMM need a bias on every one of them or on none")
        w = torch.cat([m.weight.detach() for m in modules]) if len(modules) > 1 else modules[0].weight.detach()
        biases = [m.bias.detach() for m in modules if m.bias is not None]
        bias = (torch.cat(biases) if len(biases) > 1 else biases[0]) if biases else None
        kind = kind or packing_for(w)
        return cls(kind, _pack(w, kind), bias, torch.zeros((), dtype=w.dtype).expand(w.shape),
                   tuple(m.out_features for m in modules), stamps(t for m in modules for t in (m.weight, m.bias)))

    def fits(self, modules: Sequence[nn.Module]) -> bool:
        """Built from these modules' weights and biases as they are now (`unchanged`; reads `_parameters`
        directly: this runs on every call)."""
        return unchanged(self.sources, (m._parameters.get(name) for m in modules for name in ("weight", "bias")))


def stamps(tensors: Iterable[Optional[torch.Tensor]]) -> Tuple[Tuple[torch.Tensor, int, int], ...]:
    """(tensor, version(tensor), data_ptr) of each tensor that is not None: what `unchanged` compares with."""
    return tuple((t, version(t), t.data_ptr()) for t in tensors if t is not None)


def unchanged(taken: Tuple[Tuple[torch.Tensor, int, int], ...], tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Are `tensors` (None skipped) the ones `taken` (their `stamps`) was made of, none of them changed in
    place (`_version`) nor given new storage (`.data = ...`, `.to(...)`)? What is made from weights and kept
    beside their module (a packed copy) is made again when this is False. A write through `.data` cannot be
    seen: pack again after one."""
    taken_iter = iter(taken)
    for t in tensors:
        if t is not None:
            s, version, ptr = next(taken_iter, (None, 0, 0))
            if t is not s or (version >= 0 and t._version != version) or t.data_ptr() != ptr:
                return False
    return next(taken_iter, None) is None


def version(t: torch.Tensor) -> int:
    """t's version counter (bumped by every in-place change), or -1 for a tensor made under
    torch.inference_mode, which has none (its in-place changes cannot be seen)."""
    return -1 if t.is_inference() else t._version


# nn.Linear -> its packed weight; a tuple of nn.Linear with the same input -> their weights packed as one
PackedTable = MutableMapping[Union[nn.Module, Tuple[nn.Module, ...]], PackedWeight]
_packed: contextvars.ContextVar[Optional[PackedTable]] = contextvars.ContextVar("bert_port_packed", default=None)


def packings() -> Tuple[str, ...]:
    """The weight packings this torch build has: "mkl" (MKL's packed sgemm: x86 builds with MKL) and
    "onednn" (oneDNN's reordered weight: builds with oneDNN)."""
    mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    onednn = _ONEDNN_OP is not None and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    return ("mkl",) * mkl + ("onednn",) * onednn


def can_pack() -> bool:
    """Can this torch build pack weights at all?"""
    return bool(packings())


def _pack(w: torch.Tensor, kind: str) -> torch.Tensor:
    # The packed buffer must stay where MKL or oneDNN wrote it, so it is never copied or saved.
    if kind == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, PACK_ROWS)
    return torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)


def packing_for(w: torch.Tensor) -> str:
    """The packing for fp32 weights of w's shape on this machine, measured on the first weight of each
    shape (and thread count): one GEMM at 32 and one at 128 rows per packing, on copies of w cycled so
    that each call reads cold weights; MKL's is kept unless oneDNN's is 5 % faster.
    `BERT_PORT_PACKING=mkl|onednn` forces one (where this build has it)."""
    kinds = packings()
    forced = os.environ.get("BERT_PORT_PACKING", "auto").strip().lower()
    if forced not in ("auto", "mkl", "onednn"):
        raise ValueError(f"BERT_PORT_PACKING={forced!r}: use auto, mkl or onednn")
    if forced in kinds or len(kinds) == 1:
        return forced if forced in kinds else kinds[0]
    key = (w.shape[1], w.shape[0], torch.get_num_threads())
    if key not in _packings:
        copies = _cold_copies(w)
        xs = [torch.ones(rows, w.shape[1]) for rows in (32, 128)]
        turn = itertools.count()

        def gemms(kind):
            packed = [PackedWeight(kind, _pack(w, kind), None, torch.zeros(()).expand(w.shape), (w.shape[0],), ())
                      for _ in range(copies)]
            return kind, lambda: [run_packed(packed[next(turn) % copies], x, None, None) for x in xs]
        _packings[key] = _fastest([gemms(kind) for kind in kinds], "mkl", MARGIN[torch.float32])
    return _packings[key]


@contextlib.contextmanager
def using_packed(table: PackedTable) -> Iterator[None]:
    """Within this block, `linear` may run the modules in `table` on their packed weights (fp32,
    no autograd). A weight changed in place since packing is packed again on its next call."""
    token = _packed.set(table)
    try:
        yield
    finally:
        _packed.reset(token)


def packed_table() -> Optional[PackedTable]:
    """The table of the enclosing `using_packed` block, or None."""
    return _packed.get()


def packed_forward(module: nn.Module, *args) -> Optional[torch.Tensor]:
    """`module`'s forward as the `using_packed` table runs it (`inference.PackedLayer` for a BertLayer),
    or None: not packed, or not runnable packed now (then the module's own forward runs)."""
    table = _packed.get()
    run = None if table is None else table.get(module)
    return None if run is None else run(module, *args)


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
    """What was decided so far: (dtype, in_features, out_features, epilogue, rows bucket, autograd,
    packing: "mkl", "onednn" or "" where not packed) -> kernel."""
    return dict(_choices)


def reset() -> None:
    """Forget the decisions, kernels and packings (e.g. after changing the thread count)."""
    _choices.clear()
    _packings.clear()


def linear(module: nn.Module, x: torch.Tensor, act: Optional[Callable] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(module(x)) + residual, on the kernel chosen for this machine."""
    packed = _packed_for(module, (module,), x, residual)
    if packed is not None or _plain(module, x, residual):
        rows = x.numel() // x.shape[-1]
        grad = packed is None and _needs_grad(module, x, residual)
        key = (x.dtype, module.in_features, module.out_features, epilogue(act, residual), rows.bit_length(),
               grad, "" if packed is None else packed.kind)
        choice = _choices.get(key) or _decide_linear(key, module, x, act, residual, rows, packed)
        if choice == "packed":
            return run_packed(packed, x, act, residual)
        if choice == "onednn":
            return _onednn(module, x, act, residual)
        if not grad:
            return _torch_linear(module, x, act, residual)
    y = module(x)
    if _owned_output(module, y):
        return _epilogue_in_place(y, act, residual)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def returns_new_tensor(cls: type) -> type:
    """Class decorator: `cls.forward` returns a tensor nobody else holds (e.g. quantize.QuantizedLinear),
    so `linear` may apply the activation and residual add in place on it: at 8x128 each out-of-place
    epilogue is one more 3-12 MB buffer, and fresh buffers of that size cost page faults per call."""
    _NEW_TENSOR_FORWARDS[cls] = cls.forward
    return cls


def runs_as_group(cls: type) -> type:
    """Class decorator: `cls.forward_group(modules, x)` runs modules of `cls` that read the same input
    (attention's query, key and value) as one call and returns what each `module(x)` would, or None
    (then they run one by one). `linears` uses it only where calling the modules one by one would run
    nothing else: no hooks, forwards not replaced, no graph being recorded."""
    _GROUP_FORWARDS[cls] = cls.forward
    return cls


def _runs_as_group(group: Tuple[nn.Module, ...]) -> bool:
    cls = type(group[0])
    return (_GROUP_FORWARDS.get(cls) is cls.forward and not (_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1])
            and all(type(m) is cls and "forward" not in m.__dict__ and not m._forward_hooks
                    and not m._forward_pre_hooks for m in group)
            and not recording_or_transformed())


def _owned_output(module: nn.Module, y) -> bool:
    """Is y, returned by module(x), a new tensor nobody else can see: a registered class's own forward
    (not replaced on the instance or the class), no forward hook that could have kept it, no autograd."""
    cls = type(module)
    return (_NEW_TENSOR_FORWARDS.get(cls) is cls.forward and "forward" not in module.__dict__
            and type(y) is torch.Tensor and not module._forward_hooks and not _GLOBAL_HOOKS[0]
            and not (y.requires_grad and torch.is_grad_enabled()) and not recording_or_transformed())


def linears(modules: Sequence[nn.Module], x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """`linear(m, x)` for each module (attention's query, key and value); one GEMM on their weights
    side by side when `using_packed` holds them as a group, or their class `runs_as_group`."""
    group = tuple(modules)
    if _runs_as_group(group):
        outputs = type(group[0]).forward_group(group, x)
        if outputs is not None:
            return outputs
    packed = _packed_for(group, group, x, None)
    if packed is not None:
        rows = x.numel() // x.shape[-1]
        key = (x.dtype, x.shape[-1], packed.shape.shape[0], f"group/{len(group)}", rows.bit_length(), False, packed.kind)
        if (_choices.get(key) or _decide(key, rows, lambda: torch.cat([linear_reference(m, x) for m in group], -1),
                                         {"packed": lambda: run_packed(packed, x, None, None)})) == "packed":
            return run_packed(packed, x, None, None).split(packed.splits, -1)
    return tuple(linear(m, x) for m in group)


def _packed_for(key: Union[nn.Module, Tuple[nn.Module, ...]], modules: Tuple[nn.Module, ...], x: torch.Tensor,
                residual: Optional[torch.Tensor]) -> Optional[PackedWeight]:
    """The packed weight that runs `modules` on `x` now, or None: not inside `using_packed` or not in
    its table, not a plain fp32 CPU call without autograd, a hook or a replaced forward to run, or a
    graph being recorded.
    Packed again first if a weight or bias changed since packing.

    The conditions of `_plain` for this one case, written for speed: at batch 1 this runs ~50 times
    per forward between GEMMs that evict its code and data from the caches (BERT-base 1x32: 1.2 %
    faster than `_plain` + a table lookup + the group's biases concatenated per call, in one-process
    A/B runs). The input width is checked here because MKL's op does not check it."""
    table = _packed.get()
    entry = None if table is None else table.get(key)
    if (entry is None or type(x) is not torch.Tensor or x.dtype != torch.float32 or not x.is_cpu
            or x.shape[-1] != entry.shape.shape[1]
            or (residual is not None and (type(residual) is not torch.Tensor or residual.dtype != torch.float32))
            or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or nn.Linear.forward is not _LINEAR_FORWARD
            or recording_or_transformed()):
        return None
    for m in modules:
        if (type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
                or _needs_grad(m, x, residual)):
            return None
    return current(table, key, modules)


def current(table: PackedTable, key, modules: Tuple[nn.Module, ...]) -> Optional[PackedWeight]:
    """table[key], packed again first if a weight or bias changed since packing; None once one is not
    an fp32 CPU tensor (e.g. after `model.to(torch.bfloat16)` or `.to("cuda")`)."""
    entry = table[key]
    if not entry.fits(modules):
        if any(m.weight.dtype != torch.float32 or m.weight.device.type != "cpu" for m in modules):
            return None
        entry = table[key] = PackedWeight.of(*modules)
    return entry


def packed_chosen(entry: PackedWeight, epilogue: str, rows: int) -> bool:
    """Was the packed kernel chosen for this weight's GEMM (fp32, no autograd) with this epilogue
    (`epilogue(...)`; "group/N" for N linears packed as one) at this many rows?"""
    key = (torch.float32, entry.shape.shape[1], entry.shape.shape[0], epilogue, rows.bit_length(), False, entry.kind)
    return _choices.get(key) == "packed"


def global_hooks_or_recording() -> bool:
    """A global forward (pre-)hook, a graph being recorded or a transform active: only `module(x)` is right."""
    return bool(_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]) or recording_or_transformed()


def recording_or_transformed() -> bool:
    """A graph being recorded (tracing; an ONNX export traces or compiles), autocast, or a functorch
    transform: the cases where only `module(x)` does the right thing."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or torch._C._are_functorch_transforms_active())


def _plain(module: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """A standard nn.Linear (its forward not replaced, on the instance or the class), no hooks, plain
    CPU tensors, nothing recording a graph: oneDNN may run it."""
    return (_ONEDNN_OP is not None and type(module) is nn.Linear and type(x) is torch.Tensor
            and "forward" not in module.__dict__ and nn.Linear.forward is _LINEAR_FORWARD
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and module.weight.dtype == x.dtype and type(module.weight) is nn.Parameter
            and (residual is None or (type(residual) is torch.Tensor and residual.dtype == x.dtype))
            and not (module._forward_hooks or module._forward_pre_hooks or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1])
            and not torch.jit.is_scripting() and not recording_or_transformed())


def epilogue(act: Optional[Callable], residual: Optional[torch.Tensor]) -> str:
    if act is not None:
        return _FUSABLE[act][0] + "/" + _FUSABLE[act][1] if act in _FUSABLE else "other"
    return "add" if residual is not None else "none"


def _needs_grad(module: nn.Linear, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (module.weight.requires_grad or x.requires_grad
                                        or (module.bias is not None and module.bias.requires_grad)
                                        or (residual is not None and residual.requires_grad))


def _decide_linear(key: Key, module, x, act, residual, rows: int, packed: Optional[PackedWeight]) -> str:
    """`_decide` for one linear: every kernel on detached copies, forward plus backward under autograd.

    Each timed call reads weights that are not in the caches, as a forward does (it reads every
    layer's weights once): up to COLD_BYTES of copies, cycled. On warm weights the kernels can tie
    where in the model one is clearly faster: bf16 8x128 on AMX, oneDNN took 0.88-0.92x F.linear's
    time on cold weights and 0.98-1.01x on warm ones, and the model ran 1.07x faster with it."""
    grad = key[5]
    # Detached copies: measuring must not touch the module's .grad, the caller's autograd graph,
    # or the global random stream (building an nn.Linear would draw its init from it).
    w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
    copies = _cold_copies(w)
    probes = [SimpleNamespace(weight=w.clone().requires_grad_(grad), out_features=w.shape[0],
                              bias=None if b is None else b.clone().requires_grad_(grad)) for _ in range(copies)]
    turn = itertools.count()
    xs, rs = x.detach(), None if residual is None else residual.detach()

    def run(kernel):
        def call():
            probe = probes[next(turn) % copies]
            with torch.set_grad_enabled(grad):
                y = kernel(probe, xs, act, rs)
                if grad:
                    y.backward(torch.ones_like(y))
            return y.detach()
        return call

    candidates = {} if _ONEDNN_OP is None else {"onednn": run(_onednn)}
    if packed is not None:
        for probe in probes:
            probe.packed = PackedWeight.of(probe, kind=packed.kind)
        candidates["packed"] = run(lambda m, xs, a, r: run_packed(m.packed, xs, a, r))
    return _decide(key, rows, run(linear_reference if grad else _torch_linear), candidates)


def _cold_copies(w: torch.Tensor) -> int:
    """How many copies of w a kernel measurement cycles through: COLD_BYTES of them, 1 to 16."""
    return max(1, min(16, COLD_BYTES // (w.numel() * w.element_size() or 1)))


def _decide(key: Key, rows: int, reference: Callable[[], torch.Tensor],
            candidates: Dict[str, Callable[[], torch.Tensor]]) -> str:
    """Run every candidate kernel once, keep those that agree with the reference (F.linear), time them
    with it and keep the default unless another beats it by MARGIN; or what BERT_PORT_LINEAR forces.
    The default is F.linear, or the packed kernel where `prepack` packed the weight: the caller asked
    for it, and at batch 1 it is 15-25 % faster, so noise during the measurement must not send the
    process's GEMMs of this shape to F.linear (BERT-base 1x32: 47 ms instead of 39, seen once)."""
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
            # the default, which wins ties: the packed kernel where `prepack` asked for it, else F.linear
            default = "packed" if any(name == "packed" for name, _ in agree) else "torch"
            margin = MARGIN[torch.float32] if default == "packed" else MARGIN.get(key[0], MARGIN[torch.float32])
            choice = _fastest([("torch", reference)] + agree, default, margin)
    _choices[key] = choice
    return choice


def linear_reference(module: nn.Module, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    """The standard computation: F.linear, then the activation, then the residual add."""
    y = F.linear(x, module.weight, module.bias)
    y = y if act is None else act(y)
    return y if residual is None else y + residual


def _torch_linear(module: nn.Module, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    """`linear_reference` without autograd: the same values, the epilogue written into F.linear's
    fresh output instead of two more (rows, out) buffers."""
    return _epilogue_in_place(F.linear(x, module.weight, module.bias), act, residual)


def _epilogue_in_place(y: torch.Tensor, act, residual) -> torch.Tensor:
    """act(y) + residual, in y where the activation allows (y: a kernel's fresh output, no autograd);
    a residual that broadcasts y to a larger shape gets a new tensor, as `y + residual` would."""
    if act is not None:
        y = _IN_PLACE[act](y) if act in _IN_PLACE else act(y)
    if residual is None:
        return y
    return y.add_(residual) if residual.shape == y.shape else y + residual


def _fastest(timed: List[Tuple[str, Callable[[], torch.Tensor]]], default: str, margin: float,
             repeats: int = 5) -> str:
    """The fastest kernel of `timed` (name, fn) if its time is below `margin` times `default`'s, else
    `default`. Best of `repeats` calls each, interleaved so that a burst of load from elsewhere hits all alike."""
    best = {name: float("inf") for name, _ in timed}
    for _ in range(repeats):
        for name, fn in timed:
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    challenger = min((name for name in best if name != default), key=best.__getitem__)
    return challenger if best[challenger] < margin * best[default] else default


def _onednn(module: nn.Linear, x: torch.Tensor, act=None, residual=None) -> torch.Tensor:
    w, b = module.weight, module.bias
    x2 = x.reshape(-1, x.shape[-1])
    if _needs_grad(module, x, residual):  # autograd: plain matmul forward and backward on oneDNN, epilogue in torch
        if x.dtype != torch.float32:
            return linear_reference(module, x, act, residual)
        y = _OneDnnLinear.apply(x2.contiguous(), w, b).view(*x.shape[:-1], -1)
        y = y if act is None else act(y)
        return y if residual is None else y + residual
    return _onednn_inference(x, w, b, act, residual)


def _onednn_inference(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act, residual) -> torch.Tensor:
    """oneDNN's linear (w: the weight, or oneDNN's reordered copy), GELU/ReLU or the residual add fused into it."""
    x2 = x.reshape(-1, x.shape[-1])
    if act is None and residual is not None and residual.shape == (*x.shape[:-1], w.shape[0]):
        # the residual add fused into the matmul (one that broadcasts the output larger is added after it)
        y = _ONEDNN_OP.binary(x2, residual.reshape(x2.shape[0], -1).contiguous(), w, b, "add")
        return y.view(*x.shape[:-1], -1)
    post_op, algorithm = _FUSABLE.get(act, ("none", "")) if act is not None else ("none", "")
    y = _ONEDNN_OP(x2, w, b, post_op, [], algorithm).view(*x.shape[:-1], -1)
    return _epilogue_in_place(y, None if act in _FUSABLE else act, residual)


def run_packed(packed: PackedWeight, x: torch.Tensor, act, residual) -> torch.Tensor:
    """The GEMM on the packed weight (and its bias), with the activation and the residual add."""
    if packed.kind == "onednn":
        return _onednn_inference(x, packed.data, packed.bias, act, residual)
    # (..., in) -> (..., out): the op flattens the leading dimensions itself. Its last argument is the row
    # count it checks against: given the actual one, every row count runs on the packed copy.
    return _epilogue_in_place(_MKL_LINEAR(x, packed.data, packed.shape, packed.bias, x.numel() // x.shape[-1]),
                              act, residual)


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
# nn.Linear's own forward: a library that replaces it (on the class) means module(x) must run.
_LINEAR_FORWARD = nn.Linear.forward
# torch's registries of global forward (pre-)hooks, dicts changed in place: any entry means module(x) must run.
_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
_MKL_LINEAR = torch.ops.mkl._mkl_linear.default if "mkl" in packings() else None
_NEW_TENSOR_FORWARDS: Dict[type, Callable] = {}  # see returns_new_tensor
_GROUP_FORWARDS: Dict[type, Callable] = {}  # see runs_as_group
