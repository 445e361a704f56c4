"""The model cache under faults: disk full, SIGKILL mid-download and mid-conversion, corruption.

The invariant: whatever happens, no later run mistakes a partial entry for a complete one, and a
failed run leaves the cache as it found it (apart from its `<NAME>.lock` file).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bert_port import cache, hub
from tests.hub_server import (  # noqa: F401  (fake_hub is a fixture)
    REAL_NAME, ROOT, TEST_NAME, TEST_WEIGHTS, assert_matches_megengine, child_command, fake_hub, fixture_bytes,
    run_model,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks, signals and rlimits: POSIX only")


def snapshot(root):
    """Every file under the cache (but lock files) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def start_child(fake_hub, tmp_path, **kw):
    return subprocess.Popen(child_command(tmp_path / "out.npz", **kw), env=fake_hub.env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_not_complete(fake_hub, monkeypatch):
    """Nothing in the cache passes for the model: offline, resolving it is a miss."""
    assert cache.check_entry(fake_hub.cache / TEST_NAME)
    monkeypatch.setenv("BERT_PORT_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="BERT_PORT_OFFLINE=1"):
        hub.resolve(TEST_NAME)
    monkeypatch.delenv("BERT_PORT_OFFLINE")


def test_disk_full_mid_download_leaves_the_cache_as_it_was(fake_hub, tmp_path):
    hub.resolve(REAL_NAME)  # something already in the cache, which must survive untouched
    before = snapshot(fake_hub.cache)
    weights_size = len(fixture_bytes()[0])
    child = start_child(fake_hub, tmp_path, fsize_limit=weights_size // 2)  # kernel: EFBIG past this size
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1, err
    assert f"{TEST_WEIGHTS}.part: cannot write while downloading" in err and "File too large" in err
    assert "Traceback" not in err
    assert snapshot(fake_hub.cache) == before
    assert_matches_megengine(run_model(TEST_NAME))  # and the next run, with room, works


def test_sigkill_mid_download_then_resume(fake_hub, tmp_path, monkeypatch):
    weights_size = len(fixture_bytes()[0])
    fake_hub.server.throttle(fake_hub.weights_path, 20_000)  # ~4 s for the weights
    child = start_child(fake_hub, tmp_path)
    fake_hub.server.wait_sent(fake_hub.weights_path, weights_size // 3)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    fake_hub.server.throttle(fake_hub.weights_path, None)
    part = fake_hub.cache / "downloads" / TEST_NAME / (TEST_WEIGHTS + ".part")
    assert 0 < part.stat().st_size < weights_size
    assert_not_complete(fake_hub, monkeypatch)

    assert_matches_megengine(run_model(TEST_NAME))
    last = fake_hub.server.gets(fake_hub.weights_path)[-1]
    assert last["headers"].get("Range", "").startswith("bytes=")  # resumed, not restarted


def test_sigkill_mid_conversion_leaves_nothing_that_passes_for_complete(fake_hub, tmp_path, monkeypatch):
    marker = tmp_path / "converted"
    child = start_child(fake_hub, tmp_path, hang_after_convert=marker)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.communicate()[1]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    staged = list(fake_hub.cache.glob(f".{TEST_NAME}.*.tmp/{TEST_NAME}/model.safetensors"))
    assert staged, "the child was killed with converted files in its staging dir"
    assert not (fake_hub.cache / TEST_NAME).exists()
    assert_not_complete(fake_hub, monkeypatch)

    assert_matches_megengine(run_model(TEST_NAME))
    assert list(fake_hub.cache.glob(".*.tmp")) == []  # swept
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 1  # the finished download was reused


def verify(fake_hub, *args):
    return subprocess.run([sys.executable, "-m", "bert_port.cache", "verify", *args], env=fake_hub.env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_corruption_is_reported_by_verify_and_refetched_by_the_next_load(fake_hub):
    entry = hub.resolve(TEST_NAME)
    weights = entry / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last tensor, size and (below) mtime unchanged
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.check_entry(entry) == []  # the cheap per-load check cannot see this one...

    result = verify(fake_hub)
    assert result.returncode == 1
    assert f"{TEST_NAME}: CORRUPT: model.safetensors: sha256" in result.stdout
    assert "Traceback" not in result.stderr

    assert_matches_megengine(run_model(TEST_NAME))  # ...but after verify, the next load re-fetches
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 2
    assert verify(fake_hub).returncode == 0


@pytest.mark.parametrize("damage", ["truncate", "rewrite"])
def test_the_next_load_detects_damage_without_verify(fake_hub, damage):
    entry = hub.resolve(TEST_NAME)
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100] if damage == "truncate" else data[:-4] + b"\0\0\0\0")  # new mtime
    assert_matches_megengine(run_model(TEST_NAME))
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 2


def test_an_unchanged_copy_is_rehashed_once_not_refetched(fake_hub):
    entry = hub.resolve(TEST_NAME)
    for p in entry.iterdir():
        os.utime(p, ns=(0, 0))  # as after a copy that did not keep mtimes
    assert cache.check_entry(entry) == []
    assert len(fake_hub.server.gets(fake_hub.weights_path)) == 1
    manifest = cache.read_manifest(entry)
    assert manifest["files"]["model.safetensors"]["mtime_ns"] == 0  # refreshed: the next check is a stat


def test_verify_fix_refetches_a_hub_model(fake_hub):
    entry = hub.resolve(REAL_NAME)
    (entry / "vocab.txt").write_bytes(b"[PAD]\n")
    result = verify(fake_hub, "--fix")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{REAL_NAME}: CORRUPT: vocab.txt" in result.stdout and f"{REAL_NAME}: re-fetched" in result.stdout
    assert cache.check_entry(entry, full=True) == []
    assert len(fake_hub.server.gets(fake_hub.real_weights_path)) == 2


def test_bad_hub_bytes_without_known_sha256_leave_nothing(fake_hub):
    fake_hub.server.files[fake_hub.real_weights_path] = b"\x80\x04not a pickle"
    with pytest.raises(hub.HubError, match=f"{REAL_NAME}: cannot convert the hub files"):
        hub.resolve(REAL_NAME)
    assert snapshot(fake_hub.cache) == {}
    assert list(fake_hub.cache.glob(".*")) == []
