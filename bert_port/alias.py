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

import argparse
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


def build_parser() -> "argparse.ArgumentParser":
    from converters import runner

    p = runner.parser("python -m bert_port.alias",
                      "Run a program written for pytorch_pretrained_bert unmodified, with `pytorch_pretrained_bert` "
                      "(and its submodules) served by bert_port.",
                      "The program's own exit status is passed through; its own errors print its own traceback.")
    p.add_argument("-m", dest="as_module", action="store_true",
                   help="PROGRAM is a module name, run as `python -m PROGRAM` would")
    p.add_argument("program", metavar="PROGRAM", help="the script (SCRIPT.py) or, with -m, the module to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the program's own arguments, passed as they are")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Parse (converters.runner's policy for our own errors), then run the program outside that policy:
    sys.argv and sys.path[0] as the program would see them; its exit status passes through."""
    from converters import runner

    chosen: List[argparse.Namespace] = []
    status = runner.run(build_parser(), lambda args: _check(args, chosen), argv)
    if status or not chosen:
        return status
    args = chosen[0]
    install_alias()  # first: finding a module runs its packages' code, which may import the reference
    if args.as_module:
        sys.path.insert(0, os.getcwd())
        sys.argv = [args.program, *args.args]  # argv[0] becomes the module's file, as with `python -m`
        runpy.run_module(args.program, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [args.program, *args.args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.program)))
        runpy.run_path(args.program, run_name="__main__")
    return 0


def _check(args: argparse.Namespace, chosen: list) -> None:
    """Our own errors (no such script or module) as one line; the program runs only after this."""
    from converters.runner import UsageError

    if not args.as_module and not os.path.isfile(args.program):  # exit 2, as `python SCRIPT` says
        raise UsageError(f"can't open file {args.program!r}: no such file")
    if args.as_module:
        install_alias()
        try:
            found = importlib.util.find_spec(args.program) is not None
        except ModuleNotFoundError as error:  # a missing parent package; other import errors are the program's
            if not error.name or not (args.program + ".").startswith(error.name + "."):
                raise
            found = False
        if not found:
            raise ValueError(f"no module named {args.program!r}")
    chosen.append(args)


if __name__ == "__main__":
    from bert_port.alias import main as _main  # the importable module, so that its once-only state is shared

    sys.exit(_main())
