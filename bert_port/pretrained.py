"""BertPreTrainedModel: weight init, `from_pretrained` and `save_pretrained`.

Loading builds the model on the meta device (no random init of weights about to be overwritten),
then assigns the checkpoint's tensors. Only parameters the checkpoint lacks (a new task head) are
allocated and initialised, and that is logged, as in pytorch_pretrained_bert.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from bert_port.config import BertConfig
from bert_port.io import atomic_write_text, load_weights, save_safetensors

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("config.json", "bert_config.json")  # HF layout first, then pytorch_pretrained_bert's
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")

# Keys that alias another tensor and are never stored: the MLM decoder is the word embedding matrix
# (HF also exposes the MLM bias as decoder.bias).
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class BertPreTrainedModel(nn.Module):
    """Base class of BertModel and the task heads."""

    hf_architecture: Optional[str] = None  # the transformers class whose keys ours match

    def __init__(self, config: BertConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise ValueError(
                f"{type(self).__name__}(config): config must be a BertConfig, got {type(config).__name__}; "
                f"to load weights use {type(self).__name__}.from_pretrained(name_or_directory)"
            )
        self.config = config

    def init_bert_weights(self, module: nn.Module) -> None:
        """pytorch_pretrained_bert's init: N(0, initializer_range) weights, zero biases, unit LayerNorm."""
        for name, param in module.named_parameters(recurse=False):
            _init_parameter(module, name, param, self.config.initializer_range)

    def tie_weights(self) -> None:
        """Re-point tied parameters after loading replaced them (heads with an MLM decoder override)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *inputs: Any,
        state_dict: Optional[Dict[str, torch.Tensor]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        **kwargs: Any,
    ) -> "BertPreTrainedModel":
        """Load a directory (pytorch_pretrained_bert or HF layout) or a pretrained name.

        Extra arguments (e.g. `num_labels`) go to the class constructor. The model is returned in
        eval mode, as HF does; call `.train()` to fine-tune.
        """
        directory = resolve_model_dir(pretrained_model_name_or_path, cache_dir)
        config = BertConfig.from_json_file(_find_file(directory, CONFIG_NAMES, "config"))
        if state_dict is None:
            state_dict = load_weights(_find_file(directory, WEIGHTS_NAMES, "weights"))
        else:  # loading assigns tensors; the caller's must not become the model's parameters
            state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
        with torch.device("meta"), _SkipInit():
            model = cls(config, *inputs, **kwargs)
        model.load_pretrained_state_dict(state_dict, source=str(directory))
        return model.eval()

    def load_pretrained_state_dict(self, state_dict: Dict[str, torch.Tensor], source: str = "state_dict") -> None:
        """Assign checkpoint tensors by canonical name (no copy: the model takes them over);
        initialise what the checkpoint lacks."""
        expected = {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in TIED_KEYS}
        incoming = normalize_keys(state_dict, expected)
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in incoming.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        ]
        if mismatched:
            raise ValueError(f"{source}: shapes do not match the config: " + "; ".join(mismatched))
        missing = sorted(set(expected) - set(incoming))
        unexpected = sorted(set(incoming) - set(expected))
        dtype = next(iter(expected.values())).dtype
        usable = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in incoming.items() if k in expected}
        self.load_state_dict(usable, strict=False, assign=True)
        self._materialize_missing()
        self.tie_weights()
        if missing:
            logger.info("Weights of %s newly initialised (not in %s): %s", type(self).__name__, source, missing)
        if unexpected:
            logger.info("Weights from %s not used by %s: %s", source, type(self).__name__, unexpected)
        self.missing_keys, self.unexpected_keys = missing, unexpected

    def _materialize_missing(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    new = nn.Parameter(torch.empty(param.shape, dtype=param.dtype), param.requires_grad)
                    setattr(module, name, new)
                    _init_parameter(module, name, new, std)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write `config.json` + `model.safetensors`, loadable by bert_port and HF transformers."""
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise ValueError(f"{save_directory}: exists and is not a directory")
        save_directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v for k, v in self.state_dict().items() if k not in TIED_KEYS}
        save_safetensors(weights, save_directory / "model.safetensors")
        config = self.config.to_hf_dict([self.hf_architecture] if self.hf_architecture else None)
        num_labels = getattr(self, "num_labels", None)
        if num_labels is not None:
            id2label = config.get("id2label")
            if not isinstance(id2label, dict) or len(id2label) != num_labels:
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        atomic_write_text(save_directory / "config.json", BertConfig.from_dict(config).to_json_string())


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip `torch.nn.init` calls (the modules' reset_parameters) while building a skeleton.

    On the meta device they compute nothing, but they route through torch._refs, whose first use
    imports torch._dynamo: 1.5 s of a 2 s `from_pretrained`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _init_parameter(module: nn.Module, name: str, param: torch.Tensor, std: float) -> None:
    if param.is_meta:  # from_pretrained's skeleton (see _SkipInit)
        return
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm):
            param.fill_(1.0 if name == "weight" else 0.0)
        elif name == "weight" or param.dim() > 1:
            param.normal_(mean=0.0, std=std)
        else:
            param.zero_()


def normalize_keys(state_dict: Dict[str, torch.Tensor], expected: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Map checkpoint names onto this model's: old gamma/beta, with or without the `bert.` prefix.

    A name is rewritten only when the rewrite is a key the model has, so unrelated keys pass
    through unchanged and are reported as unexpected.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        if name in TIED_KEYS:
            continue
        for candidate in (name, "bert." + name, name[len("bert."):] if name.startswith("bert.") else name):
            if candidate in expected:
                name = candidate
                break
        out[name] = value
    return out


def resolve_model_dir(name_or_path: Union[str, os.PathLike], cache_dir=None) -> Path:
    """A local directory as is; otherwise a pretrained name resolved (and cached) by bert_port.hub."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a directory holding a config and weights, got a file")
    from bert_port import hub

    if hub.is_known_name(str(name_or_path)):
        return hub.resolve(str(name_or_path), cache_dir=cache_dir)
    raise ValueError(
        f"{name_or_path}: no such directory and not a known pretrained name "
        f"(a directory must hold one of {', '.join(CONFIG_NAMES)} and one of {', '.join(WEIGHTS_NAMES)}; "
        f"names: {', '.join(hub.known_names())})"
    )


def _find_file(directory: Path, names, what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ValueError(f"{directory}: no {what} file found (looked for {', '.join(names)})")
