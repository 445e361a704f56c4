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
from typing import Any, Dict, Union

from converters.atomic import atomic_write_text
from converters.errors import file_error
from converters.files import load_json

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
    "vocab_size": 1 << 20,
    "hidden_size": 1 << 14,
    "num_hidden_layers": 256,
    "num_attention_heads": 1 << 10,
    "intermediate_size": 1 << 17,
    "max_position_embeddings": 1 << 17,
    "type_vocab_size": 1 << 12,
}
MAX_PARAMETERS = 1 << 32  # 16 GiB of float32 weights
MAX_CONFIG_BYTES = 1 << 20


def parameter_count(c: "BertConfig") -> int:
    """Parameters of BertModel (embeddings, encoder, pooler) for this config; no heads."""
    H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * H + 2 * H
    layer = 4 * H * H + 4 * H + 2 * H * I + I + H + 4 * H
    return embeddings + L * layer + H * H + H


class BertConfig:
    """Hyper-parameters of a BERT model (pytorch_pretrained_bert signature)."""

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
        """Fail early, naming the field, instead of deep inside torch."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r:.100}")
            if value > LIMITS[name]:
                raise ValueError(f"BertConfig.{name} = {value} is above the limit of {LIMITS[name]} "
                                 "(see SECURITY.md)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        params = parameter_count(self)
        if params > MAX_PARAMETERS:
            raise ValueError(f"BertConfig describes a model of {params:,} parameters, above the limit of "
                             f"{MAX_PARAMETERS:,} (see SECURITY.md)")
        if not callable(self.hidden_act) and (not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS):
            raise ValueError(
                f"BertConfig.hidden_act {self.hidden_act!r:.100} is not supported; use one of {sorted(ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, json_object: Dict[str, Any]) -> "BertConfig":
        """Build a config from a dict; unknown keys are kept as attributes."""
        data = dict(json_object)
        vocab_size = data.pop("vocab_size", None)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise ValueError(f"config field 'vocab_size' must be a positive int, got {vocab_size!r:.100}")
        return cls(vocab_size, **data)

    @classmethod
    def from_json_file(cls, json_file: Union[str, os.PathLike]) -> "BertConfig":
        try:  # a regular file of at most 1 MiB: a FIFO or /dev/zero is refused, not read forever
            data = load_json(json_file, MAX_CONFIG_BYTES, "config")
        except (OSError, UnicodeDecodeError) as e:
            raise file_error(json_file, e, "read config") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_file}: not valid JSON ({e})") from e
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
