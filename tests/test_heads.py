"""Each model class declares its key prefixes, outputs and axes once (bert_port.heads.MODEL_CLASSES).

The declarations are checked against what the classes really hold and return, and the torch-free
converters.mapping (which cannot import the classes) is checked against the declarations.
"""
import pytest
import torch

import bert_port as bp
from bert_port import export
from bert_port._finetune_tasks import ARCHITECTURES, TASKS
from bert_port.heads import MODEL_CLASSES
from converters import mapping
from tests.conftest import TINY

B, C, S, LABELS = 2, 3, 7, 5  # all different, so an axis is recognised by its length


def build(cls):
    torch.manual_seed(0)
    config = bp.BertConfig(**TINY)
    if cls.__name__ in ("BertForSequenceClassification", "BertForTokenClassification", "BertForTokenTagging"):
        return cls(config, LABELS).eval()
    if cls.__name__ == "BertForMultipleChoice":
        return cls(config, C).eval()
    return cls(config).eval()


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_declared_key_prefixes_are_the_parameters(name):
    cls = MODEL_CLASSES[name]
    keys = [k for k in build(cls).state_dict() if k not in mapping.TIED_KEYS]
    heads = [k for k in keys if not k.startswith("bert.")] if name != "BertModel" else []
    assert all(k.startswith(cls.key_prefixes) for k in heads) if cls.key_prefixes else heads == [], heads
    for prefix in cls.key_prefixes:
        assert any(k.startswith(prefix) for k in heads), f"{name}: no key starts with {prefix!r}"


@pytest.mark.parametrize("name", sorted(MODEL_CLASSES))
def test_declared_outputs_and_axes_are_what_forward_returns(name):
    cls = MODEL_CLASSES[name]
    shape = {("batch", "seq"): (B, S), ("batch", "choice", "seq"): (B, C, S)}[cls.input_axes]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, TINY["vocab_size_or_config_json_file"], shape, generator=g)
    with torch.no_grad():
        outputs = export._Outputs(build(cls))(ids, torch.zeros_like(ids), torch.ones_like(ids))
    assert len(outputs) == len(cls.output_names)
    assert set(cls.seq_axis_outputs) <= set(cls.output_names)
    for out_name, out in zip(cls.output_names, outputs):
        assert out.shape[0] == B
        assert (out.dim() > 1 and out.shape[1] == S) == (out_name in cls.seq_axis_outputs), (out_name, out.shape)


def test_the_torch_free_mapping_agrees_with_the_classes():
    for architecture, prefixes in mapping.HEADS.items():
        assert set(prefixes) == set(MODEL_CLASSES[architecture].key_prefixes), architecture
    declared = {p for cls in MODEL_CLASSES.values() for p in cls.key_prefixes}
    assert set(mapping.CANONICAL_PREFIXES) == {"bert."} | {p.split(".")[0] + "." for p in declared}
    for prefix in declared:  # every head parameter has a source name to convert from and to
        assert any(canonical.startswith(prefix) for _, canonical, _, _ in mapping.RULES), prefix


def test_the_derived_lists_name_every_class():
    assert set(export.HEADS) == {n for n, cls in MODEL_CLASSES.items() if cls.input_axes == ("batch", "seq")}
    assert "BertForMultipleChoice" not in export.HEADS and export.HEADS[0] == "BertModel"
    assert export.output_names("BertForQuestionAnswering") == ["start_logits", "end_logits"]
    assert {task.model_cls.hf_architecture for task in TASKS.values()} == set(ARCHITECTURES)
    assert set(ARCHITECTURES) == {"BertForTokenClassification", "BertForSequenceClassification"}
    assert set(MODEL_CLASSES) <= set(bp.__all__) and set(MODEL_CLASSES) <= set(bp.modeling.__all__)
    for name, cls in MODEL_CLASSES.items():
        assert getattr(bp, name) is cls and getattr(bp.modeling, name) is cls
        assert cls.hf_architecture in (None, name, "BertForTokenClassification"), name
