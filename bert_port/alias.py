"""Stand in for `pytorch_pretrained_bert` in code you cannot edit (an installed library, a script).

    import bert_port; bert_port.install_alias()     # then any `import pytorch_pretrained_bert...` gets bert_port
    python -m bert_port.alias train.py --lr 3e-5     # run a script unmodified under the alias
    python -m bert_port.alias -m some_package.cli    # ... or a module, as `python -m` would

The alias is a set of `sys.modules` entries, made once: `pytorch_pretrained_bert` (a package that
exports every name of the reference's `__init__`), `.modeling`, `.tokenization`, `.optimization`,
`.file_utils` (bert_port's own modules, the same objects), `.convert_tf_checkpoint_to_pytorch`,
and the GPT-2 / OpenAI GPT / Transformer-XL modules (import-only stand-ins, see
`bert_port._non_bert`). Entries in `sys.modules` come before every finder, so an installed
pytorch_pretrained_bert is never read; the alias says so once in the log. Its `__path__` is empty:
a submodule name the reference did not have is a plain ModuleNotFoundError.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import runpy
import sys
import types
from typing import List, Optional

logger = logging.getLogger(__name__)

NAME = "pytorch_pretrained_bert"
REFERENCE_VERSION = "0.6.2"
# The reference's BERT modules: bert_port's module of the same role.
BERT_MODULES = {"modeling": "bert_port.modeling", "tokenization": "bert_port.tokenization",
                "optimization": "bert_port.optimization", "file_utils": "bert_port.file_utils"}
_MARK = "__bert_port_alias__"
_reported = False


def convert_tf_checkpoint_to_pytorch(tf_checkpoint_path: str, bert_config_file: str, pytorch_dump_path: str) -> None:
    """The reference's converter entry point: a Google TF BERT checkpoint -> a ppb `pytorch_model.bin`
    (BertForPreTraining's state dict), read by bert_port's TF reader (no TensorFlow needed)."""
    import torch

    from bert_port.heads import BertForPreTraining
    from bert_port.modeling import BertConfig, load_tf_weights_in_bert

    model = BertForPreTraining(BertConfig.from_json_file(bert_config_file))
    load_tf_weights_in_bert(model, tf_checkpoint_path)
    torch.save(model.state_dict(), pytorch_dump_path)


def _report_real_reference(existing: Optional[types.ModuleType]) -> None:
    """Log once per process that an installed (or already imported) pytorch_pretrained_bert is bypassed."""
    global _reported
    if _reported:
        return
    if existing is not None:
        _reported = True
        logger.warning("bert_port.install_alias: %s was already imported from %s; from now on imports of it get "
                       "bert_port (objects taken from it before stay the reference's)", NAME,
                       getattr(existing, "__file__", existing))
    elif importlib.machinery.PathFinder.find_spec(NAME) is not None:
        _reported = True
        logger.warning("bert_port.install_alias: %s is installed too; bert_port stands in for it", NAME)


def _top_module() -> types.ModuleType:
    """`pytorch_pretrained_bert` itself: the reference's `__init__` names, from bert_port and the stand-ins."""
    import bert_port
    from bert_port._non_bert import new_module

    # a package whose only submodules are the sys.modules entries made by install_alias
    top = new_module(NAME, "pytorch_pretrained_bert 0.6.2's API served by bert_port (bert_port.install_alias).", True)
    top.__version__ = REFERENCE_VERSION  # the API version served; bert_port's own is bert_port.__version__
    setattr(top, _MARK, bert_port.__version__)
    for name in set(bert_port.__all__) - {"install_alias"}:
        setattr(top, name, getattr(bert_port, name))
    return top


def _modules() -> dict:
    """Every module of the alias by its full name, the package first (stand-ins resolve names through it)."""
    from bert_port import _non_bert

    modules = {NAME: _top_module()}
    for short, target in BERT_MODULES.items():
        modules[f"{NAME}.{short}"] = importlib.import_module(target)
    convert = _non_bert.new_module(f"{NAME}.convert_tf_checkpoint_to_pytorch", convert_tf_checkpoint_to_pytorch.__doc__)
    convert.convert_tf_checkpoint_to_pytorch = convert_tf_checkpoint_to_pytorch
    modules[convert.__name__] = convert
    for short in _non_bert.MODULES:
        modules[f"{NAME}.{short}"] = None  # built below, once the modules it names are in sys.modules
    return modules


def install_alias() -> types.ModuleType:
    """Make `import pytorch_pretrained_bert[.submodule]` give bert_port from now on; returns the package.

    Idempotent. If the real reference is installed or was imported already, the alias still wins
    and logs that once.
    """
    current = sys.modules.get(NAME)
    if current is not None and hasattr(current, _MARK):
        return current
    _report_real_reference(current)
    from bert_port import _non_bert

    for stale in [n for n in sys.modules if n == NAME or n.startswith(NAME + ".")]:
        del sys.modules[stale]
    modules = _modules()
    top = modules[NAME]
    for full, module in modules.items():
        if module is None:
            module = _non_bert.build_module(full.rpartition(".")[2])
        sys.modules[full] = module
        if full != NAME:
            setattr(top, full.rpartition(".")[2], module)
    for short, names in _non_bert.INIT_EXPORTS.items():
        for name in names:
            setattr(top, name, getattr(sys.modules[f"{NAME}.{short}"], name))
    return top


USAGE = ("usage: python -m bert_port.alias SCRIPT.py [ARGS...]\n"
         "       python -m bert_port.alias -m MODULE [ARGS...]\n"
         "Runs SCRIPT (or MODULE, as `python -m` would) unmodified, with `pytorch_pretrained_bert` served by "
         "bert_port.")


def main(argv: Optional[List[str]] = None) -> int:
    """The runner: sys.argv and sys.path[0] as the script or module would see them; its exit status passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] == "-m" and len(argv) < 2:
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "-m":
        return _run_module(argv[1], argv[2:])
    script = argv[0]
    if not os.path.isfile(script):
        print(f"bert_port.alias: error: can't open file {script!r}: no such file", file=sys.stderr)
        return 2
    install_alias()
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


def _run_module(module: str, args: List[str]) -> int:
    """`python -m module args` under the alias (installed first: finding the module runs its packages' code)."""
    install_alias()
    sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError as error:  # a missing parent package; other import errors are the program's own
        if not error.name or not (module + ".").startswith(error.name + "."):
            raise
        found = False
    if not found:
        print(f"bert_port.alias: error: no module named {module!r}", file=sys.stderr)
        return 1
    sys.argv = [module, *args]  # argv[0] becomes the module's file, as with `python -m`
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0

if __name__ == "__main__":
    from bert_port.alias import main as _main  # the importable module, so that its once-only state is shared

    sys.exit(_main())
