"""The pytorch_pretrained_bert 0.6.2 surface: module paths, names, values, parameters, init and modes.

Everything is checked against the installed reference itself, so the test fails if either side moves.
"""
import importlib
import inspect
import os

import numpy as np
import pytest
import torch

import bert_port as bp
from tests.conftest import FIXTURES, TINY, make_inputs, scale_weights_

ppb = pytest.importorskip("pytorch_pretrained_bert")
from pytorch_pretrained_bert import modeling as ppb_modeling  # noqa: E402

NON_BERT = ("OpenAI", "GPT2", "TransfoXL", "openai", "gpt2", "transfo_xl")


def public_names(module):
    """Names a script can import from `module`: its own classes, functions and constants (no imported modules)."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value) or inspect.isbuiltin(value) or name in ("absolute_import", "division",
                                                                        "print_function", "unicode_literals"):
            continue
        owner = getattr(value, "__module__", None)
        if (inspect.isclass(value) or inspect.isfunction(value)) and not (owner or "").startswith(
                "pytorch_pretrained_bert"):
            continue  # torch, nn, open, CrossEntropyLoss, ... imported by the reference
        if not (inspect.isclass(value) or inspect.isfunction(value) or isinstance(value, (str, int, float, dict,
                                                                                          os.PathLike))):
            continue  # `required`, `logger`: objects of other libraries the reference happens to hold
        if any(tag in name for tag in NON_BERT):
            continue
        names.add(name)
    return sorted(names)


@pytest.mark.parametrize("module", ["modeling", "file_utils", "optimization", "tokenization", ""])
def test_every_public_name_of_the_reference_imports(module):
    theirs = importlib.import_module("pytorch_pretrained_bert" + (f".{module}" if module else ""))
    ours = importlib.import_module("bert_port" + (f".{module}" if module else ""))
    names = public_names(theirs)
    if module == "file_utils":  # the rest is the reference's S3/HTTP plumbing, not an API scripts use
        names = [n for n in names if n in ("PYTORCH_PRETRAINED_BERT_CACHE", "cached_path", "WEIGHTS_NAME",
                                           "CONFIG_NAME", "url_to_filename")]
    assert len(names) >= 4
    missing = [n for n in names if not hasattr(ours, n)]
    assert not missing, f"bert_port.{module or '__init__'} lacks {missing}"


def test_constants_have_the_reference_values(monkeypatch):
    from bert_port import file_utils, modeling, tokenization

    for name in ("CONFIG_NAME", "WEIGHTS_NAME", "BERT_CONFIG_NAME", "TF_WEIGHTS_NAME"):
        assert getattr(modeling, name) == getattr(ppb_modeling, name), name
    for name in ("CONFIG_NAME", "WEIGHTS_NAME", "PYTORCH_PRETRAINED_BERT_CACHE"):
        assert getattr(file_utils, name) == getattr(ppb.file_utils, name), name
    assert tokenization.VOCAB_NAME == ppb.tokenization.VOCAB_NAME
    assert set(modeling.ACT2FN) >= set(ppb_modeling.ACT2FN)
    x = torch.linspace(-4, 4, 101)
    for name in ppb_modeling.ACT2FN:
        assert torch.allclose(modeling.ACT2FN[name](x), ppb_modeling.ACT2FN[name](x), atol=1e-6), name
    assert {"bert-base-uncased", "bert-large-cased", "bert-base-chinese"} <= set(modeling.PRETRAINED_MODEL_ARCHIVE_MAP)
    assert bp.BertAdam is bp.optimization.BertAdam


# Documented deliberate differences between a reference signature and ours: (module, qualified name,
# parameter) -> why. Anything else that differs in a name, its position or its default fails.
SIGNATURE_DIFFERENCES = {
    ("optimization", "BertAdam.__init__", "lr"): "the reference's default is its `required` sentinel (an error "
                                                 "when omitted); ours is a plain required parameter",
    ("modeling", "BertLayerNorm.forward", "x"): "ours is nn.LayerNorm's forward, whose parameter is `input`",
}


def reference_callables(module: str):
    """(qualified name, reference callable, ours or None) for every public function of `module`
    and every method, __init__ included, that a public class defines or inherits from the reference."""
    theirs = importlib.import_module(f"pytorch_pretrained_bert.{module}")
    ours = importlib.import_module(f"bert_port.{module}")
    for name in public_names(theirs):
        ref, mine = getattr(theirs, name), getattr(ours, name, None)
        if inspect.isfunction(ref):
            yield name, ref, mine
        elif inspect.isclass(ref) and mine is not None:
            for attr in dir(ref):
                method = getattr(ref, attr)
                if (attr.startswith("_") and attr != "__init__") or not callable(method) or not (
                        getattr(method, "__module__", None) or "").startswith("pytorch_pretrained_bert"):
                    continue  # torch's own nn.Module methods are the same on both sides
                yield f"{name}.{attr}", method, getattr(mine, attr, None)


def _positional(sig: inspect.Signature):
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p for p in sig.parameters.values() if p.kind in kinds]


@pytest.mark.parametrize("module", ["modeling", "tokenization", "optimization", "file_utils"])
def test_every_reference_signature_and_default_is_ours(module):
    """Each positional parameter of every reference function/method has our name at the same
    position, and each reference default is ours, with the same type (1e-12, not 1e-5; None, not 0)."""
    found, problems = 0, []
    for qualname, ref, mine in reference_callables(module):
        if mine is None:
            if module == "file_utils":
                continue  # the reference's S3/HTTP plumbing (see test_every_public_name_of_the_reference_imports)
            problems.append(f"{qualname}: missing")
            continue
        found += 1
        theirs_sig, ours_sig = inspect.signature(ref), inspect.signature(mine)
        ours_by_name, ours_positional = ours_sig.parameters, _positional(ours_sig)
        for i, p in enumerate(_positional(theirs_sig)):
            if (module, qualname, p.name) in SIGNATURE_DIFFERENCES:
                continue
            mine_p = ours_positional[i] if i < len(ours_positional) else None
            if mine_p is None or mine_p.name != p.name:
                problems.append(f"{qualname}: parameter {i} is {p.name!r}, ours {getattr(mine_p, 'name', None)!r}")
            elif p.default is not inspect.Parameter.empty and (
                    mine_p.default != p.default or type(mine_p.default) is not type(p.default)):
                problems.append(f"{qualname}({p.name}=): {p.default!r} in the reference, ours {mine_p.default!r}")
        for p in theirs_sig.parameters.values():  # keyword-only and **kwargs-side defaults
            if p.kind is inspect.Parameter.KEYWORD_ONLY and ours_by_name.get(p.name, p).default != p.default:
                problems.append(f"{qualname}(*, {p.name}=): differs")
    assert found >= (2 if module == "file_utils" else 10) and not problems, "\n".join(problems)


def test_bert_layer_norm_default_epsilon_is_the_reference_one():
    """Client heads build BertLayerNorm(hidden) without eps: 1e-12, visible on a near-constant input."""
    ours, theirs = bp.modeling.BertLayerNorm(8), ppb_modeling.BertLayerNorm(8)
    assert ours.eps == theirs.variance_epsilon == 1e-12
    assert ours.variance_epsilon == 1e-12
    x = 1.0 + 1e-4 * torch.linspace(-1.7, 1.7, 8).repeat(3, 1)  # variance ~1e-8, float32-representable steps
    assert 1e-9 < x.var(-1, unbiased=False).min() < 1e-7
    torch.testing.assert_close(ours(x), theirs(x), atol=2e-3, rtol=0)
    assert ours(x).abs().max() > 1.0  # normalised to unit variance; eps=1e-5 would shrink it to ~0.03


def test_schedules_match_the_reference():
    from bert_port import optimization

    for name in ("WarmupCosineWithHardRestartsSchedule", "WarmupCosineWithWarmupRestartsSchedule",
                 "WarmupCosineSchedule", "WarmupLinearSchedule", "WarmupConstantSchedule", "ConstantLR"):
        ours = getattr(optimization, name)(warmup=0.1, t_total=40)
        theirs = getattr(ppb.optimization, name)(warmup=0.1, t_total=40)
        assert [ours.get_lr(s) for s in range(50)] == [theirs.get_lr(s, True) for s in range(50)], name
    assert set(optimization.SCHEDULES) == set(ppb.optimization.SCHEDULES)


HEADS = [("BertModel", ()), ("BertForPreTraining", ()), ("BertForMaskedLM", ()),
         ("BertForNextSentencePrediction", ()), ("BertForSequenceClassification", (3,)),
         ("BertForMultipleChoice", (2,)), ("BertForTokenClassification", (5,)), ("BertForQuestionAnswering", ())]


@pytest.mark.parametrize("name,args", HEADS)
def test_same_parameters_init_and_random_stream(name, args):
    """Same names in the same order, same initial values under a seed, same RNG state after."""
    torch.manual_seed(123)
    theirs = getattr(ppb_modeling, name)(ppb_modeling.BertConfig(**TINY), *args)
    after_theirs = torch.rand(4)
    torch.manual_seed(123)
    ours = getattr(bp, name)(bp.BertConfig(**TINY), *args)
    after_ours = torch.rand(4)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(after_ours, after_theirs)
    assert [type(m).__name__ for m in ours.modules()] == [type(m).__name__ for m in theirs.modules()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert all(type(m) is torch.nn.Linear for m in ours.modules() if isinstance(m, torch.nn.Linear))


def ppb_directory(tmp_path):
    """A pytorch_pretrained_bert model directory: bert_config.json + pytorch_model.bin from ppb itself."""
    torch.manual_seed(0)
    model = ppb_modeling.BertForPreTraining(ppb_modeling.BertConfig(**TINY))
    scale_weights_(model, std=0.1)
    model.config.to_json_file(str(tmp_path / "bert_config.json"))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return tmp_path


def test_from_pretrained_matches_the_reference_stream_and_mode(tmp_path):
    directory = ppb_directory(tmp_path)
    torch.manual_seed(7)
    theirs = ppb_modeling.BertForSequenceClassification.from_pretrained(str(directory), num_labels=4)
    next_theirs = torch.randperm(100)
    torch.manual_seed(7)
    ours = bp.BertForSequenceClassification.from_pretrained(directory, num_labels=4)
    next_ours = torch.randperm(100)
    assert ours.training and theirs.training  # train mode, as the reference returns it
    for (n, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n  # the loaded weights and the new head's init
    assert torch.equal(next_ours, next_theirs)  # the same data order afterwards


class TaggerWithExtras(bp.BertPreTrainedModel):
    """A client subclass that sets its own parameters, a buffer and a plain tensor attribute."""

    def __init__(self, config, num_labels):
        super().__init__(config)
        self.bert = bp.BertModel(config)
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)
        self.apply(self.init_bert_weights)
        self.scale = torch.nn.Parameter(torch.ones(num_labels))
        self.register_buffer("bias_prior", torch.full((num_labels,), 0.5))
        self.temperature = torch.tensor(2.0)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        seq, _ = self.bert(input_ids, token_type_ids, attention_mask, output_all_encoded_layers=False)
        return self.classifier(seq) * self.scale / self.temperature + self.bias_prior


def test_from_pretrained_builds_the_subclass_for_real(tmp_path):
    directory = ppb_directory(tmp_path)
    model = TaggerWithExtras.from_pretrained(directory, num_labels=3)
    assert torch.equal(model.scale, torch.ones(3)) and torch.equal(model.bias_prior, torch.full((3,), 0.5))
    assert model.temperature.item() == 2.0 and not any(p.is_meta for p in model.parameters())
    ids, types, mask = make_inputs()
    logits = model(ids, types, mask)
    assert torch.isfinite(logits).all() and logits.shape == (*ids.shape, 3)


def test_classic_save_and_reload(tmp_path):
    """torch.save(state_dict, WEIGHTS_NAME) + config.to_json_file(CONFIG_NAME), even over an older safetensors."""
    from bert_port.file_utils import CONFIG_NAME, WEIGHTS_NAME

    torch.manual_seed(0)
    first = bp.BertForTokenClassification(bp.BertConfig(**TINY), 4)
    first.save_pretrained(tmp_path)  # an older model.safetensors in the same directory
    os.utime(tmp_path / "model.safetensors", (1, 1))
    model = bp.BertForTokenClassification(bp.BertConfig(**TINY), 4)
    scale_weights_(model, std=0.1, seed=3)
    torch.save(model.state_dict(), os.path.join(tmp_path, WEIGHTS_NAME))
    model.config.to_json_file(os.path.join(tmp_path, CONFIG_NAME))
    back = bp.BertForTokenClassification.from_pretrained(tmp_path, num_labels=4)
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    theirs = ppb_modeling.BertForTokenClassification.from_pretrained(str(tmp_path), num_labels=4)
    for (n, a), b in zip(theirs.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n  # the reference reads our classic save too


def test_load_tf_weights_in_bert_reproduces_tensorflow():
    """ppb's entry point, backed by our TF reader: TF's recorded outputs within 1e-5, no TensorFlow."""
    from bert_port.modeling import load_tf_weights_in_bert

    config = bp.BertConfig.from_json_file(FIXTURES / "tf" / "bert_config.json")
    config.hidden_act = "gelu_new"  # Google's "gelu" is the tanh form
    model = load_tf_weights_in_bert(bp.BertForPreTraining(config), FIXTURES / "tf" / "tf1" / "bert_model.ckpt").eval()
    rec = np.load(FIXTURES / "tf" / "outputs.npz")
    ids, types, mask = (torch.as_tensor(rec[k]).long() for k in ("input_ids", "token_type_ids", "input_mask"))
    with torch.no_grad():
        _, pooled = model.bert(ids, types, mask)
        _, nsp = model(ids, types, mask)
    assert (pooled - torch.as_tensor(rec["pooled_output"])).abs().max() < 1e-5
    assert (nsp - torch.as_tensor(rec["nsp_logits"])).abs().max() < 1e-5
