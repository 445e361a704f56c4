"""Which attention computation a forward runs: chosen once per forward, passed to every layer as one value.

Shapes: B = batch, S = (padded) sequence length, T = real tokens in the batch, A = heads, D = head size.

The paths (`choose_path` decides from explicit inputs; tests/test_attention_plan.py takes each one):

  path              runs                                                   when
  "reference"       q k^T / sqrt(D) + additive mask, softmax, nn.Dropout,  (B, S) input while dropout draws
                    @ v: pytorch_pretrained_bert's ops                     ppb's random stream
  "sdpa"            one fused SDPA, no mask                                (B, S) input, mask None or all 1
  "sdpa_masked"     one fused SDPA with the reference's additive mask      (B, S) input with padding or a
                    (B, 1, 1, S): ppb's values at every position           soft mask; always while a graph
                                                                           is recorded (mask values unread)
  "unpadded_loop"   (T, H) rows of real tokens; one SDPA per sequence      jagged input, skip_padding=True,
  "unpadded_launch" (T, H) rows scattered to (B, S), one masked SDPA       or fast_dropout in training; loop
                                                                           on CPU, one launch elsewhere

Only the unpadded paths change what a (B, S) caller reads (padded rows come back as 0), so a padded
input reaches them only through an explicit opt-in: `skip_padding=True` or `BertConfig(fast_dropout=True)`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Devices where unpadded attention loops over the sequences; elsewhere it is one masked launch.
PER_SEQUENCE_DEVICES = ("cpu",)

PATHS = ("reference", "sdpa", "sdpa_masked", "unpadded_loop", "unpadded_launch")
# The additive mask value of the reference, Google's and MegEngine's BERT: (1 - mask) * -10000.
MASK_ADDER = -10000.0


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class TokenLayout:
    """Where the rows of a (T, ·) matrix of real tokens live in a (B, S) grid.

    `index`: the flat positions b*S + s of the real tokens, sequence by sequence; `lengths`: real
    tokens per sequence; `offsets` (B + 1): where each sequence's rows start in the (T, ·) matrix.
    """

    batch: int
    seq_len: int
    index: torch.Tensor
    lengths: List[int]
    offsets: torch.Tensor

    @classmethod
    def from_mask(cls, real: torch.Tensor) -> "TokenLayout":
        """The real tokens of a (B, S) boolean mask (anywhere in a row, in order)."""
        B, S = real.shape
        counts = real.sum(1)
        offsets = F.pad(counts.cumsum(0), (1, 0))
        return cls(B, S, real.reshape(-1).nonzero().squeeze(1), counts.tolist(), offsets)

    @classmethod
    def from_offsets(cls, offsets: torch.Tensor) -> "TokenLayout":
        """Sequences of a jagged tensor, rows [offsets[b], offsets[b+1]), placed at 0.. of a (B, max length) grid."""
        lengths = offsets.diff()
        counts = lengths.tolist()
        B, S = len(counts), max(counts, default=0)
        seq = torch.repeat_interleave(torch.arange(B, device=offsets.device), lengths)
        return cls(B, S, seq * S + positions(offsets, lengths), counts, offsets)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, S, C), zeros at padding."""
        out = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy_(0, self.index, x)
        return out.view(self.batch, self.seq_len, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (T, C)."""
        return x.reshape(self.batch * self.seq_len, x.shape[-1]).index_select(0, self.index)


def jagged(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(T, C) rows + (B + 1) offsets -> a jagged (B, j, C) nested tensor that shares `offsets` (and its j)."""
    logger = logging.getLogger("torch.fx._symbolic_trace")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch warns, once, about is_fx_tracing's semantics from inside this call
    try:
        return torch.nested.nested_tensor_from_jagged(values, offsets)
    finally:
        logger.setLevel(level)


def positions(offsets: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(T,) position of each row within its sequence: 0, 1, .. restarting at every offset."""
    lengths = offsets.diff() if lengths is None else lengths
    T = int(offsets[-1])
    return torch.arange(T, device=offsets.device) - torch.repeat_interleave(offsets[:-1], lengths)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class AttentionPlan:
    """How every layer of one forward attends (see the module docstring).

    `mask`: the additive (B, 1, 1, S) mask of "reference" / "sdpa_masked" (None: nothing masked);
    `layout`: the unpadded paths' rows; `repad`: the input was (B, S) and its padding was skipped,
    so the encoder gathers the real rows first and pads its outputs back with zeros.
    """

    path: str
    mask: Optional[torch.Tensor] = None
    layout: Optional[TokenLayout] = None
    repad: bool = False

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"unknown attention path {self.path!r}; one of {PATHS}")
        if self.path.startswith("unpadded") and self.layout is None:
            raise ValueError(f"attention path {self.path!r} needs a TokenLayout")

    @property
    def unpadded(self) -> bool:
        return self.layout is not None


def dropout_active(module: nn.Module) -> bool:
    """Will any dropout inside `module` draw random numbers in this forward?

    Walks `_modules` directly: `module.modules()` builds a name for every submodule, which cost more
    than the rest of the forward's Python at batch 1."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m is not None:  # (a registered None submodule)
            if m.training and isinstance(m, nn.Dropout) and m.p > 0:
                return True
            stack.extend(m._modules.values())
    return False


def as_plan(attention_mask, module: nn.Module) -> AttentionPlan:
    """An AttentionPlan as is; the reference's additive (B, 1, 1, S) mask or None, as ppb code passes it
    to `BertEncoder` or a layer (`module`) directly, gets the reference's computation ("reference"
    while a dropout inside `module` draws, else the same values through SDPA)."""
    if isinstance(attention_mask, AttentionPlan):
        return attention_mask
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be an AttentionPlan, an additive mask tensor or None, "
                        f"got {type(attention_mask).__name__}")
    path = "reference" if dropout_active(module) else ("sdpa" if attention_mask is None else "sdpa_masked")
    return AttentionPlan(path, mask=attention_mask)


def choose_path(input_kind: str, mask_kind: str, dropout: str, device_type: str) -> str:
    """The attention path for one forward.

    input_kind: "jagged" | "padded" | "skip_padding" (padded, with the opt-in to skip it);
    mask_kind: "none" | "ones" | "binary" (0/1 with padding) | "soft" (other values) | "unread" (recording a graph);
    dropout: "off" | "exact" (ppb's random stream) | "fast" (BertConfig.fast_dropout in training);
    device_type: the tensors' device type.
    """
    unpadded = "unpadded_loop" if device_type in PER_SEQUENCE_DEVICES else "unpadded_launch"
    if input_kind == "jagged":
        return unpadded  # nothing but real tokens exists; dropout (if any) is drawn inside SDPA
    if dropout == "exact":
        return "reference"
    if mask_kind in ("none", "ones"):
        return "sdpa"
    if mask_kind == "binary" and (input_kind == "skip_padding" or dropout == "fast"):
        return unpadded
    return "sdpa_masked"


def mask_kind(attention_mask: Optional[torch.Tensor], recording: bool) -> str:
    """Classify a (B, S) attention mask for `choose_path` (reading its values unless a graph is recorded)."""
    if attention_mask is None:
        return "none"
    if recording:  # reading the values would bake this example's padding into the graph
        return "unread"
    ones = attention_mask == 1
    if bool(ones.all()):
        return "ones"
    return "binary" if bool((ones | (attention_mask == 0)).all()) else "soft"


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) -> the reference's (B, 1, 1, S) additive mask, (1 - mask) * -10000."""
    B, S = attention_mask.shape
    return ((1.0 - attention_mask.to(dtype)) * MASK_ADDER).view(B, 1, 1, S)


def attend_unpadded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, dropout_p: float = 0.0
                    ) -> torch.Tensor:
    """q, k, v (A, T, D) of real tokens -> context (T, A*D), each sequence attending within itself.

    "unpadded_loop" (CPU): one unmasked attention per sequence: sum(L^2) scores instead of B*S^2,
    no padded copy (3x faster than masked attention at lengths 16-128 of 128). "unpadded_launch":
    scatter into (B, A, S, D) and mask the padded keys, so a GPU does not run B small kernels per layer.
    """
    layout = plan.layout
    A, T, D = q.shape
    if plan.path == "unpadded_loop":
        starts = layout.offsets.tolist()
        parts = [F.scaled_dot_product_attention(*(t[None, :, start:start + n] for t in (q, k, v)),
                                                dropout_p=dropout_p)[0].transpose(0, 1)  # 4-D: the fused CPU kernel
                 for start, n in zip(starts, layout.lengths) if n]
        ctx = torch.cat(parts) if parts else q.new_zeros(0, A, D)  # (T, A, D): one copy, straight into place
        return ctx.view(T, A * D)
    B, S = layout.batch, layout.seq_len
    padded = [layout.pad(t.transpose(0, 1).reshape(T, A * D)).view(B, S, A, D).transpose(1, 2) for t in (q, k, v)]
    keep = torch.zeros(B * S, dtype=torch.bool, device=q.device).index_fill_(0, layout.index, True)
    ctx = F.scaled_dot_product_attention(*padded, attn_mask=keep.view(B, 1, 1, S), dropout_p=dropout_p)  # (B, A, S, D)
    return layout.unpad(ctx.transpose(1, 2).reshape(B, S, A * D))
