"""Opt-in compiled inference for batch-1 latency: `compile_for_inference(model)`.

Why: at batch 1 (1x32 .. 1x128 tokens) the GEMMs are small, and what is left around them (bias,
GELU, residual adds, LayerNorm, Python dispatch per op, the weight re-layout per call) costs as much
as ONNX Runtime's whole advantage. torch.compile with inductor's freezing fuses those element-wise
ops into a few C++ loops, prepacks the constant weights for oneDNN/MKL, and with the C++ wrapper
runs the graph without Python per op. Still fp32 arithmetic (max |diff| ~1e-6 from the eager model).

What it costs, said plainly:
- a warm-up: the first call for each input shape compiles (tens of seconds on 2 cores; inductor
  caches compiled graphs on disk, so later processes start faster). Graphs are static per shape
  (dynamic=False: weights prepacked for that row count); serve a few fixed shapes (pad to a few
  lengths), since past torch._dynamo's recompile limit (8 shapes) calls run eagerly;
- it needs a C++ compiler at run time (inductor's). If compiling fails, the wrapper warns once and
  runs the eager model from then on: same outputs, eager speed;
- inference only: calls run under torch.no_grad(); the weights are treated as constants, so
  change them (load_state_dict, training) only before the first call, or call `reset()`.

The model itself is not changed: its modules stay nn.Linear and its parameters stay in place.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

# Inductor options for this mode (per compile, so the process-wide inductor config is left alone).
OPTIONS = {"freezing": True, "cpp_wrapper": True}


class CompiledInference:
    """Calls `model(*args, **kwargs)` through torch.compile (freezing), compiled on first use per shape."""

    def __init__(self, model: nn.Module, compile_fn: Optional[Callable[..., Callable]] = None) -> None:
        self.model = model.eval()
        self._compile = compile_fn or torch.compile
        self._compiled: Optional[Callable] = None
        self.failed: Optional[str] = None  # why compiling failed, when it did

    def reset(self) -> None:
        """Forget the compiled graphs (e.g. after changing the weights)."""
        self._compiled, self.failed = None, None
        torch._dynamo.reset()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if self.failed is None:
                try:
                    if self._compiled is None:
                        self._compiled = self._compile(self.model, dynamic=False, options=OPTIONS)
                    return self._compiled(*args, **kwargs)
                except Exception as e:  # no C++ compiler, an unsupported op, ...: eager from now on
                    self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    warnings.warn(f"compile_for_inference: compiling failed ({self.failed}); running the eager "
                                  "model instead", RuntimeWarning, stacklevel=2)
            return self.model(*args, **kwargs)


def compile_for_inference(model: nn.Module) -> CompiledInference:
    """A callable with `model`'s forward signature that runs it compiled for inference (see the module docstring)."""
    return CompiledInference(model)
