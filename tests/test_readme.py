"""Every fenced ```python and ```bash block of the docs runs as written, offline, in a fresh copy of
the repository after the Quick start (its demo has left ./bert_port-demo-model).

A block opts out only by a word after its language, which says what it needs:
  ```bash setup     installs packages (the Quick start itself): not run here
  ```bash manual    minutes of work (benchmarks): each command's --help must run
  ```bash network   run against the loopback hub (tests/hub_server.py) serving the tiny fixture
                    under the real name bert-base-uncased, with an empty cache
  ```bash slow      run when slow tests are (BERT_PORT_SLOW_TESTS=1, as in .ci/run)
Any other word fails the test, so a new block is run without anyone editing this file.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Tuple

import pytest

from tests.conftest import ROOT
from tests.hub_server import REAL_NAME, REAL_WEIGHTS, HubServer, hub_env, hub_files

DOCS = ("README.md", "ARCHITECTURE.md", "SECURITY.md", "bench/README.md")
TAGS = {"setup", "manual", "network", "slow"}
LANGUAGES = {"python", "bash"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
LOCAL = {"bert_port-demo-model", ".git", ".venv", ".ci-venv"}  # made in the copy, or not part of a clone


class Block(NamedTuple):
    doc: str
    line: int
    language: str
    tags: Tuple[str, ...]
    code: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> List[Block]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            words = m.group(1).split()
            if words and words[0] in LANGUAGES:
                found.append(Block(doc, text.count("\n", 0, m.start()) + 1, words[0], tuple(words[1:]), m.group(2)))
    return found


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The repository as a fresh clone sees it (links to its files), after the Quick start's demo."""
    root = tmp_path_factory.mktemp("clone")
    for entry in ROOT.iterdir():
        if entry.name not in LOCAL and not entry.name.startswith(".pytest"):
            (root / entry.name).symlink_to(entry)
    r = subprocess.run([sys.executable, "-m", "bert_port.demo"], cwd=root, env=env(root), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and (root / "bert_port-demo-model" / "config.json").is_file(), r.stdout + r.stderr
    return root


def env(root: Path, **extra: str) -> dict:
    """Offline, an empty cache, one thread, the package importable as after `pip install -e .`."""
    base = hub_env("http://127.0.0.1:9", root / "empty-cache", BERT_PORT_OFFLINE="1")
    base.update(extra, OMP_NUM_THREADS="1")
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])  # python, torchrun
    return base


def run_block(block: Block, cwd: Path, environ: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    if block.language == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", block.code]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


def test_every_block_is_run_or_says_what_it_needs():
    found = blocks()
    assert len(found) >= 8, [b.id for b in found]
    for b in found:
        assert set(b.tags) <= TAGS, f"{b.id}: unknown tag(s) {set(b.tags) - TAGS}; known: {sorted(TAGS)}"
        if b.tags and b.tags != ("slow",):
            assert b.code.lstrip().startswith("#") or b.tags == ("setup",), \
                f"{b.id}: a ```{b.language} {' '.join(b.tags)} block starts with a comment saying what it needs"


def _params(kind: str):
    out = []
    for b in blocks():
        if kind == "run" and not {"setup", "manual", "network"} & set(b.tags):
            marks = [pytest.mark.slow] if "slow" in b.tags else []
            out.append(pytest.param(b, id=b.id, marks=marks))
        elif kind in b.tags:
            out.append(pytest.param(b, id=b.id))
    return out


@pytest.mark.parametrize("block", _params("run"))
def test_block_runs_offline(clone, block):
    r = run_block(block, clone, env(clone))
    assert r.returncode == 0, f"{block.id}:\n{block.code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("block", _params("network"))
def test_network_block_runs_against_the_loopback_hub(clone, block, tmp_path):
    with HubServer(hub_files(REAL_NAME, REAL_WEIGHTS)) as hub:
        environ = env(clone, **hub_env(hub.url, tmp_path / "cache"))
        environ.pop("BERT_PORT_OFFLINE", None)
        r = run_block(block, clone, environ)
    assert r.returncode == 0, f"{block.id}:\n{block.code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    assert (tmp_path / "cache" / REAL_NAME / "model.safetensors").is_file()


@pytest.mark.parametrize("block", _params("manual"))
def test_manual_block_commands_exist(clone, block):
    """Long-running commands are not run, but each must exist and parse: `--help` exits 0."""
    commands = [line.split("#")[0].strip() for line in block.code.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert commands, block.id
    argvs = [shlex.split(command) for command in commands]
    assert all(argv[0] == "python" for argv in argvs), f"{block.id}: {commands!r}"
    procs = [subprocess.Popen([sys.executable, *argv[1:], "--help"], cwd=clone, env=env(clone), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]  # all at once
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage" in out.lower(), f"{command} --help:\n{err[-2000:]}"
