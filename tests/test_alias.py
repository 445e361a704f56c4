"""`bert_port.install_alias()` and `python -m bert_port.alias`: pytorch_pretrained_bert 0.6.2's every
module path and public name, served by bert_port, checked against the installed reference itself.

The alias replaces `sys.modules` entries, so the in-process tests put the reference's entries back
afterwards (other test files compare against the real reference in this process).
"""
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import bert_port
from tests import test_ppb_surface
from tests.conftest import FIXTURES, ROOT

ppb = pytest.importorskip("pytorch_pretrained_bert")
PPB_DIR = Path(ppb.__file__).parent
# Every module the installed reference ships, but its console entry point and the converter that
# imports TensorFlow at load time (its function is tested below).
MODULES = sorted(p.stem for p in PPB_DIR.glob("*.py")
                 if p.stem not in ("__init__", "__main__", "convert_tf_checkpoint_to_pytorch"))
NON_BERT = [m for m in MODULES if m not in ("modeling", "tokenization", "optimization", "file_utils")]
ACTIVATIONS = ("gelu", "swish")


def reference_modules():
    return {m: importlib.import_module(f"pytorch_pretrained_bert.{m}") for m in MODULES}


@pytest.fixture
def alias(monkeypatch):
    """The alias installed in this process; the reference's sys.modules entries restored afterwards."""
    reference = reference_modules()
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "pytorch_pretrained_bert"}
    yield bert_port.install_alias(), reference
    for name in [n for n in sys.modules if n.split(".")[0] == "pytorch_pretrained_bert"]:
        del sys.modules[name]
    sys.modules.update(saved)


def all_public_names(module, monkeypatch):
    monkeypatch.setattr(test_ppb_surface, "NON_BERT", ())
    return test_ppb_surface.public_names(module)


def test_the_reference_ships_the_modules_the_alias_serves():
    from bert_port import _non_bert

    assert len(MODULES) == 15  # 18 files less __init__, __main__ and the TF converter
    assert set(NON_BERT) == set(_non_bert.MODULES)


@pytest.mark.parametrize("module", ["", *MODULES])
def test_every_public_name_imports_from_the_same_path(alias, module, monkeypatch):
    top, reference = alias
    theirs = reference[module] if module else ppb
    path = "pytorch_pretrained_bert" + (f".{module}" if module else "")
    names = all_public_names(theirs, monkeypatch)
    assert names
    for name in names:
        namespace = {}
        exec(f"from {path} import {name}", namespace)  # noqa: S102 - the import statement a client writes
        assert namespace[name] is not None, f"{path}.{name}"
    ours = importlib.import_module(path)
    assert ours is (top if not module else sys.modules[path]) and not getattr(ours, "__file__", "").startswith(
        str(PPB_DIR))


def test_bert_modules_are_bert_ports_own(alias):
    top, _ = alias
    import pytorch_pretrained_bert.modeling as modeling
    from pytorch_pretrained_bert.optimization import BertAdam
    from pytorch_pretrained_bert.tokenization import BertTokenizer

    assert modeling is bert_port.modeling and top.modeling is bert_port.modeling
    assert BertAdam is bert_port.BertAdam and BertTokenizer is bert_port.BertTokenizer
    assert top.BertModel is bert_port.BertModel and top.__version__ == "0.6.2"
    entries = {n: m for n, m in sys.modules.items() if n.startswith("pytorch_pretrained_bert")}
    assert bert_port.install_alias() is top  # idempotent: nothing rebuilt
    assert entries == {n: m for n, m in sys.modules.items() if n.startswith("pytorch_pretrained_bert")}
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pytorch_pretrained_bert.not_in_0_6_2")
    for name in ("pytorch_pretrained_bert", "pytorch_pretrained_bert.modeling",
                 "pytorch_pretrained_bert.modeling_gpt2"):
        assert importlib.util.find_spec(name) is not None, name  # how libraries probe for a package


def reference_owned(value, module):
    return getattr(value, "__module__", None) == f"pytorch_pretrained_bert.{module}"


@pytest.mark.parametrize("module", NON_BERT)
def test_non_bert_names_refuse_and_the_rest_is_the_references(alias, module, monkeypatch):
    """Classes and functions of GPT-2/OpenAI GPT/Transformer-XL raise NotImplementedError when used;
    constants equal the reference's; the BERT pieces these modules re-export are bert_port's working ones."""
    _, reference = alias
    ours = importlib.import_module(f"pytorch_pretrained_bert.{module}")
    x = torch.linspace(-5, 5, 201)
    for name in all_public_names(reference[module], monkeypatch):
        theirs, mine = getattr(reference[module], name), getattr(ours, name)
        if name in ACTIVATIONS:
            assert (mine(x) - theirs(x)).abs().max() < 1e-6, name
        elif name == "ACT_FNS":
            assert mine.keys() == theirs.keys()
            assert all((mine[k]()(x) if inspect.isclass(mine[k]) else mine[k](x)).sub(
                theirs[k]()(x) if inspect.isclass(theirs[k]) else theirs[k](x)).abs().max() < 1e-6 for k in mine)
        elif inspect.isclass(theirs) or inspect.isfunction(theirs):
            if not reference_owned(theirs, module) and not any(reference_owned(theirs, m) for m in NON_BERT):
                bert_module = importlib.import_module(theirs.__module__.replace("pytorch_pretrained_bert", "bert_port"))
                assert mine is getattr(bert_module, theirs.__name__), name
                continue  # a BERT name the reference re-exports here (schedules, cached_path, BasicTokenizer)
            with pytest.raises(NotImplementedError, match="bert_port ports BERT only"):
                mine()
            if inspect.isclass(theirs):
                assert issubclass(mine, torch.nn.Module) == issubclass(theirs, torch.nn.Module), name
                with pytest.raises(NotImplementedError, match="BERT only"):
                    mine.from_pretrained("anything")
        elif name == "SCHEDULES":
            assert {k: v.__name__ for k, v in mine.items()} == {k: v.__name__ for k, v in theirs.items()}
        else:
            assert mine == theirs, name


def test_subclasses_of_stand_ins_import_and_refuse_to_build(alias):
    from pytorch_pretrained_bert.modeling_gpt2 import GPT2PreTrainedModel

    class Mine(GPT2PreTrainedModel):  # a library defining its own model at import time
        def __init__(self):
            pass

    with pytest.raises(NotImplementedError, match="GPT2PreTrainedModel"):
        Mine()


def test_convert_tf_checkpoint_to_pytorch_writes_what_the_reference_loads(alias, tmp_path):
    from pytorch_pretrained_bert.convert_tf_checkpoint_to_pytorch import convert_tf_checkpoint_to_pytorch

    config_file = FIXTURES / "tf" / "bert_config.json"
    convert_tf_checkpoint_to_pytorch(str(FIXTURES / "tf" / "tf1" / "bert_model.ckpt"), str(config_file),
                                     str(tmp_path / "pytorch_model.bin"))
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    _, reference = alias
    theirs = reference["modeling"].BertForPreTraining(reference["modeling"].BertConfig.from_json_file(str(config_file)))
    theirs.load_state_dict(state, strict=True)  # the reference's own names and shapes
    config = bert_port.BertConfig.from_json_file(config_file)
    config.hidden_act = "gelu_new"  # Google's "gelu" is the tanh form
    model = bert_port.BertForPreTraining(config).eval()
    model.load_state_dict(state)
    rec = np.load(FIXTURES / "tf" / "outputs.npz")
    ids, types, mask = (torch.as_tensor(rec[k]).long() for k in ("input_ids", "token_type_ids", "input_mask"))
    with torch.no_grad():
        _, pooled = model.bert(ids, types, mask)
    assert (pooled - torch.as_tensor(rec["pooled_output"])).abs().max() < 1e-5  # TensorFlow's recorded output


def run_python(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_alias_wins_over_an_imported_reference_and_says_so_once():
    code = textwrap.dedent("""
        import logging, json
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
        import pytorch_pretrained_bert, pytorch_pretrained_bert.modeling as real
        import bert_port
        bert_port.install_alias(); bert_port.install_alias()
        from pytorch_pretrained_bert.modeling import BertModel
        from pytorch_pretrained_bert import TransfoXLTokenizer
        print(json.dumps([BertModel.__module__, real.__file__ is not None]))
    """)
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["bert_port.model", True]
    lines = [line for line in result.stderr.splitlines() if line.startswith("LOG bert_port.alias")]
    assert len(lines) == 1 and "already imported" in lines[0], result.stderr


SCRIPT = """
import sys, pytorch_pretrained_bert
from pytorch_pretrained_bert.modeling import BertModel
from pytorch_pretrained_bert import GPT2Model
print(__name__, BertModel.__module__, sys.argv[1:], sys.argv[0].endswith({tail!r}))
sys.exit(int(sys.argv[-1]))
"""


def test_runner_runs_a_script_unmodified(tmp_path):
    (tmp_path / "client.py").write_text(SCRIPT.format(tail="client.py"))
    result = run_python("-m", "bert_port.alias", str(tmp_path / "client.py"), "--lr", "3e-5", "3")
    assert result.returncode == 3, result.stderr
    assert result.stdout.split() == ["__main__", "bert_port.model", "['--lr',", "'3e-5',", "'3']", "True"]


def test_runner_runs_a_module_unmodified(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "cli.py").write_text(SCRIPT.format(tail="cli.py"))
    result = run_python("-m", "bert_port.alias", "-m", "pkg.cli", "x", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["__main__", "bert_port.model", "['x',", "'0']", "True"]


@pytest.mark.parametrize("args,status,message", [
    (["no_such_script.py"], 2, "can't open file 'no_such_script.py'"),
    (["-m", "no_such_pkg.cli"], 1, "no module named 'no_such_pkg.cli'"),
    ([], 2, "python -m bert_port.alias: error: the following arguments are required: PROGRAM"),
])
def test_runner_errors_are_one_line(tmp_path, args, status, message):
    result = run_python("-m", "bert_port.alias", *args, cwd=tmp_path)
    assert result.returncode == status
    assert message in result.stderr and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("bert_port.install_alias:")]
    assert len(lines) == 1, result.stderr


def test_file_utils_helpers_behave_as_the_reference(tmp_path):
    from bert_port import file_utils as ours

    theirs = ppb.file_utils
    for path in ("a/b.TXT", "noext", "x.tar.GZ", ".bashrc"):
        for dot in (True, False):
            for lower in (True, False):
                assert ours.get_file_extension(path, dot, lower) == theirs.get_file_extension(path, dot, lower)
    (tmp_path / "set.txt").write_text("a \nb\na\n\nc\t\n", encoding="utf-8")
    assert ours.read_set_from_file(tmp_path / "set.txt") == theirs.read_set_from_file(str(tmp_path / "set.txt"))
    for url in ("s3://bucket/key/path.bin", "s3://bucket/k"):
        assert ours.split_s3_path(url) == theirs.split_s3_path(url)
    for bad in ("s3://bucket", "s3:///key"):
        with pytest.raises(ValueError):
            ours.split_s3_path(bad)
        with pytest.raises(ValueError):
            theirs.split_s3_path(bad)
    (tmp_path / "cached").write_bytes(b"x")  # a file the reference's cache holds, with its record
    (tmp_path / "cached.json").write_text(json.dumps({"url": "https://h/x", "etag": '"e"'}), encoding="utf-8")
    (tmp_path / "no_record").write_bytes(b"x")
    assert ours.filename_to_url("cached", tmp_path) == theirs.filename_to_url("cached", str(tmp_path))
    for name in ("no_record", "missing"):
        with pytest.raises(EnvironmentError):
            ours.filename_to_url(name, tmp_path)
    with pytest.raises(NotImplementedError, match="s3"):
        ours.s3_get("s3://bucket/key", None)
