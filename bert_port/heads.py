"""Task heads on top of BertModel, with pytorch_pretrained_bert 0.6.2's signatures and losses.

Each `forward` returns the loss when labels are given, else the logits, exactly like the
reference. Head models hold the encoder as `self.bert`, so their keys carry the `bert.` prefix.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from bert_port.config import BertConfig
from bert_port import kernels
from bert_port.attention import jagged
from bert_port.model import BertLayerNorm, BertModel, activation
from bert_port.pretrained import BertPreTrainedModel


def _num_labels(config: BertConfig, num_labels: Optional[int]) -> int:
    """An explicit argument wins; else what a saved classifier's config says; else 2 (the old default)."""
    if num_labels is not None:
        return int(num_labels)
    id2label = getattr(config, "id2label", None)
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return int(getattr(config, "num_labels", 2))


def _padded_only(model: nn.Module, input_ids) -> None:
    """Heads whose outputs are per position of a padded grid (or per choice) take (B, S) input only."""
    if getattr(input_ids, "is_nested", False):
        raise ValueError(f"{type(model).__name__} takes (batch, seq_len) input_ids; jagged input is taken by "
                         "BertModel, BertForTokenTagging, BertForSequenceClassification, BertForNextSentencePrediction")


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = BertLayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(kernels.linear(self.dense, hidden_states, act=self.transform_act_fn))


class BertLMPredictionHead(nn.Module):
    """transform -> x @ word_embeddings^T + bias. The decoder weight IS the embedding matrix."""

    def __init__(self, config: BertConfig, bert_model_embedding_weights: nn.Parameter) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        V, H = bert_model_embedding_weights.shape
        self.decoder = nn.Linear(H, V, bias=False)  # built (and initialised) as the reference, then tied
        self.decoder.weight = bert_model_embedding_weights
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states)) + self.bias  # (..., V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig, bert_model_embedding_weights: nn.Parameter) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, bert_model_embedding_weights)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output: torch.Tensor) -> torch.Tensor:
        return self.seq_relationship(pooled_output)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, bert_model_embedding_weights: nn.Parameter) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, bert_model_embedding_weights)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor):
        return self.predictions(sequence_output), self.seq_relationship(pooled_output)


class _TiedMLM(BertPreTrainedModel):
    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def mlm_loss(self, sequence_output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over positions whose label is not -1, decoding only those positions.

        Equal to the reference's loss over all positions with ignore_index=-1, without
        computing a (B, S, V) logits tensor for the ~85% of positions that carry no label.
        """
        selected = labels != -1
        logits = self.cls.predictions(sequence_output[selected])  # (N, V)
        return F.cross_entropy(logits, labels[selected])


class BertForPreTraining(_TiedMLM):
    """Masked LM + next-sentence heads. Returns total loss, or (prediction_scores, seq_relationship_score)."""

    hf_architecture = "BertForPreTraining"
    key_prefixes = ("cls.predictions.", "cls.seq_relationship.")
    output_names = ("prediction_scores", "seq_relationship_score")
    seq_axis_outputs = ("prediction_scores",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings.weight)
        self.apply(self.init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_lm_labels=None,
                next_sentence_label=None):
        _padded_only(self, input_ids)
        sequence_output, pooled = self.bert(input_ids, token_type_ids, attention_mask, False)
        nsp_scores = self.cls.seq_relationship(pooled)  # (B, 2)
        if masked_lm_labels is not None and next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_scores.view(-1, 2), next_sentence_label.view(-1), ignore_index=-1)
            return self.mlm_loss(sequence_output, masked_lm_labels) + nsp_loss
        return self.cls.predictions(sequence_output), nsp_scores


class BertForMaskedLM(_TiedMLM):
    """Returns the masked-LM loss (labels -1 ignored), or prediction scores (B, S, V)."""

    hf_architecture = "BertForMaskedLM"
    key_prefixes = ("cls.predictions.",)
    seq_axis_outputs = ("logits",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config, self.bert.embeddings.word_embeddings.weight)
        self.apply(self.init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, masked_lm_labels=None):
        _padded_only(self, input_ids)
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, False)
        if masked_lm_labels is not None:
            return self.mlm_loss(sequence_output, masked_lm_labels)
        return self.cls.predictions(sequence_output)


class BertForNextSentencePrediction(BertPreTrainedModel):
    """Returns the NSP loss, or scores (B, 2) (0 = "B follows A")."""

    hf_architecture = "BertForNextSentencePrediction"
    key_prefixes = ("cls.seq_relationship.",)

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.apply(self.init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, next_sentence_label=None):
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask, False)
        scores = self.cls.seq_relationship(pooled)
        if next_sentence_label is not None:
            return F.cross_entropy(scores.view(-1, 2), next_sentence_label.view(-1), ignore_index=-1)
        return scores


class _Classifier(BertPreTrainedModel):
    """BERT + dropout + a `classifier` Linear(H, num_labels): the sequence and token classifiers."""

    def __init__(self, config: BertConfig, num_labels: Optional[int] = None) -> None:
        super().__init__(config)
        self.num_labels = _num_labels(config, num_labels)
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self.apply(self.init_bert_weights)


class BertForSequenceClassification(_Classifier):
    """Dropout + linear on the pooled output. Returns the loss, or logits (B, num_labels).

    input_ids may be jagged (see BertModel.forward); labels stay (B,).
    """

    hf_architecture = "BertForSequenceClassification"
    key_prefixes = ("classifier.",)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask, False)
        logits = self.classifier(self.dropout(pooled))
        if labels is not None:
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return logits


class BertForMultipleChoice(BertPreTrainedModel):
    """Inputs (B, C, S); scores each choice from its pooled output. Returns the loss, or logits (B, C)."""

    hf_architecture = "BertForMultipleChoice"
    key_prefixes = ("classifier.",)
    input_axes = ("batch", "choice", "seq")

    def __init__(self, config: BertConfig, num_choices: int = 2) -> None:
        super().__init__(config)
        self.num_choices = num_choices
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.apply(self.init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        _padded_only(self, input_ids)
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731  (B*C, S)
        _, pooled = self.bert(flat(input_ids), flat(token_type_ids), flat(attention_mask), False)
        logits = self.classifier(self.dropout(pooled)).view(-1, self.num_choices)
        if labels is not None:
            return F.cross_entropy(logits, labels.view(-1))
        return logits


class BertForTokenTagging(_Classifier):
    """Sequence labelling: dropout + linear over every token.

    With labels, the loss is the mean cross-entropy over active tokens only (attention_mask == 1)
    and ignores label -100 (later word pieces, [CLS], [SEP]). Returns the loss, or logits (B, S, num_labels).
    Jagged input_ids (see BertModel.forward): logits are jagged (B, j, num_labels), labels jagged
    like input_ids; the loss is the same (every token is active, -100 ignored).
    """

    hf_architecture = "BertForTokenClassification"
    key_prefixes = ("classifier.",)
    seq_axis_outputs = ("logits",)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, False)
        if sequence_output.is_nested:
            return self._jagged(sequence_output, labels)
        logits = self.classifier(self.dropout(sequence_output))  # (B, S, num_labels)
        if labels is None:
            return logits
        if attention_mask is None:
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        active = attention_mask.view(-1) == 1
        return F.cross_entropy(logits.view(-1, self.num_labels)[active], labels.view(-1)[active])


    def _jagged(self, sequence_output: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Classify the (T, H) rows of a jagged batch: jagged logits, or the loss against jagged labels."""
        offsets = sequence_output.offsets()
        logits = self.classifier(self.dropout(sequence_output.values()))  # (T, num_labels)
        if labels is None:
            return jagged(logits, offsets)
        if not (getattr(labels, "layout", None) == torch.jagged and labels.dim() == 2 and labels.lengths() is None
                and torch.equal(labels.offsets(), offsets)):
            raise ValueError("labels must be a jagged nested tensor with the same sequence lengths as input_ids")
        return F.cross_entropy(logits, labels.values())


class BertForTokenClassification(BertForTokenTagging):
    """pytorch_pretrained_bert's name for the same model (active-token loss, -100 ignored)."""


class BertForQuestionAnswering(BertPreTrainedModel):
    """Span start/end logits (B, S) each; the loss averages start and end cross-entropies."""

    hf_architecture = "BertForQuestionAnswering"
    key_prefixes = ("qa_outputs.",)
    output_names = ("start_logits", "end_logits")
    seq_axis_outputs = ("start_logits", "end_logits")

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_bert_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, start_positions=None,
                end_positions=None):
        _padded_only(self, input_ids)
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask, False)
        start_logits, end_logits = self.qa_outputs(sequence_output).unbind(-1)
        if start_positions is None or end_positions is None:
            return start_logits, end_logits
        # Positions outside the sequence are clamped to S and ignored, as in the reference.
        ignored = start_logits.shape[1]
        start = start_positions.view(-1).clamp(0, ignored)
        end = end_positions.view(-1).clamp(0, ignored)
        loss = F.cross_entropy(start_logits, start, ignore_index=ignored)
        return (loss + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2


# Every model class a config's `architectures` may name, by class name, in the order export's
# --head lists them. Each declares its key prefixes, outputs and axes on the class itself
# (see BertPreTrainedModel); export, the fine-tuning tasks, `bert_port` and `modeling` read them here.
MODEL_CLASSES: Dict[str, Type[BertPreTrainedModel]] = {cls.__name__: cls for cls in (
    BertModel, BertForSequenceClassification, BertForTokenClassification, BertForTokenTagging,
    BertForQuestionAnswering, BertForMaskedLM, BertForPreTraining, BertForNextSentencePrediction,
    BertForMultipleChoice)}
