"""bert_port: BERT in PyTorch with the pytorch_pretrained_bert API, plus MegEngine/TF weight converters.

Names are imported on first use, so that `bert_port.config` (and the converters, which need
neither torch nor a model to convert) do not pay for importing torch. The model classes are the
ones `bert_port.heads.MODEL_CLASSES` gathers (each class declares itself there), so they are not
listed here; `__all__` and `dir()` import them (and torch) when asked.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BertConfig": "bert_port.config",
    "BertModel": "bert_port.model",
    "BertPreTrainedModel": "bert_port.pretrained",
    "BertTokenizer": "bert_port.tokenization",
    "BasicTokenizer": "bert_port.tokenization",
    "WordpieceTokenizer": "bert_port.tokenization",
    "load_tf_weights_in_bert": "bert_port.modeling",
    "quantize_int8": "bert_port.quantize",
    "BertAdam": "bert_port.optimization",
    "PYTORCH_PRETRAINED_BERT_CACHE": "bert_port.file_utils",
    "cached_path": "bert_port.file_utils",
    "WEIGHTS_NAME": "bert_port.file_utils",
    "CONFIG_NAME": "bert_port.file_utils",
    "install_alias": "bert_port.alias",
}
_SUBMODULES = {"alias", "cache", "config", "data", "demo", "export", "file_utils", "finetune", "heads", "hub", "inference",
               "io", "kernels", "metrics", "model", "modeling", "optimization", "pretrained", "quantize", "tokenization"}

def _model_classes() -> dict:
    return importlib.import_module("bert_port.heads").MODEL_CLASSES


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"bert_port.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "__all__":
        value = sorted(set(_EXPORTS) | set(_model_classes()))
    elif name.startswith("BertFor") and name in _model_classes():
        value = _model_classes()[name]
    else:
        raise AttributeError(f"module 'bert_port' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES | set(_model_classes()))
