"""from_pretrained: the layouts and key spellings users have, and clear errors for bad ones."""
import json
import logging
import pickle

import pytest
import torch

import bert_port as bp
from tests.conftest import TINY, make_inputs, scale_weights_


@pytest.fixture()
def tiny():
    model = bp.BertForPreTraining(bp.BertConfig(**TINY))
    scale_weights_(model)
    return model.eval()


def outputs(model, *inputs):
    with torch.no_grad():
        return model(*inputs, output_all_encoded_layers=False)[0]


def write_ppb_layout(model, directory, rename=lambda k: k):
    """pytorch_pretrained_bert's layout: bert_config.json + pytorch_model.bin (with the tied decoder)."""
    directory.mkdir(exist_ok=True)
    (directory / "bert_config.json").write_text(json.dumps({k: v for k, v in model.config.to_dict().items()
                                                            if k != "layer_norm_eps"}))
    torch.save({rename(k): v for k, v in model.state_dict().items()}, directory / "pytorch_model.bin")


def test_ppb_layout_with_old_gamma_beta_names(tmp_path, tiny):
    def old(k):
        return k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")

    write_ppb_layout(tiny, tmp_path / "m", old)
    loaded = bp.BertForPreTraining.from_pretrained(tmp_path / "m").eval()
    assert not loaded.missing_keys and not loaded.unexpected_keys
    ids, types, mask = make_inputs()
    assert torch.equal(outputs(loaded.bert, ids, types, mask), outputs(tiny.bert, ids, types, mask))


def test_prefix_is_added_and_stripped(tmp_path, tiny):
    write_ppb_layout(tiny, tmp_path / "heads")
    base = bp.BertModel.from_pretrained(tmp_path / "heads").eval()  # `bert.` keys into BertModel
    assert not base.missing_keys and {k.split(".")[0] for k in base.unexpected_keys} == {"cls"}
    tiny.bert.save_pretrained(tmp_path / "base")  # unprefixed keys into a head model
    tagger = bp.BertForTokenTagging.from_pretrained(tmp_path / "base", num_labels=3).eval()
    assert tagger.missing_keys == ["classifier.bias", "classifier.weight"]
    assert tagger.classifier.weight.std() < 0.05 and torch.all(tagger.classifier.bias == 0)  # fresh init
    ids, types, mask = make_inputs()
    assert torch.equal(outputs(base, ids, types, mask), outputs(tagger.bert, ids, types, mask))


def test_new_head_is_logged(tmp_path, tiny, caplog):
    tiny.bert.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="bert_port"):
        bp.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=4).eval()
    assert "not initialized from pretrained model" in caplog.text and "classifier.weight" in caplog.text


def test_num_labels_come_back_from_saved_config(tmp_path):
    model = bp.BertForSequenceClassification(bp.BertConfig(**TINY), 5)
    model.save_pretrained(tmp_path)
    assert bp.BertForSequenceClassification.from_pretrained(tmp_path).eval().num_labels == 5


def test_state_dict_argument_overrides_the_file(tmp_path, tiny):
    tiny.bert.save_pretrained(tmp_path)
    other = bp.BertModel(bp.BertConfig(**TINY))
    given = other.state_dict()
    loaded = bp.BertModel.from_pretrained(tmp_path, state_dict=given).eval()
    assert torch.equal(loaded.pooler.dense.weight, other.pooler.dense.weight)
    with torch.no_grad():
        loaded.pooler.dense.weight.add_(1.0)  # the caller's tensors are not the model's parameters
    assert torch.equal(given["pooler.dense.weight"], other.pooler.dense.weight)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, tiny):
    tiny.bert.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 120
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight: checkpoint \(99, 32\) vs model \(120, 32\)"):
        bp.BertModel.from_pretrained(tmp_path).eval()


def test_directory_without_files_lists_what_was_looked_for(tmp_path):
    with pytest.raises(ValueError, match="config.json, bert_config.json"):
        bp.BertModel.from_pretrained(tmp_path).eval()
    (tmp_path / "config.json").write_text(json.dumps(bp.BertConfig(**TINY).to_dict()))
    with pytest.raises(ValueError, match="model.safetensors, pytorch_model.bin"):
        bp.BertModel.from_pretrained(tmp_path).eval()


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such directory and not a known pretrained name"):
        bp.BertModel.from_pretrained(str(tmp_path / "nope")).eval()


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Boom.sentinel}",))


def test_hostile_pytorch_model_bin_is_refused(tmp_path):
    _Boom.sentinel = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps(bp.BertConfig(**TINY).to_dict()))
    torch.save({"embeddings.word_embeddings.weight": _Boom()}, tmp_path / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(ValueError, match="pytorch_model.bin: (cannot load weights|refusing to load global)"):
        bp.BertModel.from_pretrained(tmp_path).eval()
    assert not _Boom.sentinel.exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=torch.tensor([[1, 99]])), r"input_ids contains 99, outside \[0, 99\)"),
    (dict(input_ids=torch.tensor([[1, -1]])), r"input_ids contains -1"),
    (dict(input_ids=torch.ones(1, 65, dtype=torch.long)), "exceeds max_position_embeddings"),
    (dict(input_ids=torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.full((1, 4), 2)), "token_type_ids contains 2"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5)), "attention_mask has shape"),
    (dict(input_ids=torch.ones(4, dtype=torch.long)), r"\(batch, seq_len\)"),
    (dict(input_ids=torch.ones(1, 4)), "integer tensor"),
])
def test_bad_model_inputs_are_value_errors(kwargs, message):
    model = bp.BertModel(bp.BertConfig(**TINY)).eval()
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_config_reads_google_and_hf_files(tmp_path, minilm_dir):
    hf = bp.BertConfig.from_json_file(minilm_dir / "config.json")
    assert hf.layer_norm_eps == 1e-12 and hf.pad_token_id == 0 and hf.model_type == "bert"
    google = {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
              "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12,
              "type_vocab_size": 2, "vocab_size": 30522, "directionality": "bidi"}
    (tmp_path / "bert_config.json").write_text(json.dumps(google))
    config = bp.BertConfig(str(tmp_path / "bert_config.json"))
    assert config.directionality == "bidi" and config.layer_norm_eps == 1e-12
    assert json.loads(config.to_json_string())["vocab_size"] == 30522
    assert config.to_json_string() == json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("bad,message", [
    ({"vocab_size": 10, "hidden_size": 30, "num_attention_heads": 4}, "not a multiple"),
    ({"vocab_size": 10, "hidden_act": "gelu_fast"}, "hidden_act 'gelu_fast' is not supported"),
    ({"vocab_size": "many"}, "vocab_size"),
])
def test_bad_configs(tmp_path, bad, message):
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=message):
        bp.BertConfig.from_json_file(tmp_path / "c.json")


def test_safetensors_weights_are_read_straight_into_the_parameters(tmp_path, tiny):
    """from_pretrained reads each tensor into its parameter (no second copy); a truncated file is a clear error."""
    from converters.weights import SafetensorsWeights

    tiny.save_pretrained(tmp_path)
    lazy = SafetensorsWeights(tmp_path / "model.safetensors")
    for name, tensor in tiny.state_dict().items():
        if name in lazy:
            assert torch.equal(lazy[name], tensor), name
    loaded = bp.BertForPreTraining.from_pretrained(tmp_path)
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors"):
        bp.BertForPreTraining.from_pretrained(tmp_path)


# ------------------------------------------------------------------ validate before allocate
BIG = dict(vocab_size=1 << 20, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
           intermediate_size=4096)  # ~2.2e9 parameters: building the model would take ~9 GB


def _limited_load(directory, **kwargs):
    from tests.security.child import run_limited

    return run_limited(f"BertModel.from_pretrained({str(directory)!r}, **{kwargs!r})",
                       setup="from bert_port import BertModel", wall=20, as_extra=1 << 30)


def test_a_big_config_without_weights_fails_before_the_model_is_built(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BIG))
    r = _limited_load(tmp_path)
    assert r["error"] == "ValueError" and "no weights file found" in r["message"], r
    assert r["peak_growth"] < 256 << 20, r["peak_growth"]


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy", "tf"])
def test_a_big_config_with_small_weights_fails_before_the_model_is_built(tmp_path, tiny, fmt):
    if fmt == "safetensors":
        tiny.save_pretrained(tmp_path)
    elif fmt == "tf":
        from converters.convert import torch_to_tf

        tiny.save_pretrained(tmp_path / "src")
        torch_to_tf(tmp_path / "src", tmp_path / "bert_model.ckpt")
    else:
        torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "zip")
    (tmp_path / "config.json").write_text(json.dumps(BIG))
    r = _limited_load(tmp_path, **({"from_tf": True} if fmt == "tf" else {}))
    assert r["error"] == "ValueError" and "shapes do not match the config" in r["message"], r
    assert "checkpoint (32,) vs model (2048,)" in r["message"], r["message"]
    assert r["peak_growth"] < 256 << 20, r["peak_growth"]


@pytest.mark.parametrize("variant", ["legacy", "deflated"])
def test_from_pretrained_reads_each_torch_variant_as_torch_load_does(tmp_path, tiny, variant):
    import zipfile

    scale_weights_(tiny)
    path = tmp_path / "pytorch_model.bin"
    torch.save(tiny.state_dict(), path, _use_new_zipfile_serialization=variant != "legacy")
    if variant == "deflated":
        data = path.read_bytes()
        with zipfile.ZipFile(__import__("io").BytesIO(data)) as zi, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zo:
            for info in zi.infolist():
                zo.writestr(info.filename, zi.read(info))
    (tmp_path / "config.json").write_text(json.dumps(tiny.config.to_dict()))
    loaded = bp.BertForPreTraining.from_pretrained(tmp_path)
    reference = torch.load(path, weights_only=True)
    for name, value in loaded.state_dict().items():
        if name in reference:
            assert torch.equal(value, reference[name]), name
