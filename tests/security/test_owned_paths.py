"""Issue 18.1 and 20.3: every create, rename and delete stays inside the root a command owns.

Before: a symbolic link inside the cache root (`downloads/`, an entry, a lock file) let cache
commands create or delete things outside it with exit 0; `torch2tf` deleted existing shards it had
not written, without --force; `cache verify` called a folder of venvs a corrupt model; `remove` left
its lock; `list` and `verify` disagreed on an interrupted download; `cache fetch` offline told the
user to run `cache fetch`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bert_port import cache, hub
from converters import owned
from converters.text import shown
from tests.hub_server import REAL_NAME, TEST_NAME, fake_hub, hub_env, server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
MGE = ROOT / "tests" / "fixtures" / "mge"


def run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env or {**os.environ, "PYTHONPATH": str(ROOT)})


def tree(path: Path) -> dict:
    """Every path under `path` (links not followed) with its kind and content: a before/after snapshot."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
        else:
            out[str(p.relative_to(path))] = "dir"
    return out


@pytest.fixture
def victim(tmp_path):
    v = tmp_path / "victim"
    (v / TEST_NAME).mkdir(parents=True)
    (v / TEST_NAME / "precious.txt").write_text("keep me")
    (v / "bert_port_manifest.json").write_text("{}")
    return v


# ------------------------------------------------------------------------------ the layer itself
def test_contained_refuses_links_and_dotdot(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert owned.contained(tmp_path, tmp_path / "real" / "x") == tmp_path / "real" / "x"
    assert owned.contained(tmp_path, tmp_path / "link") == tmp_path / "link"  # the link itself: acted on, not followed
    for bad in (tmp_path / "link" / "x", tmp_path / ".." / "x", tmp_path.parent / "x"):
        with pytest.raises(owned.UnsafePath):
            owned.contained(tmp_path, bad)
    with pytest.raises(owned.UnsafePath):
        owned.make_dirs(tmp_path, tmp_path / "link" / "sub")
    assert list((tmp_path / "real").iterdir()) == []


def test_remove_tree_removes_links_not_targets(tmp_path, victim):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "inner").symlink_to(victim)
    (root / "top").symlink_to(victim)
    before = tree(victim)
    assert owned.remove_tree(root, root / "d") and owned.remove_tree(root, root / "top")
    assert list(root.iterdir()) == [] and tree(victim) == before
    with pytest.raises(owned.UnsafePath):
        (root / "via").symlink_to(victim)
        owned.remove_tree(root, root / "via" / TEST_NAME)
    assert tree(victim) == before


def test_lock_files_are_never_followed(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "m.lock").symlink_to(tmp_path / "created-outside")
    with pytest.raises(owned.UnsafePath):
        with cache.lock(root / "m.lock", "m"):
            pass
    assert not (tmp_path / "created-outside").exists()


def test_shown_escapes_and_cuts():
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert len(shown("é" * 10_000)) == 200 and shown("é" * 10_000).endswith("…")
    assert shown("\u202eevil") == "\\u202eevil"


# ------------------------------------------------------------------------------ cache commands
@pytest.mark.parametrize("command", ["remove", "verify", "list"])
def test_cache_commands_never_follow_a_linked_downloads_folder(tmp_path, victim, command):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "downloads").symlink_to(victim)
    before = tree(victim)
    r = run("-m", "bert_port.cache", "--cache-dir", root, command, *([TEST_NAME] if command != "list" else []))
    assert tree(victim) == before, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    if command == "remove":
        assert r.returncode == 1 and "not in the cache" in r.stderr


def test_resolve_never_creates_through_a_linked_downloads_folder(fake_hub, victim):
    (fake_hub.cache).mkdir(parents=True, exist_ok=True)
    (fake_hub.cache / "downloads").symlink_to(victim)
    before = tree(victim)
    with pytest.raises(hub.HubError, match="symbolic link inside"):
        hub.resolve(TEST_NAME)
    assert tree(victim) == before


@pytest.mark.parametrize("command", ["verify", "list", "remove"])
def test_a_linked_entry_is_not_a_model_and_its_target_is_untouched(tmp_path, victim, command):
    root = tmp_path / "cache"
    root.mkdir()
    (root / TEST_NAME).symlink_to(victim)
    before = tree(victim)
    r = run("-m", "bert_port.cache", "--cache-dir", root, command, *([TEST_NAME] if command != "list" else []))
    assert "Traceback" not in r.stderr and tree(victim) == before
    if command == "remove":  # the link itself goes
        assert r.returncode == 0 and not os.path.lexists(root / TEST_NAME)
    else:
        assert "not a model" in r.stdout, r.stdout


def test_sweep_removes_a_linked_temp_dir_itself(tmp_path, victim):
    root = tmp_path / "cache"
    root.mkdir()
    (root / f".{TEST_NAME}.abc123.tmp").symlink_to(victim)
    before = tree(victim)
    cache.sweep_temp_dirs(root, TEST_NAME)
    assert list(root.iterdir()) == [] and tree(victim) == before


def test_verify_calls_a_non_model_folder_not_a_model(tmp_path):
    """tools/live-envs used to keep its venvs in the cache: verify exited 1 calling them CORRUPT."""
    root = tmp_path / "cache"
    (root / "live-envs" / "tf-py3.11" / "bin").mkdir(parents=True)
    (root / "live-envs" / "tf-py3.11" / "bin" / "python").write_text("#!")
    before = tree(root)
    r = run("-m", "bert_port.cache", "--cache-dir", root, "verify")
    assert r.returncode == 0 and "live-envs: not a model" in r.stdout and "CORRUPT" not in r.stdout, r.stdout
    r = run("-m", "bert_port.cache", "--cache-dir", root, "list")
    assert r.returncode == 0 and "not a model" in r.stdout and "incomplete" not in r.stdout, r.stdout
    r = run("-m", "bert_port.cache", "--cache-dir", root, "remove", "live-envs")
    assert r.returncode == 1 and "not a model" in r.stderr
    assert tree(root) == before


def test_remove_removes_its_lock(fake_hub):
    hub.resolve(TEST_NAME)
    assert (fake_hub.cache / f"{TEST_NAME}.lock").exists()
    r = run("-m", "bert_port.cache", "remove", TEST_NAME, env=fake_hub.env())
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in fake_hub.cache.iterdir()) == []


def test_list_and_verify_agree_on_an_interrupted_download(fake_hub, monkeypatch):
    monkeypatch.setenv("BERT_PORT_RETRIES", "0")
    fake_hub.server.fail(fake_hub.real_weights_path, "cut")
    with pytest.raises(hub.HubError):
        hub.resolve(REAL_NAME)
    env = fake_hub.env()
    listed = run("-m", "bert_port.cache", "list", env=env)
    verified = run("-m", "bert_port.cache", "verify", env=env)
    named = run("-m", "bert_port.cache", "verify", REAL_NAME, env=env)
    phrase = "download in progress or interrupted"
    assert phrase in listed.stdout and phrase in verified.stdout and phrase in named.stdout, (listed, verified, named)
    assert verified.returncode == 0  # nothing is corrupt
    assert named.returncode == 1  # but the named model is not there to use


def test_fetch_offline_does_not_suggest_fetch(fake_hub):
    r = run("-m", "bert_port.cache", "fetch", REAL_NAME, env={**fake_hub.env(), "BERT_PORT_OFFLINE": "1"})
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cache fetch" not in r.stderr and "BERT_PORT_OFFLINE" in r.stderr


def test_live_envs_default_is_outside_the_model_cache():
    text = (ROOT / "tools" / "live-envs").read_text()
    default = next(ln for ln in text.splitlines() if ln.startswith("ROOT_DIR="))
    assert "bert_port-live-envs" in default and "bert_port/" not in default


# ------------------------------------------------------------------------------ converter outputs
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("owned") / "model"
    r = run("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_torch2tf_never_deletes_shards_it_did_not_write_without_force(model_dir, tmp_path):
    foreign = tmp_path / "model.ckpt.data-00000-of-00002"
    foreign.write_bytes(b"someone else's shard")
    r = run("-m", "converters.torch2tf", model_dir, "--out", tmp_path / "model.ckpt")
    assert r.returncode == 1 and "already exists (use --force" in r.stderr
    assert foreign.read_bytes() == b"someone else's shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]


def test_torch2tf_force_replaces_the_bundle_and_names_what_it_replaced(model_dir, tmp_path):
    for n in ("model.ckpt.index", "model.ckpt.data-00000-of-00002", "model.ckpt.data-00001-of-00002"):
        (tmp_path / n).write_bytes(b"old")
    (tmp_path / "model.ckpt.other").write_bytes(b"not a bundle file")
    r = run("-m", "converters.torch2tf", model_dir, "--out", tmp_path / "model.ckpt", "--force")
    assert r.returncode == 0, r.stderr
    assert "model.ckpt.data-00001-of-00002" in r.stdout  # named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt.data-00000-of-00001", "model.ckpt.index",
                                                          "model.ckpt.other"]


@pytest.mark.parametrize("command, name", [("converters.torch2tf", "model.ckpt.index"), ("converters.torch2mge", "m.pkl")])
def test_force_never_replaces_a_link_or_directory(model_dir, tmp_path, victim, command, name):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).symlink_to(victim / "bert_port_manifest.json")
    before = tree(victim)
    out = tmp_path / "out" / (name[:-len(".index")] if name.endswith(".index") else name)
    r = run("-m", command, model_dir, "--out", out, "--force")
    assert r.returncode == 1 and "not a regular file" in r.stderr and tree(victim) == before


def test_converter_output_links_are_foreign(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").symlink_to(victim / "bert_port_manifest.json")
    before = tree(victim)
    r = run("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
            "--out", out, "--force")
    assert r.returncode == 1 and "'model.safetensors'" in r.stderr and tree(victim) == before


def test_save_vocabulary_replaces_a_link_instead_of_writing_through_it(tmp_path, victim):
    from bert_port.tokenization import BertTokenizer

    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\nhello\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "vocab.txt").symlink_to(victim / "bert_port_manifest.json")
    before = tree(victim)
    BertTokenizer(str(tmp_path / "v.txt")).save_vocabulary(out)
    assert tree(victim) == before and not (out / "vocab.txt").is_symlink()


def test_a_waiter_after_remove_holds_the_lock_on_the_live_file(tmp_path):
    """`remove` unlinks the lock file while holding it: a process that was waiting must not end up
    holding a lock on the unlinked file while a newcomer locks a fresh one."""
    import fcntl
    import threading

    path = tmp_path / "m.lock"
    acquired, release = threading.Event(), threading.Event()

    def waiter():
        with cache.lock(path, "m"):
            acquired.set()
            release.wait(10)

    with cache.lock(path, "m"):
        t = threading.Thread(target=waiter)
        t.start()
        assert not acquired.wait(0.3)  # blocked behind us
        cache.remove_lock(path)
    assert acquired.wait(10)
    fd = os.open(path, os.O_RDWR)  # the waiter re-created and locked the file at the path
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        release.set()
        t.join(10)
