"""Every BertConfig field is checked for type, range and nesting depth when a config is parsed:
any JSON value in any field ends in one ValueError naming the file and the field, never a later crash.
"""
from __future__ import annotations

import json

import pytest

from converters.config import LIMITS, MAX_NESTING, RANGES, BertConfig

BASE = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
JSON_VALUES = ["null", "true", "false", "[1]", "{}", '{"a": 1}', '"x"', "-1", "0", "1e400", "-1e400", "2.5",
               "1" * 4000, "[" * 50 + "]" * 50]


def write(tmp_path, field, raw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE)[:-1] + f', "{field}": {raw}' + "}")
    return path


@pytest.mark.parametrize("field", [*LIMITS, *RANGES, "hidden_act", "fast_dropout", "pad_token_id",
                                   "id2label", "label2id", "architectures", "position_embedding_type"])
@pytest.mark.parametrize("raw", JSON_VALUES)
def test_any_json_value_in_any_field_is_accepted_or_one_value_error(tmp_path, field, raw):
    path = write(tmp_path, field, raw)
    try:
        config = BertConfig.from_json_file(path)
    except ValueError as e:
        message = str(e)
        assert message.startswith(str(path)) and "\n" not in message and len(message) < 400, message
        assert field in message or "vocab_size" in message or "digits" in message or "nested" in message, message
        return
    # accepted: then it is usable everywhere later code touches it
    assert BertConfig.from_dict(json.loads(config.to_json_string())) == config
    value = getattr(config, field)
    if field in LIMITS:
        assert type(value) is int and 0 < value <= LIMITS[field]
    elif field in RANGES:
        assert type(value) in (int, float) and RANGES[field][0] <= value <= RANGES[field][1]
    elif field == "fast_dropout":
        assert type(value) is bool


def test_fast_dropout_is_a_bool_defaulting_to_false(tmp_path):
    assert getattr(BertConfig.from_json_file(write(tmp_path, "fast_dropout", "true")), "fast_dropout") is True
    assert getattr(BertConfig(10, 8, 1, 2, 8), "fast_dropout", False) is False
    with pytest.raises(ValueError, match="fast_dropout must be true or false"):
        BertConfig.from_json_file(write(tmp_path, "fast_dropout", "1"))


def test_nesting_is_limited_for_unknown_fields(tmp_path):
    ok = "[" * MAX_NESTING + "]" * MAX_NESTING
    assert BertConfig.from_json_file(write(tmp_path, "extra", ok)).extra
    deep = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    with pytest.raises(ValueError, match="extra nests deeper"):
        BertConfig.from_json_file(write(tmp_path, "extra", deep))
    with pytest.raises(ValueError, match="nested too deeply"):
        BertConfig.from_json_file(write(tmp_path, "extra", "[" * 10000 + "]" * 10000))


def test_huge_integers_are_named_not_printed():
    with pytest.raises(ValueError, match="num_hidden_layers = an integer of"):
        BertConfig(10, 8, 10 ** 5000, 2, 8)
