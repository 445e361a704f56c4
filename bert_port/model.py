"""BERT encoder (Devlin et al. 2018) with pytorch_pretrained_bert 0.6.2's module tree, parameters and init.

Shapes: B = batch, S = sequence length, H = hidden size, A = attention heads, D = H / A,
I = intermediate size, T = number of real tokens in a jagged batch (sum of its lengths).

Module names, parameter names and order, construction order (hence the random stream under a
seed), dropout calls, train/eval behaviour and every output value are the reference's:
- (B, S) input: ppb's values at every position, padding included (padded rows attend to the real
  tokens as in the reference; code that reads or normalises those rows gets ppb's numbers). While
  dropout is active the reference's ops run (explicit dropout on the softmax), so dropout draws
  ppb's random numbers; otherwise the same values come from one fused SDPA with the same additive
  mask (B, 1, 1, S) (or none when nothing is padded).
- Speed without changing any number: give input that has no padding. Jagged input_ids
  (`torch.nested.nested_tensor(list_of_1d_ids, layout=torch.jagged)`) -> jagged (B, j, H) layers:
  the encoder works on the (T, H) rows of real tokens (+ offsets) and each sequence attends within
  its own rows, so the padding of a mixed-length batch is never computed (no (B, S) tensor exists).
- Opt-ins that change numbers a (B, S) caller reads: `skip_padding=True` (padding not computed, padded
  rows returned as 0) and `BertConfig(fast_dropout=True)` (training: padding skipped, attention
  dropout drawn inside SDPA: same distribution, other random numbers; 1.6x faster steps on a padded
  batch in bench_train.py).
Which attention computation runs is decided once per forward (`BertModel.attention_plan`, see
bert_port/attention.py) and passed to every layer as one AttentionPlan.

Linear layers go through `bert_port.kernels.linear`, which picks the faster kernel measured on this
machine and fuses the activation or residual add at inference. The modules stay nn.Linear.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bert_port import kernels
from bert_port.attention import (AttentionPlan, TokenLayout, additive_mask, as_plan, attend_unpadded, choose_path,
                                 dropout_active, jagged, mask_kind, positions)
from bert_port.config import ACTIVATIONS, BertConfig
from bert_port.kernels import gelu, gelu_tanh
from bert_port.pretrained import BertPreTrainedModel


def swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


_FUNCTIONS = {"gelu_erf": gelu, "gelu_tanh": gelu_tanh, "relu": F.relu, "silu": swish}
# hidden_act name -> function, for every spelling config.ACTIVATIONS accepts.
ACT2FN = {name: _FUNCTIONS[canonical] for name, canonical in ACTIVATIONS.items()}


def activation(hidden_act):
    """The function a config's `hidden_act` names; a callable is used as is (as the reference allows)."""
    return hidden_act if callable(hidden_act) else ACT2FN[hidden_act]


class BertLayerNorm(nn.LayerNorm):
    """The reference's name and signature (eps 1e-12 by default), as a standard nn.LayerNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-12) -> None:
        super().__init__(hidden_size, eps=eps)

    @property
    def variance_epsilon(self) -> float:
        return self.eps


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = BertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) ids -> (B, S, H) at positions 0..S-1; or any ids with their `position_ids` (e.g. (T,) -> (T, H))."""
        x = self.word_embeddings(input_ids)
        if position_ids is None:
            x = x + self.position_embeddings.weight[:input_ids.shape[1]]  # positions 0..S-1: a slice, no gather
        else:
            x = x + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of "
                             f"attention heads ({config.num_attention_heads})")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def projections(self) -> Tuple[nn.Linear, nn.Linear, nn.Linear]:
        """query, key, value: three linears of the same input (`bert_port.inference.prepack` runs them as one GEMM)."""
        return self.query, self.key, self.value

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L, H) -> (..., A, L, D)."""
        x = x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size)
        return x.transpose(-3, -2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: AttentionPlan) -> torch.Tensor:
        """(B, S, H) -> (B, S, H), or (T, H) -> (T, H) on the unpadded paths; `attention_mask` is the
        forward's AttentionPlan (the reference's additive (B, 1, 1, S) mask or None is accepted too)."""
        plan = as_plan(attention_mask, self)
        q, k, v = (self.transpose_for_scores(y) for y in kernels.linears(self.projections(), hidden_states))
        p = self.dropout.p if self.training else 0.0
        if plan.unpadded:
            return attend_unpadded(q, k, v, plan, p)  # (T, H)
        if plan.path == "reference":  # the reference's ops: dropout draws as in ppb
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
            if plan.mask is not None:
                scores = scores + plan.mask
            ctx = self.dropout(scores.softmax(dim=-1)) @ v
        else:  # "sdpa" / "sdpa_masked": the same values, one fused kernel
            mask = None if plan.mask is None else plan.mask.to(q.dtype)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return ctx.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)  # (B, S, H)


class _DenseAddNorm(nn.Module):
    """dense -> dropout -> + input -> LayerNorm: BertSelfOutput (H -> H) and BertOutput (I -> H)."""

    def __init__(self, config: BertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = BertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        return self.LayerNorm(kernels.linear(self.dense, hidden_states, residual=input_tensor))


class BertSelfOutput(_DenseAddNorm):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, config.hidden_size)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, input_tensor: torch.Tensor, attention_mask) -> torch.Tensor:
        return self.output(self.self(input_tensor, attention_mask), input_tensor)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return kernels.linear(self.dense, hidden_states, act=self.intermediate_act_fn)  # (.., I)


class BertOutput(_DenseAddNorm):
    """The feed-forward block's output: I -> H."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask) -> torch.Tensor:
        y = kernels.packed_forward(self, hidden_states, attention_mask)  # under inference.prepack: same values, faster
        if y is not None:
            return y
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        layer = BertLayer(config)  # one layer deep-copied, as the reference: the same random stream
        self.layer = nn.ModuleList([copy.deepcopy(layer) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask, output_all_encoded_layers: bool = True
                ) -> List[torch.Tensor]:
        """(B, S, H) -> list of (B, S, H), or (T, H) rows of a jagged batch -> list of (T, H).

        `attention_mask` is the forward's AttentionPlan; the reference's additive (B, 1, 1, S) mask
        or None (as ppb code passes them) get the reference's computation.
        """
        plan = as_plan(attention_mask, self)
        h = plan.layout.unpad(hidden_states) if plan.repad else hidden_states  # skip_padding: (T, H)
        encoded = []
        for i, layer in enumerate(self.layer):
            h = layer(h, plan)
            if output_all_encoded_layers or i == len(self.layer) - 1:
                encoded.append(plan.layout.pad(h) if plan.repad else h)
        return encoded


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(kernels.linear(self.dense, hidden_states[:, 0]))  # (B, H) from [CLS]


class BertModel(BertPreTrainedModel):
    """The encoder: `forward` returns `(encoded_layers, pooled_output)` like pytorch_pretrained_bert."""

    output_names = ("last_hidden_state", "pooled_output")
    seq_axis_outputs = ("last_hidden_state",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self.init_bert_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_all_encoded_layers: bool = True,
        *,
        skip_padding: bool = False,
    ) -> Tuple[Union[List[torch.Tensor], torch.Tensor], torch.Tensor]:
        """input_ids, token_type_ids, attention_mask: (B, S); or jagged input_ids (and token_type_ids).

        (B, S) input: returns a list of L tensors (B, S, H) (or the last one alone when
        `output_all_encoded_layers=False`) and the pooled output (B, H), pytorch_pretrained_bert's
        values at every position, padding included. `skip_padding=True` (opt-in) does not compute
        padded positions (0/1 masks): they come back as **0**, real tokens are unchanged. (While
        dropout draws ppb's random stream in training, the reference's computation runs regardless.)

        Jagged input (`torch.nested.nested_tensor(list_of_1d_ids, layout=torch.jagged)`, B sequences
        of any lengths, no attention_mask: the structure is the mask): the encoded layers are jagged
        (B, j, H) holding only the real tokens (`.unbind()` gives (L_i, H) each), pooled is (B, H).
        """
        layout = self.check_inputs(input_ids, token_type_ids, attention_mask)
        if layout is None:
            x = self.embeddings(input_ids, token_type_ids)  # (B, S, H)
        else:  # jagged: the T real tokens, positions restarting at 0 in each sequence
            types = None if token_type_ids is None else token_type_ids.values()
            x = self.embeddings(input_ids.values(), types, positions(layout.offsets))  # (T, H)
        plan = self.attention_plan(attention_mask, x, skip_padding, layout)
        encoded = self.encoder(x, plan, output_all_encoded_layers)
        if layout is None:
            pooled = self.pooler(encoded[-1])
        else:
            pooled = self.pooler(encoded[-1][layout.offsets[:-1]].unsqueeze(1))  # each sequence's first row
            encoded = [jagged(h, input_ids.offsets()) for h in encoded]
        return (encoded if output_all_encoded_layers else encoded[-1]), pooled

    def attention_plan(self, attention_mask: Optional[torch.Tensor], x: torch.Tensor, skip_padding: bool = False,
                       layout: Optional[TokenLayout] = None) -> AttentionPlan:
        """The one decision of this forward: which attention path every layer runs (bert_port.attention).

        Explicit inputs only: the input type (`layout` for jagged input), the mask's values (unread while
        a graph is recorded), the opt-in `skip_padding`, dropout (off / ppb's exact stream / the opt-in
        `BertConfig.fast_dropout`) and the device.
        """
        dropout = "off" if not dropout_active(self) else ("fast" if self.config.fast_dropout else "exact")
        if layout is not None:
            return AttentionPlan(choose_path("jagged", "none", dropout, x.device.type), layout=layout)
        kind = mask_kind(attention_mask, _recording())
        path = choose_path("skip_padding" if skip_padding else "padded", kind, dropout, x.device.type)
        if path.startswith("unpadded"):  # only for a 0/1 mask with padding, by opt-in
            return AttentionPlan(path, layout=TokenLayout.from_mask(attention_mask == 1), repad=True)
        masked = kind not in ("none", "ones")
        return AttentionPlan(path, mask=additive_mask(attention_mask, x.dtype) if masked else None)

    def check_inputs(self, input_ids, token_type_ids, attention_mask) -> Optional[TokenLayout]:
        """Clear ValueErrors for what would otherwise be an index error deep inside torch.

        Returns None for (B, S) input, the TokenLayout of the sequences for jagged input.
        """
        if getattr(input_ids, "is_nested", False):
            return self._check_jagged(input_ids, token_type_ids, attention_mask)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor or a jagged nested tensor, got {shape}")
        if _recording():  # shapes and values are the graph's inputs now, not this example's
            return None
        for name, t in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if t is not None and (t.is_nested or tuple(t.shape) != tuple(input_ids.shape)):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}; they must match"
                )
        self._check_ids(input_ids, token_type_ids, input_ids.shape[1])
        return None

    def _check_jagged(self, input_ids, token_type_ids, attention_mask) -> TokenLayout:
        if input_ids.layout != torch.jagged:
            raise ValueError(f"input_ids is a nested tensor with layout {input_ids.layout}; build it with "
                             "torch.nested.nested_tensor(list_of_1d_ids, layout=torch.jagged)")
        if input_ids.dim() != 2 or input_ids.lengths() is not None:
            raise ValueError(f"jagged input_ids must be B sequences of 1-D ids, shape (B, j) without holes; "
                             f"got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            raise ValueError("attention_mask cannot be given with jagged input_ids: the jagged structure is the mask "
                             "(every row of it is a real token)")
        offsets = input_ids.offsets()
        if token_type_ids is not None and not (
                getattr(token_type_ids, "layout", None) == torch.jagged and token_type_ids.dim() == 2
                and token_type_ids.lengths() is None and torch.equal(token_type_ids.offsets(), offsets)):
            raise ValueError("token_type_ids must be a jagged nested tensor with input_ids' sequence lengths")
        layout = TokenLayout.from_offsets(offsets)
        if 0 in layout.lengths:
            raise ValueError(f"input_ids sequence {layout.lengths.index(0)} is empty; every sequence needs a token")
        self._check_ids(input_ids.values(), None if token_type_ids is None else token_type_ids.values(),
                        max(layout.lengths, default=0))
        return layout

    def _check_ids(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor], seq_len: int) -> None:
        """Integer ids within the vocabularies, sequences within the positions (padded or jagged values)."""
        c = self.config
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if seq_len > c.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings ({c.max_position_embeddings})")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        _check_range("input_ids", input_ids, c.vocab_size, "vocab_size")
        if token_type_ids is not None:
            _check_range("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size")


def _recording() -> bool:
    """True while a tracer, exporter or compiler records the model as a graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _check_range(name: str, t: torch.Tensor, limit: int, field: str) -> None:
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) ({field} in the config)")
