"""BertConfig: pytorch_pretrained_bert's constructor, reading Google's, MegEngine's and HF's JSON files.

It lives in the torch-free bottom layer because a conversion needs it as much as a model does: the
config decides every tensor's shape (`mapping.canonical_shapes`). `bert_port.config` re-exports it.

Google's and MegEngine's `bert_config.json` hold 11 fields; HF's `config.json` adds `layer_norm_eps`,
`pad_token_id`, `model_type` and more. Every key found in a file is kept on the object (like the
reference), so nothing a user put there is lost on a save/load round trip.
"""
from __future__ import annotations

import copy
import json
import os
import math
from typing import Any, Dict, Union

from converters.atomic import atomic_write_text
from converters.errors import file_error
from converters.files import MAX_VOCAB_LINES, load_json

# hidden_act names and the function each computes. Google's TF BERT and MegEngine's BERT both call
# the tanh approximation "gelu"; pytorch_pretrained_bert and HF call the exact erf form "gelu" and
# the tanh form "gelu_new" (HF also "gelu_pytorch_tanh"). Every other table of activation names
# (bert_port.model.ACT2FN, the converters' --gelu) is derived from this one.
ACTIVATIONS = {
    "gelu": "gelu_erf",
    "gelu_new": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
}

# The converters' `--gelu` choice -> the hidden_act written for a source config that says "gelu"
# (which, in Google's and MegEngine's code, is the tanh approximation).
GELU_NAMES = {"tanh": "gelu_new", "erf": "gelu"}


# Upper bounds (SECURITY.md "Limits"): far above every published BERT (BERT-large: V 30522, H 1024,
# L 24, I 4096; mBERT V 119547; Megatron-BERT 3.9B: H 2560, L 48), far below what makes a config
# file cost minutes and gigabytes (num_hidden_layers 20000). The parameter cap bounds the product.
LIMITS = {
    "vocab_size": MAX_VOCAB_LINES,
    "hidden_size": 1 << 14,
    "num_hidden_layers": 256,
    "num_attention_heads": 1 << 10,
    "intermediate_size": 1 << 17,
    "max_position_embeddings": 1 << 17,
    "type_vocab_size": 1 << 12,
}
MAX_PARAMETERS = 1 << 32  # 16 GiB of float32 weights
MAX_CONFIG_BYTES = 1 << 20
MAX_NESTING = 16  # depth of any value in a config (HF's id2label is 2); deeper crashed deepcopy/repr later
MAX_LABELS = 1 << 12  # id2label/label2id entries (= the token-type limit: far above any classifier)

# Real-valued fields: (lowest, highest) allowed, both inclusive; NaN and infinities never pass.
RANGES = {
    "hidden_dropout_prob": (0.0, 1.0),
    "attention_probs_dropout_prob": (0.0, 1.0),
    "initializer_range": (0.0, 1e3),
    "layer_norm_eps": (0.0, 1.0),
}


def shown(value: Any) -> str:
    """A config value for an error message: short, and safe for any type (a 10**5000 int's str()
    raises, a 10000-deep list's repr() recurses)."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text[:100] + ("..." if len(text) > 100 else "")


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether `value` nests at most `limit` lists/dicts deep (iterative: no recursion to exhaust)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth >= limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _optional_problem(name: str, value: Any) -> "str | None":
    """The problem with an optional, known field (None if fine); unknown fields only nest-check."""
    if name in ("pad_token_id", "num_labels") and value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < LIMITS["vocab_size"]):
        return f"must be an int in [0, {LIMITS['vocab_size']})"
    if name in ("model_type", "position_embedding_type") and not isinstance(value, str):
        return "must be a string"
    if name == "position_embedding_type" and value != "absolute":
        return "must be \"absolute\" (bert_port implements absolute position embeddings only)"
    if name == "architectures" and (not isinstance(value, list) or not all(isinstance(a, str) for a in value)):
        return "must be a list of strings"
    if name in ("id2label", "label2id"):
        want = str if name == "id2label" else int
        if (not isinstance(value, dict) or len(value) > MAX_LABELS
                or not all(isinstance(v, want) and not isinstance(v, bool) for v in value.values())):
            return f"must be an object of at most {MAX_LABELS} entries with {want.__name__} values"
    if not _depth_ok(value, MAX_NESTING):
        return f"nests deeper than {MAX_NESTING} levels"
    return None


def label_maps(n: int, names: "tuple[str, ...] | None" = None) -> "tuple[dict, dict]":
    """(id2label, label2id) for `n` classes as HF writes them; unnamed classes are `LABEL_i`."""
    names = tuple(names) if names is not None else tuple(f"LABEL_{i}" for i in range(n))
    return {str(i): name for i, name in enumerate(names)}, {name: i for i, name in enumerate(names)}


def parameter_count(c: "BertConfig") -> int:
    """Parameters of BertModel (embeddings, encoder, pooler) for this config; no heads."""
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * H + 2 * H
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H
    return embeddings + L * layer + H * H + H


class BertConfig:
    """Hyper-parameters of a BERT model (pytorch_pretrained_bert signature)."""

    # Opt-in faster training (bert_port.model): padding skipped, attention dropout drawn inside SDPA, so
    # dropout's random numbers (and outputs at padded positions) differ from the reference's. Not written
    # to files unless set: `BertConfig(..., fast_dropout=True)` or "fast_dropout": true in a config file.
    fast_dropout: bool = False

    def __init__(
        self,
        vocab_size_or_config_json_file: Union[int, str, os.PathLike] = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        if isinstance(vocab_size_or_config_json_file, (str, os.PathLike)):
            loaded = BertConfig.from_json_file(vocab_size_or_config_json_file)
            self.__dict__.update(loaded.__dict__)
            return
        if not isinstance(vocab_size_or_config_json_file, int):
            raise ValueError(
                "vocab_size_or_config_json_file must be an int (vocab size) or a path to a JSON config, "
                f"got {type(vocab_size_or_config_json_file).__name__}"
            )
        self.vocab_size = vocab_size_or_config_json_file
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.__dict__.update(kwargs)
        self.validate()

    def validate(self) -> None:
        """Fail early, naming the field, instead of deep inside torch: every field's type, range
        and nesting depth (SECURITY.md, "Limits")."""
        for name in LIMITS:
            value = getattr(self, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {shown(value)}")
            if value > LIMITS[name]:
                raise ValueError(f"BertConfig.{name} = {shown(value)} is above the limit of {LIMITS[name]} "
                                 "(see SECURITY.md)")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name, None)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high):
                raise ValueError(f"BertConfig.{name} must be a number in [{low:g}, {high:g}], got {shown(value)}")
        for name, value in self.__dict__.items():
            problem = None if name in LIMITS or name in RANGES or name == "hidden_act" else _optional_problem(name, value)
            if problem:
                raise ValueError(f"BertConfig.{name} {problem}, got {shown(value)}")
        self._validate_model()

    def _validate_model(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        params = parameter_count(self)
        if params > MAX_PARAMETERS:
            raise ValueError(f"BertConfig describes a model of {params:,} parameters, above the limit of "
                             f"{MAX_PARAMETERS:,} (see SECURITY.md)")
        if not isinstance(self.fast_dropout, bool):
            raise ValueError(f"BertConfig.fast_dropout must be true or false, got {shown(self.fast_dropout)}")
        if not callable(self.hidden_act) and (not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS):
            raise ValueError(
                f"BertConfig.hidden_act {shown(self.hidden_act)} is not supported; use one of {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, json_object: Dict[str, Any]) -> "BertConfig":
        """Build a config from a dict; unknown keys are kept as attributes."""
        data = dict(json_object)
        vocab_size = data.pop("vocab_size", None)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise ValueError(f"config field 'vocab_size' must be a positive int, got {shown(vocab_size)}")
        bad = [k for k in data if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"config field name {shown(bad[0])} is not an identifier")
        return cls(vocab_size, **data)

    @classmethod
    def from_json_file(cls, json_file: Union[str, os.PathLike]) -> "BertConfig":
        try:  # a regular file of at most 1 MiB: a FIFO or /dev/zero is refused, not read forever
            data = load_json(json_file, MAX_CONFIG_BYTES, "config")
        except (OSError, UnicodeDecodeError) as e:
            raise file_error(json_file, e, "read config") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid JSON ({e})") from e
        except ValueError as e:  # nesting beyond the recursion limit, an integer of > 4300 digits
            text = str(e).splitlines()[0][:200] if str(e) else "unreadable JSON"
            raise ValueError(text if text.startswith(os.fspath(json_file)) else f"{json_file}: {text}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{json_file}: a config must be a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{json_file}: {e}") from e

    def to_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        atomic_write_text(json_file_path, self.to_json_string())

    def to_hf_dict(self, architectures: list | None = None) -> Dict[str, Any]:
        """The dict written as `config.json`: ours plus the keys HF `transformers` needs to load it."""
        data = self.to_dict()
        data.setdefault("model_type", "bert")
        data.setdefault("layer_norm_eps", 1e-12)
        data.setdefault("pad_token_id", 0)
        data.setdefault("position_embedding_type", "absolute")
        if data.get("hidden_act") == "gelu_tanh":  # our alias; HF knows the same function as gelu_new
            data["hidden_act"] = "gelu_new"
        if architectures:
            data["architectures"] = list(architectures)
        return data

    def __repr__(self) -> str:
        return f"BertConfig {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BertConfig) and self.__dict__ == other.__dict__
