"""BERT encoder (Devlin et al. 2018) with the pytorch_pretrained_bert module tree and key names.

Shapes: B = batch, S = sequence length, H = hidden size, A = attention heads, D = H / A,
I = intermediate size, T = number of real (non-padding) tokens in the batch.

Three things differ from a textbook implementation, all invisible in the outputs at real tokens:
- Padding is not computed. When the attention mask has zeros, the encoder gathers the T real
  tokens into a (T, H) matrix, runs every linear layer and LayerNorm on those only, and lets each
  sequence attend within its own rows. Encoded layers are therefore 0 at padded positions (the
  reference returns values there that no correct use of BERT reads).
- Query, key and value are one (3H, H) projection. The state dict still says
  `attention.self.{query,key,value}.{weight,bias}`: hooks split on save and fuse on load.
- On x86 CPUs the linear layers run on oneDNN, with the activation or residual add fused in at
  inference (see `Linear`).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from bert_port.config import ACTIVATIONS, BertConfig
from bert_port.pretrained import BertPreTrainedModel

# The additive mask value of Google's and MegEngine's BERT: (1 - mask) * -10000.
MASK_ADDER = -10000.0


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): Google's and MegEngine's "gelu"."""
    return F.gelu(x, approximate="tanh")


_ACT_FNS = {"gelu_erf": F.gelu, "gelu_tanh": gelu_tanh, "relu": F.relu, "silu": F.silu}


def activation(name: str):
    """The function a config's `hidden_act` names (see ACTIVATIONS for the spellings)."""
    return _ACT_FNS[ACTIVATIONS[name]]


# CPU linears run on oneDNN on x86 (see `Linear`); set False to get plain F.linear everywhere.
ONEDNN_LINEAR = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() \
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# Below this many rows, MKL's gemv-like kernels win (oneDNN re-lays out the weight on every call).
ONEDNN_MIN_ROWS = 32

# Activations oneDNN applies inside the matmul: _ACT_FNS name -> (post-op, algorithm).
_FUSED_ACTS = {"gelu_erf": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def _onednn_linear(x, weight, bias=None, act=None):
    """act(x @ weight.T + bias) for 2-D x (strided views allowed): the op inductor emits for CPU linears."""
    post_op, algorithm = _FUSED_ACTS[act] if act else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)


class _OneDnnLinearFn(torch.autograd.Function):
    """fp32 linear whose backward matmuls run on oneDNN too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t()) if need_x else None  # grad @ W
        grad_w = _onednn_linear(grad.t(), x.t()) if need_w else None  # grad.T @ x
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear (same parameters, keys and init) computing act(x W^T + b) + residual, on oneDNN on CPU.

    Why: PyTorch's x86 wheels send fp32 `addmm` to MKL sgemm, which on the AMD EPYC we benchmark on
    runs at half the speed of oneDNN's kernels, forward and backward (bench/README.md). Without
    autograd the activation or the residual add is fused into the matmul (one pass less over the
    output, fp32 and bf16). Autocast, fp16, other devices and torch.compile (dynamo cannot trace
    the oneDNN op with fake tensors; inductor then picks its own kernels) keep F.linear.
    """

    def forward(self, x: torch.Tensor, act: Optional[str] = None, residual: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """act: a name in _ACT_FNS or None; residual: added after the activation."""
        w, b = self.weight, self.bias
        x2 = x.reshape(-1, x.shape[-1])
        onednn = (ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == w.dtype
                  and x.dtype in (torch.float32, torch.bfloat16) and x2.shape[0] >= ONEDNN_MIN_ROWS
                  and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b, residual))
        if onednn and not grad and (act is None or act in _FUSED_ACTS):
            if residual is not None and act is None:
                y = torch.ops.mkldnn._linear_pointwise.binary(
                    x2, residual.reshape(x2.shape[0], -1).contiguous(), w, b, "add")
                return y.view(*x.shape[:-1], -1)
            y, act = _onednn_linear(x2, w, b, act), None
        elif onednn and x.dtype == torch.float32:
            y = _OneDnnLinearFn.apply(x2.contiguous(), w, b)  # a strided x (pooler) is slow in grad_w
        else:
            y = F.linear(x2, w, b)
        y = y.view(*x.shape[:-1], -1)
        y = y if act is None else _ACT_FNS[act](y)
        return y if residual is None else y + residual


@dataclass
class TokenLayout:
    """Where the rows of a (T, ·) token matrix live in the (B, S) batch.

    `index` is None when every position is computed (T == B*S); otherwise it lists the flat
    positions b*S + s of the real tokens, and `lengths` the number of real tokens of each sequence.
    `attn_bias` is the additive key mask (B, 1, 1, S) when padding is computed, else None.
    """

    batch: int
    seq_len: int
    index: Optional[torch.Tensor]
    lengths: Optional[List[int]]
    attn_bias: Optional[torch.Tensor]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, C) -> (B, S, C), zeros at padding."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.seq_len, x.shape[-1]).index_copy_(0, self.index, x)
        return x.view(self.batch, self.seq_len, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, C) -> (T, C)."""
        x = x.reshape(self.batch * self.seq_len, x.shape[-1])
        return x if self.index is None else x.index_select(0, self.index)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        pad = getattr(config, "pad_token_id", 0)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, S, H)
        x = x + self.position_embeddings.weight[:seq_len]  # positions 0..S-1: a slice, no gather
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV matmul; keys stay query/key/value."""

    _PARTS = ("query", "key", "value")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """(T, H) -> (T, H)."""
        qkv = self.qkv(x)  # (T, 3H)
        p = self.dropout_p if self.training else 0.0
        if layout.lengths is not None:
            # Padding skipped: each sequence attends within its own rows, unmasked. Same result as
            # the -10000 mask (exp underflows to exactly 0) at a fraction of the cost: no padded
            # copy of Q, K, V and sum(L^2) instead of B*S^2 scores (3x faster at 16-128 of 128).
            parts = [self._attend(part[None], None, p) for part in qkv.split(layout.lengths) if len(part)]
            return torch.cat(parts) if parts else qkv.new_zeros(0, x.shape[-1])
        bias = None if layout.attn_bias is None else layout.attn_bias.to(qkv.dtype)
        return self._attend(qkv.view(layout.batch, layout.seq_len, -1), bias, p)

    def _attend(self, qkv: torch.Tensor, bias: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        """(N, L, 3H) -> (N*L, H)."""
        N, L = qkv.shape[:2]
        q, k, v = qkv.view(N, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, A, L, D)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return ctx.transpose(1, 2).reshape(N * L, -1)


def _split_qkv(module: BertSelfAttention, state_dict: dict, prefix: str, local_metadata) -> None:
    for kind in ("weight", "bias"):
        fused = state_dict.pop(prefix + "qkv." + kind)
        for part, tensor in zip(BertSelfAttention._PARTS, fused.chunk(3, dim=0)):
            state_dict[f"{prefix}{part}.{kind}"] = tensor


def _fuse_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for kind in ("weight", "bias"):
        names = [f"{prefix}{part}.{kind}" for part in BertSelfAttention._PARTS]
        if all(n in state_dict for n in names):
            parts = [state_dict.pop(n) for n in names]
            stacked = _stacked_base(parts)
            state_dict[prefix + "qkv." + kind] = torch.cat(parts, dim=0) if stacked is None else stacked


def _stacked_base(parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor whose consecutive row blocks `parts` are, if any: bert_port.io reads Q, K and V
    that way so that fusing them needs no copy (and no second copy in memory)."""
    base = parts[0]._base
    if base is None or not base.is_contiguous() or base.shape[0] != sum(p.shape[0] for p in parts):
        return None
    offset = base.storage_offset()
    for p in parts:
        if p._base is not base or not p.is_contiguous() or p.storage_offset() != offset:
            return None
        offset += p.numel()
    return base


class BertDenseResidual(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (`attention.output` and `output`)."""

    def __init__(self, config: BertConfig, in_features: int) -> None:
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.LayerNorm(self.dropout(self.dense(x)) + residual)
        return self.LayerNorm(self.dense(x, residual=residual))  # dropout is the identity: add fused


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseResidual(config, config.hidden_size)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.output(self.self(x, layout), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.act_name = ACTIVATIONS[config.hidden_act]  # a name, so that Linear can fuse it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x, act=self.act_name)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseResidual(config, config.intermediate_size)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        x = self.attention(x, layout)  # (T, H)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, layout: TokenLayout, output_all_encoded_layers: bool = True
                ) -> List[torch.Tensor]:
        h = layout.unpad(x)  # (T, H)
        encoded = []
        for i, layer in enumerate(self.layer):
            h = layer(h, layout)
            if output_all_encoded_layers or i == len(self.layer) - 1:
                encoded.append(layout.pad(h))  # (B, S, H)
        return encoded


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))  # (B, H) from the [CLS] token


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
        `output_all_encoded_layers=False`) and the pooled output (B, H). Positions where the mask
        is 0 are not computed and come back as 0; `skip_padding=False` computes them as the
        reference does (padded queries attending to the real keys), for the rare loss that reads them.
        """
        self.check_inputs(input_ids, token_type_ids, attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        layout = self.token_layout(attention_mask, x, skip_padding)
        encoded = self.encoder(x, layout, output_all_encoded_layers)
        pooled = self.pooler(encoded[-1])
        return (encoded if output_all_encoded_layers else encoded[-1]), pooled

    @staticmethod
    def token_layout(attention_mask: Optional[torch.Tensor], x: torch.Tensor, skip_padding: bool = True
                     ) -> TokenLayout:
        """Additive key mask and the real-token index; no masking work at all without padding."""
        B, S = x.shape[:2]
        if attention_mask is None:
            return TokenLayout(B, S, None, None, None)
        if torch.compiler.is_compiling():  # reading the mask's values (and T) would break the graph
            return _masked_layout(attention_mask, x)
        real = attention_mask != 0
        if bool(real.all()):
            return TokenLayout(B, S, None, None, None)
        if not skip_padding or not bool((attention_mask[real] == 1).all()):  # non-0/1 masks: as the reference
            return _masked_layout(attention_mask, x)
        return TokenLayout(B, S, real.view(-1).nonzero().squeeze(1), real.sum(1).tolist(), None)

    def check_inputs(self, input_ids, token_type_ids, attention_mask) -> None:
        """Clear ValueErrors for what would otherwise be an index error deep inside torch."""
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"({c.max_position_embeddings})"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
        _check_range("input_ids", input_ids, c.vocab_size, "vocab_size")
        for name, t in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(input_ids.shape)}; they must match"
                )
        if token_type_ids is not None:
            _check_range("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size")


def _masked_layout(attention_mask: torch.Tensor, x: torch.Tensor) -> TokenLayout:
    """Every position computed, padded keys masked with the reference's additive -10000."""
    B, S = x.shape[:2]
    return TokenLayout(B, S, None, None, ((1.0 - attention_mask.to(x.dtype)) * MASK_ADDER).view(B, 1, 1, S))


def _check_range(name: str, t: torch.Tensor, limit: int, field: str) -> None:
    if torch.compiler.is_compiling():  # reading values would break the graph; embedding lookups still fail
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} contains {bad}, outside [0, {limit}) ({field} in the config)")
