"""The one command-line runner every entry point uses (converters and bert_port alike).

    from converters import runner

    def build_parser():
        p = runner.parser("python -m mypackage.tool", "What the tool does.")
        p.add_argument("src", help="the file to read")
        p.add_argument("--limit", type=int, default=3, help="how many")   # help shows "(default: 3)"
        return p

    def act(args) -> int | None:        # None or 0: success
        ...raise ValueError("FILE: what is wrong")      # -> "error: FILE: what is wrong", exit 1
        ...raise runner.UsageError("--x needs --y")     # -> "PROG: error: --x needs --y", exit 2

    if __name__ == "__main__":
        runner.main(build_parser(), act)

Policy, the same everywhere: an error prints ONE line on stderr and exits 1; bad usage exits 2;
Ctrl-C exits 130; `--debug` (added to every parser) shows the traceback instead. `--help` shows
every option's default and ends with these exit codes. Torch-free, so the converters use it too.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, NoReturn, Optional, Sequence

from converters.text import shown

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = ("exit codes: 0 success; 1 error (one line on stderr, --debug shows the traceback); "
              "2 bad usage; 130 interrupted")


class UsageError(Exception):
    """Arguments that parse but cannot go together (e.g. an option that does not apply): exit 2."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or action.required
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip()


class Parser(argparse.ArgumentParser):
    """argparse with the runner's policy: one-line usage errors, defaults in --help, the exit codes
    as the last lines of --help, and `--debug`. Subparsers made from it (`add_subparsers`) share it."""

    def __init__(self, *args, **kwargs) -> None:
        epilog = kwargs.pop("epilog", None)
        kwargs["epilog"] = f"{epilog.rstrip()}\n\n{EXIT_CODES}" if epilog else EXIT_CODES
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's --debug does not reset one given before the subcommand
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback on errors")

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        kwargs.setdefault("required", True)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parser(prog: str, description: str, epilog: Optional[str] = None) -> Parser:
    return Parser(prog=prog, description=description, epilog=epilog)


def one_line(error: BaseException) -> str:
    """The message of an expected error as one line; other types keep their name in front."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if isinstance(error, (ValueError, OSError, ImportError)) and text:
        return text
    return f"{type(error).__name__}: {text}".rstrip(": ")


def run(p: argparse.ArgumentParser, action: Callable[[argparse.Namespace], Optional[int]],
        argv: Optional[Sequence[str]] = None) -> int:
    """Parse `argv`, call `action(args)`, and turn what it raises into one line and an exit code."""
    args = p.parse_args(argv)
    debug = getattr(args, "debug", False)
    prefix = _rank_prefix()
    try:
        return int(action(args) or EXIT_OK)
    except KeyboardInterrupt:
        _err(f"{prefix}interrupted")
        return EXIT_INTERRUPTED
    except UsageError as e:
        if debug:
            raise
        _err(f"{prefix}{_prog_of(p, args)}: error: {e} (see --help)")
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001  one line for every failure; --debug for the traceback
        if debug:
            raise
        _err(f"{prefix}error: {shown(one_line(e), 1000)}")  # escaped: messages quote file contents
        return EXIT_ERROR


def _prog_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The prog of the (sub)command that ran, e.g. `python -m bert_port.finetune tag`."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _prog_of(action.choices[getattr(args, action.dest)], args)
    return p.prog


def main(p: argparse.ArgumentParser, action: Callable[[argparse.Namespace], Optional[int]]) -> NoReturn:
    sys.exit(run(p, action))


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: lines from several ranks do not interleave
    sys.stderr.flush()


# ---------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    """What torchrun says about this process; (1, 0, 0) when not under torchrun."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0


def dist_env(environ: Optional[dict] = None) -> DistEnv:
    """WORLD_SIZE, RANK and LOCAL_RANK, checked: a malformed value is a ValueError naming it.
    RANK and LOCAL_RANK are ignored when WORLD_SIZE is unset or 1."""
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", 1, 1)
    if world == 1:
        return DistEnv()
    rank = _env_int(env, "RANK", 0, 0)
    if rank >= world:
        raise ValueError(f"RANK={rank}: must be below WORLD_SIZE={world}")
    return DistEnv(world, rank, _env_int(env, "LOCAL_RANK", rank, 0))


def _env_int(env, var: str, default: int, least: int) -> int:
    raw = str(env.get(var, "")).strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected an integer") from None
    if value < least:
        raise ValueError(f"{var}={value}: must be at least {least}")
    return value


def _rank_prefix() -> str:
    try:
        rank = dist_env().rank
    except ValueError:
        return ""
    return f"[rank {rank}] " if rank else ""


def all_parsers(p: argparse.ArgumentParser) -> List[argparse.ArgumentParser]:
    """`p` and every subcommand's parser under it (for tests that check every --help)."""
    found = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += all_parsers(sub)
    return found
