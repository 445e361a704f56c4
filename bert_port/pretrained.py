"""BertPreTrainedModel: weight init, `from_pretrained` and `save_pretrained`.

`from_pretrained` does what pytorch_pretrained_bert 0.6.2 does: it builds the class for real
(`__init__` runs, `init_bert_weights` draws from the global random stream exactly as the reference
does, so a seed gives the same new-head weights and the same later data order), then copies the
checkpoint's tensors into the parameters. Parameters the checkpoint lacks keep their init, and
that is logged. The model comes back in train mode, as the reference's does (HF returns eval mode).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from bert_port.config import BertConfig
from bert_port.io import atomic_write_text, save_safetensors
from converters.owned import output_dir
from converters.files import (CONFIG_NAME, CONFIG_NAMES, SAFE_WEIGHTS_NAME, TF_WEIGHTS_NAME, WEIGHTS_NAMES, find_file,
                              weights_file)
from converters.config import label_maps
from converters.mapping import TIED_KEYS
from converters.weights import open_weights

logger = logging.getLogger(__name__)


class BertPreTrainedModel(nn.Module):
    """Base class of BertModel and the task heads."""

    hf_architecture: Optional[str] = None  # the transformers class whose keys ours match
    # What a model class declares once (bert_port.heads.MODEL_CLASSES gathers them for export, the
    # fine-tuning tasks and the package's names; a test checks the torch-free converters.mapping):
    key_prefixes: Tuple[str, ...] = ()  # canonical key prefixes of the head's own parameters (beside `bert.`)
    output_names: Tuple[str, ...] = ("logits",)  # the tensors forward returns without labels, in order
    seq_axis_outputs: Tuple[str, ...] = ()  # those of output_names whose axis 1 is the sequence
    input_axes: Tuple[str, ...] = ("batch", "seq")  # the axes of input_ids

    def __init__(self, config: BertConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise ValueError(
                f"{type(self).__name__}(config): config must be a BertConfig, got {type(config).__name__}; "
                f"to load weights use {type(self).__name__}.from_pretrained(name_or_directory)"
            )
        self.config = config

    def init_bert_weights(self, module: nn.Module) -> None:
        """The reference's init, applied with `self.apply`: N(0, initializer_range) weights of Linear
        and Embedding layers, zero Linear biases, unit LayerNorm. Nothing else is touched."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def tie_weights(self) -> None:
        """Re-point tied parameters (heads with an MLM decoder override)."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *inputs: Any,
        state_dict: Optional[Dict[str, torch.Tensor]] = None,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        from_tf: bool = False,
        **kwargs: Any,
    ) -> "BertPreTrainedModel":
        """Load a directory (pytorch_pretrained_bert, HF or converter layout) or a pretrained name.

        Extra arguments (e.g. `num_labels`) go to the class constructor. `state_dict` replaces the
        directory's weights; `from_tf=True` reads the directory's TF checkpoint (no TensorFlow
        needed). Returned in train mode, like the reference; call `.eval()` for inference.
        """
        directory = resolve_model_dir(pretrained_model_name_or_path, cache_dir)
        config = BertConfig.from_json_file(find_file(directory, CONFIG_NAMES, "config"))
        # validate before allocate: the weights exist and fit the config (header only) before the model is built
        source = _tf_checkpoint(directory) if from_tf else weights_file(directory) if state_dict is None else None
        check_fits(config, source, state_dict, from_tf=from_tf)
        model = cls(config, *inputs, **kwargs)
        if from_tf:
            return load_tf_weights_in_bert(model, source)
        if state_dict is None:
            state_dict = open_weights(source)
        model.load_pretrained_state_dict(state_dict, source=str(directory))
        return model

    def load_pretrained_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
        """Copy checkpoint tensors into the parameters by canonical name (old gamma/beta names, with
        or without the `bert.` prefix); what the checkpoint lacks keeps its init and is logged.

        Tensors are read one at a time, so a lazily read file (converters.weights.SafetensorsWeights)
        never sits in memory beside the model. Shapes are all checked before anything is copied.
        """
        own = {k: v for k, v in self.state_dict(keep_vars=True).items() if k not in TIED_KEYS}
        names = normalize_keys(state_dict, own)  # own name -> checkpoint key
        shape_of = getattr(state_dict, "shape", None) or (lambda key: tuple(state_dict[key].shape))
        mismatched = [
            f"{name}: checkpoint {shape_of(key)} vs model {tuple(own[name].shape)}"
            for name, key in names.items() if name in own and shape_of(key) != tuple(own[name].shape)
        ]
        if mismatched:
            raise ValueError(f"{source}: shapes do not match the config: " + "; ".join(mismatched))
        missing = sorted(set(own) - set(names))
        unexpected = sorted(set(names) - set(own))
        read_into = getattr(state_dict, "read_into", None)  # a lazily read file: straight into the parameter
        with torch.no_grad():
            for name, key in names.items():
                if name not in own:
                    continue
                dest = own[name]
                if read_into and dest.device.type == "cpu" and dest.is_contiguous() and dest.dtype == state_dict.dtype(key):
                    read_into(key, dest)
                else:
                    dest.copy_(state_dict[key])
        self.tie_weights()
        if missing:
            logger.info("Weights of %s not initialized from pretrained model %s: %s", type(self).__name__, source,
                        missing)
        if unexpected:
            logger.info("Weights from %s not used in %s: %s", source, type(self).__name__, unexpected)
        self.missing_keys, self.unexpected_keys = missing, unexpected

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write `config.json` + `model.safetensors`, loadable by bert_port and HF transformers."""
        save_directory = output_dir(save_directory)  # ConversionError (a ValueError) if it cannot be
        weights = {k: v for k, v in self.state_dict().items() if k not in TIED_KEYS}
        save_safetensors(weights, save_directory / SAFE_WEIGHTS_NAME)
        config = self.config.to_hf_dict([self.hf_architecture] if self.hf_architecture else None)
        num_labels = getattr(self, "num_labels", None)
        if num_labels is not None:
            id2label = config.get("id2label")
            if not isinstance(id2label, dict) or len(id2label) != num_labels:
                config["id2label"], config["label2id"] = label_maps(num_labels)
        atomic_write_text(save_directory / CONFIG_NAME, BertConfig.from_dict(config).to_json_string())


def load_tf_weights_in_bert(model: nn.Module, tf_checkpoint_path: Union[str, os.PathLike]) -> nn.Module:
    """Copy a Google TF checkpoint (TF1, TF2 or tensorflow/models naming) into `model`; no TensorFlow needed.

    Optimizer slots are skipped; names the model does not have are logged, as the reference does.
    Returns the model.
    """
    from converters import mapping
    from converters.tf_checkpoint import TFCheckpointReader

    reader = TFCheckpointReader(tf_checkpoint_path)
    plan = mapping.plan_from_tf(reader.keys(), getattr(getattr(model, "config", None), "num_hidden_layers", None))
    state = {}
    for name, (target, layout) in plan.renames.items():
        state[target] = torch.from_numpy(mapping.to_layout(reader.get(name), layout).copy())
    for name in plan.unknown:
        logger.info("Skipping %s", name)
    model.load_pretrained_state_dict(state, source=str(tf_checkpoint_path))
    return model


def check_fits(config: BertConfig, source: Optional[Path], state_dict: Optional[Mapping[str, Any]] = None, *,
               from_tf: bool = False) -> None:
    """ValueError naming the file unless every tensor of `source` (a weights file or TF prefix; or
    `state_dict`) has the shape `config` implies. Reads headers only: no tensor, no model."""
    from converters import mapping

    if source is None:
        shapes = {k: tuple(v.shape) for k, v in (state_dict or {}).items()}
    elif from_tf:
        from converters.convert import SOURCES, open_reader, target_shapes

        with open_reader("tf", source) as reader:
            shapes = target_shapes(reader, SOURCES["tf"][1](reader.names(), config))
    else:
        from converters.torch_checkpoint import TorchCheckpointReader

        with TorchCheckpointReader(source) as reader:
            shapes = {name: reader.shape_dtype(name)[0] for name in reader.names()}
    bad = mapping.shape_mismatches(shapes, config)
    if bad:
        shown = "; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ValueError(f"{source or 'state_dict'}: shapes do not match the config: {shown}")


def normalize_keys(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Dict[str, str]:
    """Map checkpoint names onto this model's: old gamma/beta, with or without the `bert.` prefix.

    Returns {model name: checkpoint key}. A name is rewritten only when the rewrite is a key the
    model has, so unrelated keys pass through unchanged and are reported as unexpected.
    """
    out: Dict[str, str] = {}
    for key in state_dict:
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
        out[name] = key
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


def _tf_checkpoint(directory: Path) -> Path:
    """The reference's `model.ckpt`, or Google's `bert_model.ckpt`, in `directory`."""
    for prefix in (TF_WEIGHTS_NAME, "bert_model.ckpt"):
        if (directory / (prefix + ".index")).is_file():
            return directory / prefix
    raise ValueError(f"{directory}: no TF checkpoint found (looked for model.ckpt.index, bert_model.ckpt.index)")
