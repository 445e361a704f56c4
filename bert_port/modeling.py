"""pytorch_pretrained_bert 0.6.2's `modeling` module: every BERT name it exposes, from bert_port.

Scripts written for the reference run with `pytorch_pretrained_bert` replaced by `bert_port`.
The classes live in `config`, `model`, `heads` and `pretrained`; this module only gathers them
under the reference's path, plus the reference's module-level names.
"""
from __future__ import annotations

import logging
from typing import Dict

from bert_port.config import BertConfig
from bert_port.file_utils import cached_path
from bert_port.heads import (MODEL_CLASSES, BertLMPredictionHead, BertOnlyMLMHead, BertOnlyNSPHead,
                             BertPredictionHeadTransform, BertPreTrainingHeads)
from bert_port.kernels import gelu
from bert_port.model import (ACT2FN, BertAttention, BertEmbeddings, BertEncoder, BertIntermediate, BertLayer,
                             BertLayerNorm, BertOutput, BertPooler, BertSelfAttention, BertSelfOutput,
                             swish)
from bert_port.pretrained import BertPreTrainedModel, load_tf_weights_in_bert
from converters.files import BERT_CONFIG_NAME, CONFIG_NAME, TF_WEIGHTS_NAME, WEIGHTS_NAME

logger = logging.getLogger(__name__)
globals().update(MODEL_CLASSES)  # BertModel and every BertFor* class, as bert_port.heads gathers them


def _archive_map() -> Dict[str, str]:
    from bert_port import hub

    return {name: hub.weights_url(name) for name in hub.known_names()}


# Pretrained name -> URL of its MegEngine hub weights (what `from_pretrained(name)` downloads and converts).
PRETRAINED_MODEL_ARCHIVE_MAP = _archive_map()


__all__ = sorted([
    "ACT2FN", "BERT_CONFIG_NAME", "CONFIG_NAME", "PRETRAINED_MODEL_ARCHIVE_MAP", "TF_WEIGHTS_NAME", "WEIGHTS_NAME",
    "BertAttention", "BertConfig", "BertEmbeddings", "BertEncoder", "BertIntermediate",
    "BertLMPredictionHead", "BertLayer", "BertLayerNorm", "BertOnlyMLMHead", "BertOnlyNSPHead",
    "BertOutput", "BertPooler", "BertPreTrainedModel", "BertPreTrainingHeads", "BertPredictionHeadTransform",
    "BertSelfAttention", "BertSelfOutput", "cached_path", "gelu", "load_tf_weights_in_bert", "swish",
    *MODEL_CLASSES,
])
