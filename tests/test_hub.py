"""bert_port.hub against a real HTTP server on 127.0.0.1 (tests/hub_server.py) playing the hub.

The served model is the tiny MegEngine fixture, under a registered test name and under a real
hub name (see tests/hub_server.py for why both).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from bert_port import cache, hub
from bert_port.cache import __main__ as cache_cli
from tests.hub_server import (  # noqa: F401  (fake_hub and server are fixtures)
    REAL_NAME, REAL_WEIGHTS, ROOT, TEST_NAME, TEST_WEIGHTS, HubServer, assert_matches_megengine, child_command,
    fake_hub, fixture_bytes, hub_env, run_model, server, sha,
)

# ------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("spelling, canonical, lower", [
    ("uncased_L-12_H-768_A-12", "uncased_L-12_H-768_A-12", True),
    ("uncased_L_12_H_768_A_12", "uncased_L-12_H-768_A-12", True),
    ("bert-base-uncased", "uncased_L-12_H-768_A-12", True),
    ("bert-large-uncased", "uncased_L-24_H-1024_A-16", True),
    ("bert-base-cased", "cased_L-12_H-768_A-12", False),
    ("bert-large-cased", "cased_L-24_H-1024_A-16", False),
    ("bert-base-chinese", "chinese_L-12_H-768_A-12", True),
    ("bert-base-multilingual-cased", "multi_cased_L-12_H-768_A-12", False),
    ("bert-large-uncased-whole-word-masking", "wwm_uncased_L-24_H-1024_A-16", True),
    ("bert-large-cased-whole-word-masking", "wwm_cased_L-24_H-1024_A-16", False),
    ("wwm_cased_L_24_H_1024_A_16", "wwm_cased_L-24_H-1024_A-16", False),
])
def test_names_aliases_and_casing(spelling, canonical, lower):
    assert hub.is_known_name(spelling)
    assert hub.canonical_name(spelling) == canonical
    assert hub.do_lower_case_for(spelling) is lower
    model = hub.get_model(spelling)
    assert model.weights.startswith("bert_") and model.weights.endswith(f"_{canonical}.pkl")
    assert model.weights_sha256 is None  # the real hub publishes none


def test_registry_has_the_eight_hub_models_with_their_ids():
    ids = {m: hub.get_model(m).weights.split("_")[1] for m in hub.known_names() if "_L-" in m}
    assert ids == {
        "uncased_L-12_H-768_A-12": "4f2157f7", "cased_L-12_H-768_A-12": "b9727c2f",
        "uncased_L-24_H-1024_A-16": "222f5012", "cased_L-24_H-1024_A-16": "01f2a65f",
        "chinese_L-12_H-768_A-12": "ee91be1a", "multi_cased_L-12_H-768_A-12": "283ceec5",
        "wwm_uncased_L-24_H-1024_A-16": "e2780a6a", "wwm_cased_L-24_H-1024_A-16": "0a8f1389",
    }


def test_unknown_name_and_bad_registrations():
    assert not hub.is_known_name("bert-base-klingon")
    with pytest.raises(ValueError, match="bert-base-klingon: not a known pretrained model name"):
        hub.resolve("bert-base-klingon")
    with pytest.raises(ValueError, match="not a valid hub model"):
        hub.HubModel("../evil", "x.pkl", True)
    with pytest.raises(ValueError, match="already names uncased_L-12_H-768_A-12"):
        hub.register(hub.HubModel("other", "x.pkl", True), aliases=["bert-base-uncased"])
    assert not hub.is_known_name("other")


def test_settings_come_from_the_environment_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("BERT_PORT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("BERT_PORT_HUB_URL", "http://127.0.0.1:9/hub/")
    s = hub.settings()
    assert (s.cache_dir, s.hub_url, s.offline) == (tmp_path / "a", "http://127.0.0.1:9/hub", False)
    assert hub.settings(tmp_path / "b").cache_dir == tmp_path / "b"
    monkeypatch.setenv("BERT_PORT_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="BERT_PORT_OFFLINE='maybe'"):
        hub.settings()


# ------------------------------------------------------------------------------- download


def test_download_resumes_a_cut_connection_with_range(server, tmp_path):
    data = os.urandom(300_000)
    server.files["/blob"] = data
    server.fail("/blob", "cut")
    dest = tmp_path / "blob"
    with pytest.raises(hub.HubError, match=r"/blob: download failed after 1 attempt.*kept in .*blob\.part"):
        hub.download(server.url + "/blob", dest, retries=0)
    part = tmp_path / "blob.part"
    kept = part.stat().st_size  # what arrived before the cut, up to one read chunk less
    assert not dest.exists() and 0 < kept <= len(data) // 2
    digest = hub.download(server.url + "/blob", dest, sha256=sha(data))
    assert dest.read_bytes() == data and digest == sha(data) and not part.exists()
    second = server.gets("/blob")[1]["headers"]
    assert second["Range"] == f"bytes={kept}-"


def test_download_retries_a_cut_within_one_call(server, tmp_path):
    data = os.urandom(600_000)  # a cut loses up to one 64 KiB read; this still makes progress each time
    server.files["/blob"] = data
    server.fail("/blob", "cut", "cut")
    assert hub.download(server.url + "/blob", tmp_path / "blob") == sha(data)
    assert (tmp_path / "blob").read_bytes() == data
    ranges = [r["headers"].get("Range") for r in server.gets("/blob")]
    offsets = [int(r[len("bytes="):-1]) for r in ranges[1:]]
    assert ranges[0] is None and len(offsets) == 2 and 0 < offsets[0] < offsets[1] < len(data)


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    data = os.urandom(50_000)
    server.files["/blob"] = data
    (tmp_path / "blob.part").write_bytes(b"stale bytes from another version")
    server.fail("/blob", "ignore-range")
    assert hub.download(server.url + "/blob", tmp_path / "blob", sha256=sha(data)) == sha(data)
    assert (tmp_path / "blob").read_bytes() == data
    assert server.gets("/blob")[0]["headers"]["Range"] == "bytes=32-"


@pytest.mark.parametrize("kept", ["whole", "too long"])
def test_download_of_a_part_the_server_cannot_extend(server, tmp_path, kept):
    data = os.urandom(10_000)
    server.files["/blob"] = data
    (tmp_path / "blob.part").write_bytes(data if kept == "whole" else data + b"junk")
    assert hub.download(server.url + "/blob", tmp_path / "blob", sha256=sha(data)) == sha(data)
    assert (tmp_path / "blob").read_bytes() == data and not (tmp_path / "blob.part").exists()
    assert len(server.gets("/blob")) == (1 if kept == "whole" else 2)  # 416, then (too long) afresh


def test_download_retries_5xx_then_succeeds(server, tmp_path):
    data = b"x" * 1000
    server.files["/blob"] = data
    server.fail("/blob", 500, 503)
    assert hub.download(server.url + "/blob", tmp_path / "blob") == sha(data)
    assert len(server.gets("/blob")) == 3


def test_download_gives_up_after_bounded_retries(server, tmp_path):
    server.files["/blob"] = b"x"
    server.fail("/blob", *[500] * 10)
    with pytest.raises(hub.HubError, match=r"/blob: download failed after 3 attempt\(s\): HTTP 500"):
        hub.download(server.url + "/blob", tmp_path / "blob", retries=2)
    assert len(server.gets("/blob")) == 3 and not (tmp_path / "blob").exists()


def test_download_404_names_the_url_and_is_not_retried(server, tmp_path):
    url = server.url + "/nope/vocab.txt"
    with pytest.raises(hub.HubError, match=f"{url}: HTTP 404"):
        hub.download(url, tmp_path / "vocab.txt")
    assert len(server.gets("/nope/vocab.txt")) == 1
    assert list(tmp_path.iterdir()) == []


def test_download_sha256_mismatch_deletes_the_bytes(server, tmp_path):
    server.files["/blob"] = b"wrong bytes"
    expected = sha(b"right bytes")
    with pytest.raises(hub.HubError, match=f"/blob: sha256 mismatch: expected {expected}, got {sha(b'wrong bytes')}"):
        hub.download(server.url + "/blob", tmp_path / "blob", sha256=expected)
    assert list(tmp_path.iterdir()) == []


def test_download_connection_refused_fails_at_once(server, tmp_path, caplog):  # server: isolated env
    with HubServer({}) as stopped:
        url = stopped.url + "/gone"
    started = time.monotonic()
    with pytest.raises(hub.HubError, match=f"^{url}: connection refused by 127.0.0.1") as e:
        hub.download(url, tmp_path / "gone", retries=5, retry_delay=1.0)
    assert time.monotonic() - started < 1.0 and "retrying" not in caplog.text  # a refusal is not retried
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained requests/urllib3 traceback


def _load_in_child(env, name="bert-base-uncased"):
    """`BertModel.from_pretrained(name)` in a fresh interpreter, as a user's script would run it."""
    code = f"from bert_port import BertModel\nBertModel.from_pretrained({name!r})\n"
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - started


@pytest.mark.parametrize("where", ["stopped loopback hub", "unresolvable host"])
def test_an_unreachable_hub_fails_fast_and_short_naming_the_ways_out(tmp_path, where):
    if where == "stopped loopback hub":
        with HubServer({}) as stopped:
            url = stopped.url
    else:
        url = "https://nonexistent.invalid/"  # .invalid never resolves (RFC 2606)
    env = hub_env(url, tmp_path / "cache", BERT_PORT_RETRY_DELAY="1")  # a retry would cost seconds
    r, seconds = _load_in_child(env)
    assert r.returncode == 1 and seconds < 10, (seconds, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 25 and "During handling" not in r.stderr and "direct cause" not in r.stderr, r.stderr
    last = lines[-1]
    assert last.startswith(f"bert_port.hub.HubError: {REAL_NAME}: {url.rstrip('/')}/{REAL_NAME}/"), last
    assert ("connection refused" if where.startswith("stopped") else "cannot resolve the host name") in last
    for way_out in ("BERT_PORT_OFFLINE=1", "a local model directory", f"python -m bert_port.cache fetch {REAL_NAME}"):
        assert way_out in last, last
    assert not (tmp_path / "cache" / "downloads").exists()


# ------------------------------------------------------------------------------- resolve


def test_from_pretrained_downloads_converts_then_works_from_cache(fake_hub):
    from bert_port import BertTokenizer

    assert_matches_megengine(run_model("bert-base-uncased"))
    entry = fake_hub.cache / REAL_NAME
    assert {"config.json", "model.safetensors", "vocab.txt", cache.MANIFEST} <= {p.name for p in entry.iterdir()}
    assert not (fake_hub.cache / "downloads").exists()
    requested = sorted(r["path"] for r in fake_hub.server.gets())
    assert requested == sorted(f"/{REAL_NAME}/{f}" for f in ("bert_config.json", "vocab.txt", REAL_WEIGHTS))
    manifest = json.loads((entry / cache.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == cache.sha256_file(entry / "model.safetensors")
    assert manifest["source"]["files"][REAL_WEIGHTS]["sha256"] == sha(fixture_bytes()[0])

    fake_hub.server.stop()
    assert_matches_megengine(run_model("uncased_L_12_H_768_A_12"))
    tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
    assert tokenizer.vocab == BertTokenizer(str(entry / "vocab.txt")).vocab


def test_cache_dir_argument_overrides_the_environment(fake_hub, tmp_path):
    run_model(TEST_NAME, cache_dir=tmp_path / "elsewhere")
    assert not cache.check_entry(tmp_path / "elsewhere" / TEST_NAME)
    assert not fake_hub.cache.exists()


def test_resolve_resumes_after_a_cut_connection(fake_hub, monkeypatch):
    monkeypatch.setenv("BERT_PORT_RETRIES", "0")
    fake_hub.server.fail(fake_hub.weights_path, "cut")
    with pytest.raises(hub.HubError, match=f"{fake_hub.weights_path}: download failed.*to resume"):
        hub.resolve(TEST_NAME)
    assert (fake_hub.cache / "downloads" / TEST_NAME / (TEST_WEIGHTS + ".part")).is_file()
    assert cache.check_entry(fake_hub.cache / TEST_NAME)  # not complete
    entry = hub.resolve(TEST_NAME)
    ranges = [r["headers"].get("Range") for r in fake_hub.server.gets(fake_hub.weights_path)]
    size = len(fixture_bytes()[0])
    assert ranges == [None, f"bytes={size // 2}-"]
    assert_matches_megengine(run_model(entry))


def test_resolve_retries_500_twice_then_succeeds(fake_hub):
    fake_hub.server.fail(fake_hub.weights_path, 500, 500)
    assert_matches_megengine(run_model(TEST_NAME))
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 3


def test_resolve_404_names_the_url(fake_hub):
    del fake_hub.server.files[fake_hub.weights_path]
    with pytest.raises(hub.HubError, match=f"{fake_hub.server.url}{fake_hub.weights_path}: HTTP 404"):
        hub.resolve(TEST_NAME)
    assert not (fake_hub.cache / TEST_NAME).exists()
    assert not (fake_hub.cache / "downloads").exists()


def test_resolve_wrong_bytes_with_known_sha256_leaves_no_file(fake_hub):
    good = fake_hub.server.files[fake_hub.weights_path]
    fake_hub.server.files[fake_hub.weights_path] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(hub.HubError, match=f"{fake_hub.weights_path}: sha256 mismatch: expected {sha(good)}"):
        hub.resolve(TEST_NAME)
    leftovers = [p for p in fake_hub.cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert leftovers == []


def test_a_corrupt_leftover_download_is_fetched_again(fake_hub):
    """A completed file left in downloads/ by an interrupted run is reused only if its sha256 is
    the known one: one flipped byte inside tensor data (the conversion would still succeed) means
    one fresh request, and the manifest records the good digest."""
    from converters.mge_pickle import load_mge_pickle

    good = fixture_bytes()[0]
    table = load_mge_pickle(ROOT / "tests" / "fixtures" / "mge" / "hub_bert.pkl")["embeddings.word_embeddings.weight"]
    at = good.find(table.tobytes()) + table.nbytes // 2  # the middle of the word-embedding table's float data
    assert at > table.nbytes // 2
    leftover = fake_hub.cache / "downloads" / TEST_NAME / TEST_WEIGHTS
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1:])
    entry = hub.resolve(TEST_NAME)
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 1
    manifest = json.loads((entry / cache.MANIFEST).read_text())
    assert manifest["source"]["files"][TEST_WEIGHTS]["sha256"] == sha(good)
    assert_matches_megengine(run_model(entry))


def test_resolve_offline_with_empty_cache_makes_no_request(fake_hub, monkeypatch):
    monkeypatch.setenv("BERT_PORT_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=f"{TEST_NAME}: not in the cache .*BERT_PORT_OFFLINE=1.*"
                                           f"python -m bert_port.cache fetch {TEST_NAME}"):
        run_model(TEST_NAME)
    with pytest.raises(hub.HubError, match="BERT_PORT_OFFLINE=1"):
        hub.resolve_vocab(TEST_NAME)
    assert fake_hub.server.gets() == []


def test_resolve_vocab_fetches_only_the_vocab_with_its_casing(fake_hub):
    from bert_port import BertTokenizer

    vocab = hub.resolve_vocab(TEST_NAME)
    assert vocab.read_bytes() == fixture_bytes()[2]
    assert [r["path"] for r in fake_hub.server.gets()] == [f"/{TEST_NAME}/vocab.txt"]
    assert json.loads((vocab.parent / "tokenizer_config.json").read_text()) == {"do_lower_case": True}
    BertTokenizer.from_pretrained(TEST_NAME)  # the tokenizer goes through resolve_vocab
    hub.resolve(TEST_NAME)  # reuses the vocab it already has
    assert [r["path"] for r in fake_hub.server.gets()].count(f"/{TEST_NAME}/vocab.txt") == 1
    assert hub.resolve_vocab(TEST_NAME) == fake_hub.cache / TEST_NAME / "vocab.txt"


def test_a_converted_dir_without_manifest_is_not_trusted(fake_hub):
    entry = hub.resolve(TEST_NAME)
    (entry / cache.MANIFEST).unlink()  # as if killed before the completion mark
    (entry / "model.safetensors").write_bytes(b"half")
    assert_matches_megengine(run_model(TEST_NAME))
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 2


@pytest.mark.slow  # four processes importing torch behind a ~4 s download: ~9 s of the README's test command
def test_four_processes_download_each_file_once(fake_hub, tmp_path):
    fake_hub.server.throttle(fake_hub.weights_path, 20_000)  # ~4 s: all four reach the lock meanwhile
    outs = [tmp_path / f"out{i}.npz" for i in range(4)]
    procs = [subprocess.Popen(child_command(out), env=fake_hub.env(), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for out in outs]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()
    for out in outs:
        assert_matches_megengine(np.load(out))
    counts = {path: len(fake_hub.server.gets(path)) for path in
              (f"/{TEST_NAME}/bert_config.json", f"/{TEST_NAME}/vocab.txt", fake_hub.weights_path)}
    assert set(counts.values()) == {1}, counts


# ------------------------------------------------------------------------------- cache CLI


def test_cache_cli_fetch_list_remove(fake_hub, capsys, monkeypatch):
    assert cache_cli.main(["fetch", "bert-tiny-test"]) == 0
    assert capsys.readouterr().out.strip() == str(fake_hub.cache / TEST_NAME)
    monkeypatch.setenv("BERT_PORT_RETRIES", "0")
    fake_hub.server.fail(fake_hub.real_weights_path, "cut")
    with pytest.raises(hub.HubError):
        hub.resolve("bert-base-uncased")  # leaves a partial download behind

    assert cache_cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{TEST_NAME} +\d+\.\d KiB  complete$", out, re.M), out
    assert re.search(rf"^{REAL_NAME} +.*download in progress or interrupted$", out, re.M), out

    (fake_hub.cache / TEST_NAME / "vocab.txt").write_text("short")
    assert cache_cli.main(["list"]) == 0
    assert re.search(rf"^{TEST_NAME} .* corrupt$", capsys.readouterr().out, re.M)

    assert cache_cli.main(["remove", "bert-base-uncased", TEST_NAME]) == 0
    removed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in removed] == [f"removed {REAL_NAME}", f"removed {TEST_NAME}"]
    assert not (fake_hub.cache / TEST_NAME).exists() and not (fake_hub.cache / "downloads").exists()

    assert cache_cli.main(["remove", TEST_NAME]) == 1
    assert f"error: {TEST_NAME}: not in the cache {fake_hub.cache}" in capsys.readouterr().err
    assert cache_cli.main(["list"]) == 0
    assert capsys.readouterr().out.startswith("(no models in")


def test_cache_cli_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["remove"]):
        with pytest.raises(SystemExit) as e:
            cache_cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m bert_port.cache") and "(see --help)" in err and err.count("\n") == 1


def test_cache_cli_reports_errors_in_one_line(fake_hub, capsys, monkeypatch):
    monkeypatch.setenv("BERT_PORT_OFFLINE", "1")
    assert cache_cli.main(["fetch", "bert-base-uncased"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {REAL_NAME}: not in the cache") and err.count("\n") == 1
    assert "unset BERT_PORT_OFFLINE" in err and "cache fetch" not in err  # never "run the command that failed"
    assert cache_cli.main(["fetch", "bert-base-klingon"]) == 1
    assert "error: bert-base-klingon: not a known pretrained model name" in capsys.readouterr().err
