"""Issue 18.5: a full disk in every output format is one line, a non-zero exit and nothing half-written.

The disk is made "full" for the child alone with RLIMIT_FSIZE: any write that would grow a file past
16 KiB fails with EFBIG (Python ignores SIGXFSZ), in Python, numpy, torch's C++ writer, safetensors'
Rust writer and the ONNX exporter alike, which is what ENOSPC does to them. The small files written
before the weights (config.json) stay below the cap, so each case fails in the middle of its
weights file: the case a temp-then-rename writer must survive.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests import finetune_data as FD

ROOT = Path(__file__).resolve().parents[2]
MGE = ROOT / "tests" / "fixtures" / "mge"
CAP = 16 << 10


def run_full(*args, cap=CAP, timeout=300):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env, preexec_fn=limit if cap else None)


def one_line_failure(r) -> str:
    assert r.returncode not in (0, None) and r.returncode > 0, (r.returncode, r.stdout, r.stderr[-3000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1 and ("File too large" in errors[0] or "is the disk full?" in errors[0]), r.stderr[-3000:]
    assert "nothing was written" in errors[0], errors[0]
    return errors[0]


def no_temp_files(directory: Path):
    left = [p.name for p in directory.rglob(".*")]
    assert left == [], left


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "model"
    r = run_full("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
                 "--out", out, cap=None)
    assert r.returncode == 0, r.stderr
    words = sorted({w.lower() for s in FD.generate(8, "train", seed=1) for w in s[0]})
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_converter_outputs(tmp_path, fmt):
    out = tmp_path / "out"
    r = run_full("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
                 "--out", out, "--format", fmt)
    one_line_failure(r)
    assert list(tmp_path.iterdir()) == []  # no output directory, no temp directory


@pytest.mark.parametrize("command, name", [("converters.torch2tf", "tf/model.ckpt"), ("converters.torch2mge", "m.pkl")])
def test_export_formats(model_dir, tmp_path, command, name):
    r = run_full("-m", command, model_dir, "--out", tmp_path / name)
    one_line_failure(r)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_force_over_an_old_output_keeps_it_when_the_disk_is_full(model_dir, tmp_path):
    """The previous output is replaced only once the new one is whole."""
    out = tmp_path / "old"
    old = run_full("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
                   "--out", out, cap=None)
    assert old.returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_full("-m", "converters.mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json",
                 "--out", out, "--force")
    one_line_failure(r)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    no_temp_files(tmp_path)


@pytest.mark.slow
def test_onnx_export(model_dir, tmp_path):
    pytest.importorskip("onnxscript")
    r = run_full("-m", "bert_port.export", model_dir, "--out", tmp_path / "m.onnx")
    one_line_failure(r)
    assert list(tmp_path.iterdir()) == []


def test_finetuning_checkpoint(model_dir, tmp_path):
    train = FD.write_conll(FD.generate(8, "train", seed=1), tmp_path / "train.conll")
    dev = FD.write_conll(FD.generate(4, "heldout", seed=1), tmp_path / "dev.conll")
    out = tmp_path / "run"
    r = run_full("-m", "bert_port.finetune", "tag", "--model", model_dir, "--train", train, "--dev", dev,
                 "--out", out, "--epochs", "1", "--max-seq-length", "32", "--cpu")
    one_line_failure(r)
    assert r.returncode == 1
    assert not (out / "model.safetensors").exists()
    no_temp_files(tmp_path)
    for p in out.glob("*.json"):  # what was written is whole
        json.loads(p.read_text())
