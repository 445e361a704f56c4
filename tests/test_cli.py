"""Converter command lines, end to end in a subprocess: the options the other tests call only
through the Python API (--format pytorch, --gelu erf, --debug, torch2tf --force over more shards).
Expected numbers are the frameworks' recorded outputs in tests/fixtures/, never our own."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import bert_port as bp
from tests.conftest import FIXTURES, ROOT

TF, MGE = FIXTURES / "tf", FIXTURES / "mge"


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"converters.{module}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def max_diff(ours, theirs):
    return float((ours - torch.from_numpy(np.asarray(theirs, dtype=np.float32))).abs().max())


def mge_outputs(model_dir):
    rec = np.load(MGE / "outputs.npz")
    ids, types = (torch.from_numpy(rec[k]).long() for k in ("input_ids", "token_type_ids"))
    mask = torch.from_numpy(rec["attention_mask"]).long()
    with torch.no_grad():
        layers, pooled = bp.BertModel.from_pretrained(model_dir).eval()(ids, types, mask)
    return max([max_diff(t, rec[f"encoded_layer_{i}"]) for i, t in enumerate(layers)]  # padding included
               + [max_diff(pooled, rec["pooled_output"])])


def test_format_pytorch_writes_a_bin_that_reproduces_megengine(tmp_path):
    out = tmp_path / "pt"
    r = ok(cli("mge2torch", MGE / "hub_bert.pkl", "--config", MGE / "bert_config.json", "--out", out,
               "--format", "pytorch"))
    assert "pytorch_model.bin" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert len(state) == 39 and all(v.dtype == torch.float32 for v in state.values())
    assert mge_outputs(out) < 1e-5
    # and the .bin goes back out through torch2mge like a safetensors directory does
    ok(cli("torch2mge", out, "--out", tmp_path / "back.pkl"))
    assert (tmp_path / "back.pkl").stat().st_size > 0


def tf_outputs(model_dir):
    rec = np.load(TF / "outputs.npz")
    ids, types, mask = (torch.from_numpy(rec[k]).long() for k in ("input_ids", "token_type_ids", "input_mask"))
    with torch.no_grad():
        layers, pooled = bp.BertModel.from_pretrained(model_dir).eval()(ids, types, mask)
    return max([max_diff(t, rec[f"encoder_layer_{i}"]) for i, t in enumerate(layers)]  # padding included
               + [max_diff(pooled, rec["pooled_output"])])


def test_gelu_erf_through_the_cli(tmp_path):
    args = (TF / "tf1/bert_model.ckpt", "--config", TF / "bert_config.json")
    ok(cli("tf2torch", *args, "--out", tmp_path / "tanh"))
    r = ok(cli("tf2torch", *args, "--out", tmp_path / "erf", "--gelu", "erf"))
    assert "hidden_act gelu)" in r.stdout
    assert json.loads((tmp_path / "tanh/config.json").read_text())["hidden_act"] == "gelu_new"
    assert json.loads((tmp_path / "erf/config.json").read_text())["hidden_act"] == "gelu"
    assert tf_outputs(tmp_path / "tanh") < 1e-5  # what TF computed
    assert tf_outputs(tmp_path / "erf") > 1e-4   # exact GELU: visibly not what TF computed
    assert cli("tf2torch", *args, "--out", tmp_path / "x", "--gelu", "swish").returncode == 2


@pytest.mark.parametrize("module, args", [
    ("mge2torch", lambda t: (t / "missing.pkl", "--config", MGE / "bert_config.json", "--out", t / "o")),
    ("tf2torch", lambda t: (t / "missing/ckpt", "--config", TF / "bert_config.json", "--out", t / "o")),
    ("torch2tf", lambda t: (t / "no_model_dir", "--out", t / "o/ckpt")),
    ("torch2mge", lambda t: (t / "no_model_dir", "--out", t / "o.pkl")),
])
def test_debug_shows_the_traceback(tmp_path, module, args):
    plain = cli(module, *args(tmp_path))
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and plain.stderr.startswith("error: "), plain.stderr
    debug = cli(module, *args(tmp_path), "--debug")
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert "Error" in debug.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pkl").exists()


def test_torch2tf_force_over_an_older_checkpoint_with_more_shards(tmp_path):
    from converters.tf_checkpoint import load_tf_checkpoint

    model_dir = tmp_path / "model"
    ok(cli("tf2torch", TF / "tf1/bert_model.ckpt", "--config", TF / "bert_config.json", "--out", model_dir))
    out = tmp_path / "export"
    out.mkdir()
    for f in (TF / "sharded").iterdir():  # an older, 2-shard checkpoint at the same prefix
        (out / f.name.replace("ckpt-1", "bert_model.ckpt")).write_bytes(f.read_bytes())
    (out / "unrelated.txt").write_text("keep me")
    prefix = out / "bert_model.ckpt"

    refused = cli("torch2tf", model_dir, "--out", prefix)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert len(list(out.glob("bert_model.ckpt.data-*"))) == 2  # untouched

    ok(cli("torch2tf", model_dir, "--out", prefix, "--force"))
    assert sorted(p.name for p in out.iterdir()) == [
        "bert_model.ckpt.data-00000-of-00001", "bert_model.ckpt.index", "unrelated.txt"]
    got = load_tf_checkpoint(prefix)
    want = load_tf_checkpoint(TF / "tf1/bert_model.ckpt")
    assert len(got) == 46
    assert all(np.array_equal(got[k], want[k]) for k in got)


# ------------------------------------------------------------------------------ every command's --help


def entry_points():
    """Every `python -m` module of the two packages (a `__main__.py`, or `if __name__ == "__main__"`),
    so that a new command (e.g. one added next month) is walked without editing this list."""
    found = []
    for package in ("converters", "bert_port"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if path.name == "__main__.py" or re.search(r'^if __name__ == "__main__":', text, re.M):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


@pytest.mark.parametrize("module", entry_points())
def test_every_help_shows_defaults_describes_everything_and_ends_with_exit_codes(module):
    import argparse
    import importlib

    from converters import runner

    mod = importlib.import_module(module)
    assert hasattr(mod, "build_parser"), f"{module}: expose build_parser() built on converters.runner"
    for p in runner.all_parsers(mod.build_parser()):
        assert isinstance(p, runner.Parser), f"{p.prog}: not a converters.runner.Parser"
        text = p.format_help()
        assert text.rstrip().endswith(runner.EXIT_CODES), f"{p.prog}: --help must end with the exit codes"
        assert p.description, f"{p.prog}: no description"
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{p.prog} {choice.dest}: subcommand without a description"
                continue
            assert action.help, f"{p.prog} {action.option_strings or action.dest}: no description"
            takes_value = action.nargs != 0 and action.option_strings and not action.required
            if takes_value:  # what happens without the option must be visible
                shown = p._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{p.prog} {action.option_strings}: default not shown: {shown!r}"


@pytest.mark.parametrize("module", entry_points())
def test_every_command_answers_bad_usage_in_one_line_with_exit_2(module):
    r = subprocess.run([sys.executable, "-m", module.removesuffix(".__main__"), "--no-such-option"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--help" in r.stderr, r.stderr


def test_dist_env_is_read_once_and_checked():
    from converters.runner import DistEnv, dist_env

    assert dist_env({}) == DistEnv(1, 0, 0)
    assert dist_env({"RANK": "3"}) == DistEnv(1, 0, 0)  # no WORLD_SIZE: not distributed, RANK ignored
    assert dist_env({"WORLD_SIZE": "4", "RANK": "2"}) == DistEnv(4, 2, 2)  # LOCAL_RANK defaults to RANK
    assert dist_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == DistEnv(4, 3, 1)
    for env, message in (({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected an integer"),
                         ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be at least 1"),
                         ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2: must be below WORLD_SIZE=2"),
                         ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1: must be at least 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            dist_env(env)
