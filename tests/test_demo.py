"""`python -m bert_port.demo`: the packaged MegEngine tagger reproduces MegEngine, offline."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

from bert_port.demo import DEFAULT_OUT, DEMO
from tests.hub_server import REAL_NAME, ROOT, fake_hub, hub_env  # noqa: F401  (fake_hub is a fixture)


def demo(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "bert_port.demo", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_reproduces_megengine_offline(tmp_path):
    # No network, an empty cache and a foreign working directory: the demo needs only the package.
    env = hub_env("http://127.0.0.1:9", tmp_path / "empty-cache", BERT_PORT_OFFLINE="1")
    result = demo(env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(r"max \|torch - megengine\| = (\S+) ", result.stdout)
    assert m and float(m.group(1)) < 1e-5, result.stdout
    assert "tags equal MegEngine's: yes" in result.stdout
    # Zürich -> zur ##ich, as MegEngine's, each with the NAME of the tag MegEngine's logits pick
    ref = json.loads((DEMO / "reference.json").read_text(encoding="utf-8"))
    names = json.loads((DEMO / "bert_config.json").read_text(encoding="utf-8"))["id2label"]
    for i in (ref["tokens"].index("zur"), ref["tokens"].index("##ich")):
        picked = max(range(ref["num_labels"]), key=lambda k: ref["logits"][i][k])
        assert re.search(rf"^{re.escape(ref['tokens'][i])}\s+{ref['input_ids'][i]}\s+{re.escape(names[str(picked)])}$",
                         result.stdout, re.M), result.stdout
    assert not (tmp_path / "empty-cache").exists()
    assert f"converted to {DEFAULT_OUT}" in result.stdout


def test_demo_keeps_a_token_classifier_with_its_tag_names(tmp_path, caplog):
    from bert_port import BertForTokenTagging

    env = hub_env("http://127.0.0.1:9", tmp_path / "empty-cache", BERT_PORT_OFFLINE="1")
    out = tmp_path / "demo-model"
    assert demo("--out", out, env=env, cwd=tmp_path).returncode == 0
    assert demo("--out", out, env=env, cwd=tmp_path).returncode == 0  # a second run replaces its own output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "O", "1": "B-PER", "2": "I-PER", "3": "B-LOC", "4": "I-LOC"}
    with caplog.at_level(logging.INFO, logger="bert_port"):
        model = BertForTokenTagging.from_pretrained(out)
    assert model.num_labels == 5 and "not initialized" not in caplog.text, caplog.text
    (out / "notes.txt").write_text("mine")  # a directory with a file of the user's is never replaced
    refused = demo("--out", out, env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "notes.txt" in refused.stderr and (out / "notes.txt").exists()


def test_demo_with_a_hub_name_downloads_and_tags(fake_hub):
    result = demo("--model", "bert-base-uncased", "--sentence", "hello world", env=fake_hub.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\[CLS\]\s+2\s+LABEL_\d$", result.stdout, re.M)
    assert "no MegEngine reference" in result.stdout
    assert (fake_hub.cache / REAL_NAME / "model.safetensors").is_file()


def test_demo_errors_are_one_line(tmp_path):
    env = hub_env("http://127.0.0.1:9", tmp_path / "cache", BERT_PORT_OFFLINE="1")
    result = demo("--model", "bert-base-klingon", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: bert-base-klingon") and "Traceback" not in result.stderr
    result = demo("--model", "bert-base-uncased", env=env)
    assert result.returncode == 1 and "BERT_PORT_OFFLINE=1" in result.stderr


def test_options_that_cannot_apply_are_refused_not_ignored(capsys):
    from bert_port.demo import main

    for argv, message in ((["--model", "bert-base-uncased", "--num-labels", "0"], "--num-labels must be at least 1"),
                          (["--sentence", "hello"], "--sentence: only with --model"),
                          (["--num-labels", "3"], "--num-labels: only with --model"),
                          (["--cache-dir", "x"], "--cache-dir: only with --model"),
                          (["--model", "bert-base-uncased", "--out", "x"], "--out applies to the packaged tagger")):
        assert main(argv) == 2, argv  # refused before anything is loaded or written
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
