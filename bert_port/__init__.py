"""bert_port: BERT in PyTorch with the pytorch_pretrained_bert API, plus MegEngine/TF weight converters.

Names are imported on first use, so that `bert_port.config` (and the converters, which need
neither torch nor a model to convert) do not pay for importing torch.
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
    **{name: "bert_port.heads" for name in (
        "BertForMaskedLM", "BertForMultipleChoice", "BertForNextSentencePrediction", "BertForPreTraining",
        "BertForQuestionAnswering", "BertForSequenceClassification", "BertForTokenClassification",
        "BertForTokenTagging")},
    "load_tf_weights_in_bert": "bert_port.modeling",
    "quantize_int8": "bert_port.quantize",
    "BertAdam": "bert_port.optimization",
    "PYTORCH_PRETRAINED_BERT_CACHE": "bert_port.file_utils",
    "cached_path": "bert_port.file_utils",
    "WEIGHTS_NAME": "bert_port.file_utils",
    "CONFIG_NAME": "bert_port.file_utils",
}
_SUBMODULES = {"cache", "config", "data", "demo", "export", "file_utils", "finetune", "heads", "hub", "io", "kernels",
               "metrics", "model", "modeling", "inference", "optimization", "pretrained", "quantize",
               "tokenization"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"bert_port.{name}")
    raise AttributeError(f"module 'bert_port' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
