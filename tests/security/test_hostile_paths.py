"""Issue 12, paths, cache, configs, downloads and the tokenizer: hostile names, manifests, special
files, bodies and texts end within seconds in a documented error, touching nothing outside the
cache root or the output directory.

Before the fix: `cache remove ../x` and `/abs/dir` deleted directories outside the cache (leaving
`x.lock` beside them); a manifest naming /dev/zero hung `verify`; a FIFO config, tokenizer_config
or --vocab hung the reader; --force deleted foreign files; num_hidden_layers 20000 took a minute
and GBs; an endless body filled the disk, a drip was accepted forever, a body longer than its
Content-Length was cut and accepted; the word cache kept 1 MiB per distinct input.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert_port import cache, hub
from bert_port.config import LIMITS, BertConfig
from tests.hub_server import (  # noqa: F401  (fake_hub and server are fixtures)
    REAL_NAME, TEST_NAME, fake_hub, hub_env, server)
from tests.security.child import MiB, expect, run_limited

ROOT = Path(__file__).resolve().parents[2]
MGE = ROOT / "tests" / "fixtures" / "mge"


def run(*args, env=None, timeout=60):
    t = time.monotonic()
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=env or {**os.environ, "PYTHONPATH": str(ROOT)})
    r.seconds = time.monotonic() - t
    return r


def one_line_error(r):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# ------------------------------------------------------------------------------ cache names
@pytest.fixture
def outside(tmp_path):
    """A cache root and, beside it, a directory (with a file) that no cache command may touch."""
    root, victim = tmp_path / "cache", tmp_path / "victim"
    (root / "downloads").mkdir(parents=True)
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return root, victim


@pytest.mark.parametrize("command", ["remove", "verify"])
@pytest.mark.parametrize("spelling", ["../victim", "ABS", "sub/../../victim", "downloads/../../victim", "..", ".",
                                      "victim/", "\\..\\victim", ".hidden", "x.lock"])
def test_cache_commands_refuse_names_outside_the_root(outside, command, spelling):
    root, victim = outside
    name = str(victim) if spelling == "ABS" else spelling
    r = run("-m", "bert_port.cache", "--cache-dir", root, command, name)
    assert "not a valid cache entry name" in one_line_error(r)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in root.parent.iterdir()) == ["cache", "victim"]  # no victim.lock beside it
    assert sorted(p.name for p in root.iterdir()) == ["downloads"]


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(st.sampled_from("ab./\\-_\x00~ \n"), max_size=12))
def test_fuzz_entry_names_stay_inside_the_root(name):
    root = Path("/nonexistent/cache")
    try:
        path = cache.entry_path(root, name)
    except ValueError:
        return
    assert path.parent == root and path.name == name and name not in (".", "..", cache.DOWNLOADS)


# ------------------------------------------------------------------------------ manifests
def fake_entry(root: Path, name: str, files: dict) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    manifest = {"format": cache.FORMAT, "name": name, "source": {},
                "files": {rel: {"size": 0, "mtime_ns": 0, "sha256": "0" * 64} for rel in files}}
    (entry / cache.MANIFEST).write_text(json.dumps(manifest))
    return entry


@pytest.mark.parametrize("listed", ["/dev/zero", "../../victim/precious.txt", "fifo", "link", "sub/../../x", ""])
def test_manifest_paths_outside_the_entry_or_special_files_are_never_read(outside, listed):
    root, victim = outside
    entry = fake_entry(root, TEST_NAME, [listed])
    if listed == "fifo":
        os.mkfifo(entry / "fifo")
    if listed == "link":
        (entry / "link").symlink_to("/dev/zero")
    problems = cache.check_entry(entry, full=True)
    assert problems and ("not a relative path inside the entry" in problems[0] or "not a regular file" in problems[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in ("verify", "list"):  # the old code hung on /dev/zero and the FIFO here
        r = run("-m", "bert_port.cache", "--cache-dir", root, command, *([TEST_NAME] if command == "verify" else []),
                env=env, timeout=60)
        assert r.seconds < 30 and r.returncode == (1 if command == "verify" else 0), (r.stdout, r.stderr)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_offline_load_with_a_hostile_manifest_is_a_hub_error(outside, monkeypatch):
    root, _ = outside
    fake_entry(root, REAL_NAME, ["/dev/zero"])
    monkeypatch.setenv("BERT_PORT_OFFLINE", "1")
    body = f"""
        from bert_port import hub
        hub.resolve({REAL_NAME!r}, cache_dir={str(root)!r})
    """
    r = run_limited(body, env={**os.environ, "BERT_PORT_OFFLINE": "1"}, wall=10)
    expect(r, "HubError", peak_mb=64, match="unusable")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "huge"])
def test_manifest_itself_must_be_a_small_regular_file(outside, special):
    root, _ = outside
    entry = fake_entry(root, TEST_NAME, [])
    (entry / cache.MANIFEST).unlink()
    if special == "fifo":
        os.mkfifo(entry / cache.MANIFEST)
    elif special == "huge":
        with open(entry / cache.MANIFEST, "wb") as f:
            f.truncate(cache.MAX_MANIFEST_BYTES + 1)
    else:
        (entry / cache.MANIFEST).symlink_to(special)
    r = run_limited(f"assert cache.check_entry(Path({str(entry)!r}))[0].startswith('incomplete')",
                    setup="from pathlib import Path\nfrom bert_port import cache", wall=5)
    assert r["error"] is None, r


def test_remove_deletes_a_symlinked_entry_not_its_target(outside):
    root, victim = outside
    (root / TEST_NAME).symlink_to(victim)
    r = run("-m", "bert_port.cache", "--cache-dir", root, "remove", TEST_NAME)
    assert r.returncode == 0, r.stderr
    assert not (root / TEST_NAME).exists() and (victim / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ special files
def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(128 * MiB)  # sparse: costs no disk
    else:
        path.symlink_to(kind)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "huge"])
def test_tokenizer_config_must_be_a_small_regular_file(tmp_path, kind):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    make_special(tmp_path / "tokenizer_config.json", kind)
    r = run_limited(f"BertTokenizer.from_pretrained({str(tmp_path)!r})",
                    setup="from bert_port.tokenization import BertTokenizer", wall=5)
    expect(r, "ValueError", peak_mb=64, match="tokenizer config")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "huge"])
def test_vocab_must_be_a_small_regular_file(tmp_path, kind):
    make_special(tmp_path / "vocab.txt", kind)
    r = run_limited(f"load_vocab({str(tmp_path / 'vocab.txt')!r})",
                    setup="from bert_port.tokenization import load_vocab", wall=5)
    expect(r, "ValueError", peak_mb=64)


@pytest.mark.parametrize("which", ["config", "vocab", "weights"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_converter_inputs_must_be_regular_files(tmp_path, which, kind):
    files = {"config": MGE / "bert_config.json", "vocab": tmp_path / "vocab.txt", "weights": MGE / "hub_bert.pkl"}
    files["vocab"].write_text("[PAD]\n")
    files[which] = tmp_path / f"special-{which}"
    make_special(files[which], kind)
    r = run("-m", "converters.mge2torch", files["weights"], "--config", files["config"], "--vocab", files["vocab"],
            "--out", tmp_path / "out", timeout=60)
    assert "expected a regular file" in one_line_error(r) and r.seconds < 30
    assert not (tmp_path / "out").exists()


def test_force_never_deletes_foreign_files(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("years of work")
    (out / "model.safetensors").write_text("old")
    r = run("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
            "--out", out, "--force")
    assert "'sub'" in one_line_error(r)
    assert (out / "sub" / "thesis.tex").read_text() == "years of work" and (out / "model.safetensors").exists()


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("field, value", [("num_hidden_layers", 20_000), ("hidden_size", 1 << 20),
                                          ("vocab_size", 10 ** 9), ("intermediate_size", 10 ** 7),
                                          ("max_position_embeddings", 10 ** 8), ("type_vocab_size", 10 ** 6),
                                          ("num_attention_heads", 4096)])
def test_absurd_config_sizes_fail_fast(tmp_path, field, value):
    data = json.loads((MGE / "bert_config.json").read_text())
    data[field] = value
    if field == "hidden_size":
        data["num_attention_heads"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    t = time.monotonic()
    with pytest.raises(ValueError, match=f"{field} = {value} is above the limit"):
        BertConfig.from_json_file(tmp_path / "config.json")
    assert time.monotonic() - t < 1


def test_parameter_count_is_bounded_even_when_each_field_is_allowed():
    with pytest.raises(ValueError, match="parameters, above the limit"):
        BertConfig(LIMITS["vocab_size"], hidden_size=8192, num_hidden_layers=128, num_attention_heads=64,
                   intermediate_size=32768)
    BertConfig(119547, hidden_size=2560, num_hidden_layers=48, num_attention_heads=40, intermediate_size=10240)


def test_absurd_config_through_the_converter_cli(tmp_path):
    data = json.loads((MGE / "bert_config.json").read_text())
    data["num_hidden_layers"] = 20_000
    (tmp_path / "c.json").write_text(json.dumps(data))
    r = run("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", tmp_path / "c.json", "--out", tmp_path / "o")
    assert "above the limit" in one_line_error(r)


def test_deeply_nested_config_is_a_value_error(tmp_path):
    (tmp_path / "c.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError):
        BertConfig.from_json_file(tmp_path / "c.json")


# ------------------------------------------------------------------------------ downloads
def test_endless_body_stops_at_the_size_cap(server, tmp_path):
    server.files["/blob"] = b"x" * 10
    server.fail("/blob", "endless")
    t = time.monotonic()
    with pytest.raises(hub.HubError, match="more than the 1048576-byte limit"):
        hub.download(server.url + "/blob", tmp_path / "blob", max_bytes=1 * MiB, retries=0)
    assert time.monotonic() - t < 10
    assert list(tmp_path.iterdir()) == []  # .part deleted


def test_endless_weights_through_resolve_stop_at_the_architecture_cap(fake_hub):
    model = fake_hub.model
    cap = model.max_weights_bytes
    assert cap < 64 * MiB  # L-2_H-32: a few MB of float32 plus slack
    fake_hub.server.fail(fake_hub.weights_path, "endless")
    with pytest.raises(hub.HubError, match=f"more than the {cap}-byte limit"):
        hub.resolve(TEST_NAME)
    assert fake_hub.server.sent[fake_hub.weights_path] < cap + 64 * MiB
    assert not (fake_hub.cache / "downloads").exists()


def test_size_caps_follow_the_architecture_the_name_implies():
    base, large = hub.get_model("bert-base-uncased"), hub.get_model("bert-large-uncased")
    assert 440e6 < base.max_weights_bytes < 1.0e9  # 110M float32 parameters = 440 MB
    assert 1.34e9 < large.max_weights_bytes < 2.5e9  # 340M float32 parameters = 1.34 GB
    assert base.max_bytes(hub.CONFIG_FILE) == hub.MAX_CONFIG_BYTES
    assert base.max_bytes(hub.VOCAB_FILE) == hub.MAX_VOCAB_BYTES


def test_announced_length_above_the_cap_is_refused_before_streaming(server, tmp_path):
    server.files["/blob"] = b"x" * (2 * MiB)
    with pytest.raises(hub.HubError, match="announces 2097152 bytes"):
        hub.download(server.url + "/blob", tmp_path / "blob", max_bytes=1 * MiB, retries=0)
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("rate", [1 / 1.5, 3000])  # the 1 byte per 1.5 s; a steady slow stream
def test_drip_hits_the_overall_deadline(server, tmp_path, monkeypatch, rate):
    """Bytes keep arriving, so no read ever times out: only the overall deadline ends it."""
    server.files["/blob"] = b"x" * 100_000
    server.throttle("/blob", rate)
    monkeypatch.setenv("BERT_PORT_DOWNLOAD_TIMEOUT", "2")  # above the drip's 1.5 s: bytes arrive before it ends
    t = time.monotonic()
    with pytest.raises(hub.HubError, match="not finished within 2 s.*kept in"):
        hub.download(server.url + "/blob", tmp_path / "blob", retries=5)
    assert 1.5 < time.monotonic() - t < 8
    assert (tmp_path / "blob.part").stat().st_size > 0  # kept: a later call resumes


def test_body_longer_than_content_length_is_an_error(server, tmp_path):
    data = os.urandom(100_000)
    server.files["/blob"] = data
    server.fail("/blob", "overlong")
    with pytest.raises(hub.HubError, match="more than the 100000 bytes its Content-Length announced"):
        hub.download(server.url + "/blob", tmp_path / "blob", retries=0)
    assert list(tmp_path.iterdir()) == []
    assert hub.download(server.url + "/blob", tmp_path / "blob") == hub.hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("url, ok", [("http://example.invalid/hub", False), ("ftp://127.0.0.1/hub", False),
                                     ("http://127.0.0.1:1/hub", True), ("http://[::1]:1/hub", True),
                                     ("http://localhost:1/hub", True), ("https://example.invalid/hub", True)])
def test_plain_http_only_to_loopback_unless_allowed(url, ok):
    if ok:
        hub.check_url(url)
    else:
        with pytest.raises(hub.HubError, match="refusing plain http|unsupported URL scheme"):
            hub.check_url(url)
    hub.check_url("http://example.invalid/hub", allow_http=True)


def test_resolve_refuses_a_plain_http_mirror_before_any_request(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_PORT_HUB_URL", "http://example.invalid/models")  # never contacted
    monkeypatch.delenv("BERT_PORT_ALLOW_HTTP", raising=False)
    with pytest.raises(hub.HubError, match="BERT_PORT_ALLOW_HTTP"):
        hub.resolve("bert-base-uncased", cache_dir=tmp_path)
    assert not any(p.suffix != ".lock" for p in tmp_path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ tokenizer
def test_word_cache_is_bounded_in_bytes(tmp_path):
    """200 distinct 1 MiB inputs: the old cache kept every one alive (200 MiB)."""
    from bert_port.tokenization import BertTokenizer

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(200):
            word = f"{i:04d}" + "a" * (MiB - 4)  # one chunk of 1 MiB
            assert tok.tokenize(word) == ["[UNK]"]
            assert tok.tokenize(f"hello {i}x") == ["hello", "[UNK]"]
            del word
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < 16 * MiB, f"{kept / MiB:.0f} MiB kept alive by the tokenizer"
    assert tok.tokenize("hello") == ["hello"] and "hello" in tok._pieces  # short chunks are still cached


def test_word_cache_byte_budget_evicts(tmp_path):
    from bert_port.tokenization import BertTokenizer

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"), cache_bytes=64 * 1024)
    for i in range(5000):
        tok.tokenize(f"w{i:06d}" * 30)  # distinct 210-char chunks
        assert tok._pieces.used <= 64 * 1024
    assert 0 < len(tok._pieces) < 5000
