"""`python -m bert_port.demo`: the packaged MegEngine tagger reproduces MegEngine, offline."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.hub_server import REAL_NAME, ROOT, fake_hub, hub_env  # noqa: F401  (fake_hub is a fixture)


def demo(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "bert_port.demo", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_reproduces_megengine_offline(tmp_path):
    # No network, an empty cache and a foreign working directory: the demo needs only the package.
    env = hub_env("http://127.0.0.1:9", tmp_path / "empty-cache", BERT_PORT_OFFLINE="1")
    result = demo(env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    m = re.search(r"max \|torch - megengine\| = (\S+) ", result.stdout)
    assert m and float(m.group(1)) < 1e-5, result.stdout
    assert "tags equal MegEngine's: yes" in result.stdout
    assert re.search(r"^zur\s+14\s+\d+$", result.stdout, re.M)  # Zürich -> zur ##ich, as MegEngine's
    assert not (tmp_path / "empty-cache").exists()


def test_demo_with_a_hub_name_downloads_and_tags(fake_hub):
    result = demo("--model", "bert-base-uncased", "--sentence", "hello world", env=fake_hub.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\[CLS\]\s+2\s+\d+$", result.stdout, re.M)
    assert "no MegEngine reference" in result.stdout
    assert (fake_hub.cache / REAL_NAME / "model.safetensors").is_file()


def test_demo_errors_are_one_line(tmp_path):
    env = hub_env("http://127.0.0.1:9", tmp_path / "cache", BERT_PORT_OFFLINE="1")
    result = demo("--model", "bert-base-klingon", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: bert-base-klingon") and "Traceback" not in result.stderr
    result = demo("--model", "bert-base-uncased", env=env)
    assert result.returncode == 1 and "BERT_PORT_OFFLINE=1" in result.stderr
    result = demo("--num-labels", "0", env=env)
    assert result.returncode == 2 and "usage:" in result.stderr
