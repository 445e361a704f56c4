"""bert_port: BERT in PyTorch with the pytorch_pretrained_bert API, plus MegEngine/TF weight converters."""
from bert_port.config import BertConfig
from bert_port.heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertForTokenTagging,
)
from bert_port.model import BertModel
from bert_port.pretrained import BertPreTrainedModel
try:  # TEMP until tokenizer lands
    from bert_port.tokenization import BasicTokenizer, BertTokenizer, WordpieceTokenizer
except ImportError:
    pass

__version__ = "0.1.0"

__all__ = [
    "BasicTokenizer",
    "BertConfig",
    "BertForMaskedLM",
    "BertForMultipleChoice",
    "BertForNextSentencePrediction",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForTokenTagging",
    "BertModel",
    "BertPreTrainedModel",
    "BertTokenizer",
    "WordpieceTokenizer",
]
