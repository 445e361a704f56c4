"""BERT encoder (Devlin et al. 2018) with pytorch_pretrained_bert 0.6.2's module tree, parameters and init.

Shapes: B = batch, S = sequence length, H = hidden size, A = attention heads, D = H / A,
I = intermediate size, T = number of real (non-padding) tokens in the batch.

Module names, parameter names and order, construction order (hence the random stream under a
seed), dropout calls and train/eval behaviour are the reference's. Two things happen behind them:
- At inference (and whenever no dropout is active), padding is not computed: the encoder gathers
  the T real tokens into a (T, H) matrix, runs every linear layer and LayerNorm on those only, and
  each sequence attends within its own rows. Encoded layers are therefore 0 at padded positions.
  While dropout is active the encoder runs the reference's padded (B, S, H) computation, so that
  dropout draws the same random numbers as pytorch_pretrained_bert. `BertConfig(fast_dropout=True)`
  opts out of that: padding is skipped in training too and attention dropout is drawn inside SDPA
  (same distribution, other masks; 1.6x faster training steps on a padded batch in bench_train.py).
- Linear layers go through `bert_port.kernels.linear`, which picks the faster kernel measured on
  this machine and fuses the activation or residual add at inference. The modules stay nn.Linear.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bert_port import kernels
from bert_port.config import ACTIVATIONS, BertConfig
from bert_port.kernels import gelu, gelu_tanh
from bert_port.pretrained import BertPreTrainedModel

# The additive mask value of the reference, Google's and MegEngine's BERT: (1 - mask) * -10000.
MASK_ADDER = -10000.0
# Devices where unpadded attention loops over the sequences; elsewhere it is one masked launch.
PER_SEQUENCE_DEVICES = ("cpu",)


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


@dataclass
class TokenLayout:
    """Where the rows of a (T, ·) matrix of real tokens live in the (B, S) batch.

    Passed to the encoder layers in place of the additive mask when padding is skipped.
    `index`: the flat positions b*S + s of the real tokens; `lengths`: real tokens per sequence.
    """

    batch: int
    seq_len: int
    index: torch.Tensor
    lengths: List[int]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, S, C), zeros at padding."""
        out = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy_(0, self.index, x)
        return out.view(self.batch, self.seq_len, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (T, C)."""
        return x.reshape(self.batch * self.seq_len, x.shape[-1]).index_select(0, self.index)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = BertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S) ids -> (B, S, H)."""
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:seq_len]  # positions 0..S-1: a slice, no gather
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
        self.fast_dropout = bool(getattr(config, "fast_dropout", False))

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L, H) -> (..., A, L, D)."""
        x = x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size)
        return x.transpose(-3, -2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Union[torch.Tensor, TokenLayout, None]
                ) -> torch.Tensor:
        """(B, S, H) with an additive mask (B, 1, 1, S) or None; or (T, H) with a TokenLayout."""
        q, k, v = (self.transpose_for_scores(kernels.linear(m, hidden_states))
                   for m in (self.query, self.key, self.value))
        p = self.dropout.p if self.training else 0.0
        if isinstance(attention_mask, TokenLayout):
            return _attend_unpadded(q, k, v, attention_mask, p)  # (T, H)
        if p > 0 and not self.fast_dropout:  # the reference's ops: dropout draws as in ppb
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
            if attention_mask is not None:
                scores = scores + attention_mask
            ctx = self.dropout(scores.softmax(dim=-1)) @ v
        else:
            mask = None if attention_mask is None else attention_mask.to(q.dtype)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return ctx.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)  # (B, S, H)


def _attend_unpadded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, dropout_p: float = 0.0
                     ) -> torch.Tensor:
    """q, k, v (A, T, D) of real tokens -> context (T, A*D), each sequence attending within itself.

    On CPU, one unmasked attention per sequence: sum(L^2) scores instead of B*S^2, no padded copy
    (3x faster than masked attention at lengths 16-128 of 128). Elsewhere one launch: scatter into
    (B, A, S, D) and mask the padded keys, so a GPU does not run B small kernels per layer.
    """
    A, T, D = q.shape
    if q.device.type in PER_SEQUENCE_DEVICES:
        parts = [F.scaled_dot_product_attention(*(t[None, :, start:start + n] for t in (q, k, v)),
                                                dropout_p=dropout_p)[0]  # 4-D: the fused CPU kernel
                 for start, n in zip(_starts(layout.lengths), layout.lengths) if n]
        ctx = torch.cat(parts, dim=1) if parts else q.new_zeros(A, 0, D)
        return ctx.transpose(0, 1).reshape(T, A * D)
    B, S = layout.batch, layout.seq_len
    padded = [layout.pad(t.transpose(0, 1).reshape(T, A * D)).view(B, S, A, D).transpose(1, 2) for t in (q, k, v)]
    keep = torch.zeros(B * S, dtype=torch.bool, device=q.device).index_fill_(0, layout.index, True)
    ctx = F.scaled_dot_product_attention(*padded, attn_mask=keep.view(B, 1, 1, S), dropout_p=dropout_p)  # (B, A, S, D)
    return layout.unpad(ctx.transpose(1, 2).reshape(B, S, A * D))


def _starts(lengths: List[int]) -> List[int]:
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    return starts


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
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        layer = BertLayer(config)  # one layer deep-copied, as the reference: the same random stream
        self.layer = nn.ModuleList([copy.deepcopy(layer) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask, output_all_encoded_layers: bool = True
                ) -> List[torch.Tensor]:
        """(B, S, H) -> list of (B, S, H); `attention_mask` is the additive (B, 1, 1, S) mask, None or a TokenLayout."""
        unpadded = isinstance(attention_mask, TokenLayout)
        h = attention_mask.unpad(hidden_states) if unpadded else hidden_states
        encoded = []
        for i, layer in enumerate(self.layer):
            h = layer(h, attention_mask)
            if output_all_encoded_layers or i == len(self.layer) - 1:
                encoded.append(attention_mask.pad(h) if unpadded else h)
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
        skip_padding: bool = True,
    ) -> Tuple[Union[List[torch.Tensor], torch.Tensor], torch.Tensor]:
        """input_ids, token_type_ids, attention_mask: (B, S).

        Returns a list of L tensors (B, S, H) (or the last one alone when
        `output_all_encoded_layers=False`) and the pooled output (B, H). When padding is skipped
        (see the module docstring) positions where the mask is 0 come back as 0;
        `skip_padding=False` always computes them as the reference does.
        """
        self.check_inputs(input_ids, token_type_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids)  # (B, S, H)
        mask = self.encoder_mask(attention_mask, x, skip_padding)
        encoded = self.encoder(x, mask, output_all_encoded_layers)
        pooled = self.pooler(encoded[-1])
        return (encoded if output_all_encoded_layers else encoded[-1]), pooled

    def encoder_mask(self, attention_mask: Optional[torch.Tensor], x: torch.Tensor, skip_padding: bool = True
                     ) -> Union[torch.Tensor, TokenLayout, None]:
        """What the encoder layers get: None (nothing to mask), a TokenLayout (padding skipped) or
        the reference's additive mask (B, 1, 1, S)."""
        if attention_mask is None:
            return None
        B, S = attention_mask.shape
        additive = lambda: ((1.0 - attention_mask.to(x.dtype)) * MASK_ADDER).view(B, 1, 1, S)  # noqa: E731
        if _recording():  # reading the mask's values would bake this batch's padding into the graph
            return additive()
        real = attention_mask != 0
        if bool(real.all()):
            return None
        if not skip_padding or self._dropout_active() or not bool((attention_mask[real] == 1).all()):
            return additive()  # the reference's computation (non-0/1 masks are soft masks: as the reference)
        return TokenLayout(B, S, real.view(-1).nonzero().squeeze(1), real.sum(1).tolist())

    def _dropout_active(self) -> bool:
        """True when dropout must draw as the reference does (see the module docstring)."""
        return (self.training and not getattr(self.config, "fast_dropout", False)
                and any(m.p > 0 for m in self.modules() if isinstance(m, nn.Dropout)))

    def check_inputs(self, input_ids, token_type_ids, attention_mask) -> None:
        """Clear ValueErrors for what would otherwise be an index error deep inside torch."""
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if _recording():  # shapes and values are the graph's inputs now, not this example's
            return
        for name, t in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}; they must match"
                )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({c.max_position_embeddings})"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        _check_range("input_ids", input_ids, c.vocab_size, "vocab_size")
        if token_type_ids is not None:
            _check_range("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size")


def _recording() -> bool:
    """True while a tracer, exporter or compiler records the model as a graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


def _check_range(name: str, t: torch.Tensor, limit: int, field: str) -> None:
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) ({field} in the config)")
