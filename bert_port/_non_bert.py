"""pytorch_pretrained_bert 0.6.2's non-BERT modules (GPT-2, OpenAI GPT, Transformer-XL) as import-only stand-ins.

Libraries written for the reference import these names at load time even when they only use BERT
(e.g. `from pytorch_pretrained_bert import TransfoXLTokenizer, OpenAIGPTModel`). Under
`bert_port.install_alias()` those imports succeed; constructing or loading any of these models,
tokenizers, corpora or optimizers raises NotImplementedError, because bert_port ports BERT only.
Plain data (archive maps, file names) has the reference's values; the BERT pieces the reference
re-exports here (schedules, `cached_path`, the GPT activations) are bert_port's working ones.

Everything comes from the one table `MODULES`: a spec is `"class <base>"` (a stub class; the base is
`object`, `Module`, `Optimizer` or another stub of the same module), `"function"` (a stub function),
`"@module.name"` (a working name from another module), `"=name"` (another name of the same module)
or any other value (a constant as is).
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import types
from typing import Any, Callable, Dict

_S3 = "https://s3.amazonaws.com/models.huggingface.co/bert/"
_PPB = "pytorch_pretrained_bert"
_FILES = {"CONFIG_NAME": "@bert_port.file_utils.CONFIG_NAME", "WEIGHTS_NAME": "@bert_port.file_utils.WEIGHTS_NAME",
          "cached_path": "@bert_port.file_utils.cached_path"}
_LAYER_NORM = {"LayerNorm": "@bert_port.modeling.BertLayerNorm"}  # the reference imports BERT's under this name
_GPT_BLOCKS = {**_LAYER_NORM, "Attention": "class Module", "Block": "class Module", "Conv1D": "class Module",
               "MLP": "class Module", "gelu": "@bert_port.kernels.gelu_tanh"}
_BPE_FILES = {"MERGES_NAME": "merges.txt", "SPECIAL_TOKENS_NAME": "special_tokens.txt", "VOCAB_NAME": "vocab.json",
              "cached_path": "@bert_port.file_utils.cached_path", "get_pairs": "function"}


def _archive(name: str, suffix: str) -> Dict[str, str]:
    return {name: f"{_S3}{name}-{suffix}"}


def _gpt(prefix: str, key: str, loader: str) -> Dict[str, Any]:
    """modeling_gpt2 / modeling_openai: the same layout under two class-name prefixes."""
    return {**_FILES, **_GPT_BLOCKS, f"{prefix}Config": "class object", f"{prefix}PreTrainedModel": "class Module",
            **{f"{prefix}{n}": f"class {prefix}PreTrainedModel" for n in ("Model", "LMHeadModel", "DoubleHeadsModel")},
            f"{prefix}LMHead": "class Module", f"{prefix}MultipleChoiceHead": "class Module", loader: "function",
            "PRETRAINED_CONFIG_ARCHIVE_MAP": _archive(key, "config.json"),
            "PRETRAINED_MODEL_ARCHIVE_MAP": _archive(key, "pytorch_model.bin")}


_TXL_UTILITIES = {"LogUniformSampler": "class object", "ProjectedAdaptiveLogSoftmax": "class Module",
                  "sample_logits": "function"}
_SCHEDULES = {n: f"@bert_port.optimization.{n}" for n in (
    "SCHEDULES", "WarmupConstantSchedule", "WarmupCosineSchedule", "WarmupCosineWithHardRestartsSchedule",
    "WarmupCosineWithWarmupRestartsSchedule", "WarmupLinearSchedule")}

MODULES: Dict[str, Dict[str, Any]] = {
    "modeling_gpt2": _gpt("GPT2", "gpt2", "load_tf_weights_in_gpt2"),
    "modeling_openai": {**_gpt("OpenAIGPT", "openai-gpt", "load_tf_weights_in_openai_gpt"),
                        "swish": "@bert_port.model.swish", "ACT_FNS": "@bert_port._non_bert.OPENAI_ACT_FNS"},
    "modeling_transfo_xl_utilities": _TXL_UTILITIES,
    "modeling_transfo_xl": {
        **_FILES, **_TXL_UTILITIES, "TF_WEIGHTS_NAME": "model.ckpt", "TransfoXLConfig": "class object",
        "TransfoXLPreTrainedModel": "class Module", "TransfoXLModel": "class TransfoXLPreTrainedModel",
        "TransfoXLLMHeadModel": "class TransfoXLPreTrainedModel", "RelMultiHeadAttn": "class Module",
        "RelLearnableMultiHeadAttn": "class RelMultiHeadAttn",
        "RelPartialLearnableMultiHeadAttn": "class RelMultiHeadAttn",
        **_LAYER_NORM, **{n: "class Module" for n in ("AdaptiveEmbedding", "DecoderLayer", "MultiHeadAttn",
                                       "PositionalEmbedding", "PositionwiseFF", "RelLearnableDecoderLayer",
                                       "RelPartialLearnableDecoderLayer")},
        "build_tf_to_pytorch_map": "function", "load_tf_weights_in_transfo_xl": "function",
        "PRETRAINED_CONFIG_ARCHIVE_MAP": _archive("transfo-xl-wt103", "config.json"),
        "PRETRAINED_MODEL_ARCHIVE_MAP": _archive("transfo-xl-wt103", "pytorch_model.bin")},
    "tokenization_gpt2": {**_BPE_FILES, "GPT2Tokenizer": "class object",
                          "PRETRAINED_MERGES_ARCHIVE_MAP": _archive("gpt2", "merges.txt"),
                          "PRETRAINED_VOCAB_ARCHIVE_MAP": _archive("gpt2", "vocab.json"),
                          "PRETRAINED_VOCAB_POSITIONAL_EMBEDDINGS_SIZE_MAP": {"gpt2": 1024}},
    "tokenization_openai": {**_BPE_FILES, "OpenAIGPTTokenizer": "class object", "BasicTokenizer":
                            "@bert_port.tokenization.BasicTokenizer", "text_standardize": "function",
                            "PRETRAINED_MERGES_ARCHIVE_MAP": _archive("openai-gpt", "merges.txt"),
                            "PRETRAINED_VOCAB_ARCHIVE_MAP": _archive("openai-gpt", "vocab.json"),
                            "PRETRAINED_VOCAB_POSITIONAL_EMBEDDINGS_SIZE_MAP": {"openai-gpt": 512}},
    "tokenization_transfo_xl": {
        "cached_path": "@bert_port.file_utils.cached_path", "CORPUS_NAME": "corpus.bin", "VOCAB_NAME": "vocab.bin",
        "TransfoXLTokenizer": "class object", "TransfoXLCorpus": "class object", "LMOrderedIterator": "class object",
        "LMShuffledIterator": "class object", "LMMultiFileIterator": "class LMShuffledIterator",
        "Corpus": "=TransfoXLCorpus", "Vocab": "=TransfoXLTokenizer",  # set by the reference's TF converter
        "get_lm_corpus": "function", "PRETRAINED_CORPUS_ARCHIVE_MAP": _archive("transfo-xl-wt103", "corpus.bin"),
        "PRETRAINED_VOCAB_ARCHIVE_MAP": _archive("transfo-xl-wt103", "vocab.bin")},
    "optimization_openai": {**_SCHEDULES, "OpenAIAdam": "class Optimizer"},
    "convert_gpt2_checkpoint_to_pytorch": {
        **{n: f"@{_PPB}.modeling_gpt2.{n}" for n in ("CONFIG_NAME", "WEIGHTS_NAME", "GPT2Config", "GPT2Model",
                                                     "load_tf_weights_in_gpt2")},
        "convert_gpt2_checkpoint_to_pytorch": "function"},
    "convert_openai_checkpoint_to_pytorch": {
        **{n: f"@{_PPB}.modeling_openai.{n}" for n in ("CONFIG_NAME", "WEIGHTS_NAME", "OpenAIGPTConfig",
                                                       "OpenAIGPTModel", "load_tf_weights_in_openai_gpt")},
        "convert_openai_checkpoint_to_pytorch": "function"},
    "convert_transfo_xl_checkpoint_to_pytorch": {
        **{n: f"@{_PPB}.modeling_transfo_xl.{n}" for n in ("CONFIG_NAME", "WEIGHTS_NAME", "TransfoXLConfig",
                                                           "TransfoXLLMHeadModel", "load_tf_weights_in_transfo_xl")},
        **{n: f"@{_PPB}.tokenization_transfo_xl.{n}" for n in ("CORPUS_NAME", "VOCAB_NAME")},
        "convert_transfo_xl_checkpoint_to_pytorch": "function"},
}

# The non-BERT names the reference's `__init__` exports, by module.
INIT_EXPORTS = {
    "tokenization_openai": ("OpenAIGPTTokenizer",),
    "tokenization_transfo_xl": ("TransfoXLTokenizer", "TransfoXLCorpus"),
    "tokenization_gpt2": ("GPT2Tokenizer",), "optimization_openai": ("OpenAIAdam",),
    "modeling_openai": ("OpenAIGPTConfig", "OpenAIGPTModel", "OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel",
                        "load_tf_weights_in_openai_gpt"),
    "modeling_transfo_xl": ("TransfoXLConfig", "TransfoXLModel", "TransfoXLLMHeadModel",
                            "load_tf_weights_in_transfo_xl"),
    "modeling_gpt2": ("GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "load_tf_weights_in_gpt2"),
}


def _refuse(qualname: str) -> NotImplementedError:
    return NotImplementedError(f"{qualname}: bert_port ports BERT only; pytorch_pretrained_bert 0.6.2's GPT-2, "
                               "OpenAI GPT and Transformer-XL are importable names here, not implementations "
                               "(use pytorch_pretrained_bert itself or transformers for them)")


def _stub_function(module: str, name: str) -> Callable:
    def stub(*args, **kwargs):
        raise _refuse(f"{module}.{name}")
    stub.__name__ = stub.__qualname__ = name
    stub.__module__ = module
    stub.__doc__ = f"Not implemented: {_refuse(module + '.' + name)}"
    return stub


def _stub_class(module: str, name: str, base: type) -> type:
    """A class that subclasses and type checks can name; making an instance, or loading one, raises."""
    def __new__(cls, *args, **kwargs):
        raise _refuse(f"{module}.{name}")

    def load(cls, *args, **kwargs):
        raise _refuse(f"{module}.{name}")

    namespace = {"__new__": __new__, "__module__": module,
                 "__doc__": f"Not implemented: {_refuse(module + '.' + name)}",
                 **{m: classmethod(load) for m in ("from_pretrained", "from_dict", "from_json_file")}}
    return type(name, (base,), namespace)


def _resolve(ref: str) -> Any:
    module, _, name = ref[1:].rpartition(".")
    return getattr(importlib.import_module(module), name)


def new_module(name: str, doc: str, package: bool = False) -> types.ModuleType:
    """A module made in memory, with a `__spec__` so that `importlib.util.find_spec(name)` answers for it."""
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = module.__spec__.submodule_search_locations  # empty: no submodules on disk
    return module


def build_module(short: str) -> types.ModuleType:
    """The stand-in module `pytorch_pretrained_bert.<short>` built from its row of MODULES."""
    import torch

    full = f"{_PPB}.{short}"
    module = new_module(full, f"pytorch_pretrained_bert 0.6.2's {short} under bert_port: importable, not "
                              "implemented (bert_port ports BERT only); see bert_port._non_bert.")
    bases = {"object": object, "Module": torch.nn.Module, "Optimizer": torch.optim.Optimizer}
    for name, spec in MODULES[short].items():
        if isinstance(spec, str) and spec.startswith("class "):
            base = spec[len("class "):]
            value = _stub_class(full, name, bases[base] if base in bases else getattr(module, base))
        elif spec == "function":
            value = _stub_function(full, name)
        elif isinstance(spec, str) and spec.startswith("@"):
            value = _resolve(spec)
        elif isinstance(spec, str) and spec.startswith("="):
            value = getattr(module, spec[1:])
        else:
            value = spec
        setattr(module, name, value)
    module.__all__ = sorted(MODULES[short])
    return module


@functools.lru_cache(maxsize=None)
def _openai_act_fns() -> Dict[str, Any]:
    import torch

    from bert_port.kernels import gelu_tanh
    from bert_port.model import swish

    return {"relu": torch.nn.ReLU, "swish": swish, "gelu": gelu_tanh}


def __getattr__(name: str) -> Any:
    if name == "OPENAI_ACT_FNS":  # computed on first use so that importing this table needs no torch
        return _openai_act_fns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
