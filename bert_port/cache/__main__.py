"""`python -m bert_port.cache`: list, remove, verify and fetch cached models.

The command line sits above both the cache store (`bert_port.cache`) and the hub that fills it, so
neither of those imports the other's caller.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from bert_port import hub
from converters import runner
from bert_port.cache import (DOWNLOADS, entry_names, entry_path, entry_state, human, invalidate, lock, remove_lock,
                             remove_tree, sweep_temp_dirs, tree_size)
from converters.text import shown


def _canonical(name: str) -> str:
    return hub.canonical_name(name) if hub.is_known_name(name) else name


_DOWNLOAD = "download in progress or interrupted"  # the same words in `list` and `verify`


def _describe(name: str, info: dict) -> str:
    """One line per name, the same words in `list` and `verify`."""
    state, problems = info["state"], info["problems"]
    if state in ("corrupt", "not a model", "incomplete") and problems:
        return f"{'CORRUPT' if state == 'corrupt' else state}: " + "; ".join(problems)
    return str(state)


def _cmd_list(root: Path, args: argparse.Namespace) -> int:
    names = entry_names(root)
    if not names:
        print(f"(no models in {shown(root)})")
        return 0
    print(f"cache: {shown(root)}")
    for name in names:
        info = entry_state(root, name)
        if info["state"] is not None:
            size = tree_size(root / name)
            print(f"{shown(name):32} {human(size):>10}  {info['state']}")
        if info["download"]:
            print(f"{shown(name):32} {human(tree_size(root / DOWNLOADS / name)):>10}  {_DOWNLOAD}")
    return 0


def _cmd_remove(root: Path, args: argparse.Namespace) -> int:
    status = 0
    for raw in args.names:
        name = _canonical(raw)
        entry, partial = entry_path(root, name), entry_path(root / DOWNLOADS, name)
        info = entry_state(root, name)
        if info["state"] is None and not info["download"]:
            print(f"error: {shown(raw)}: not in the cache {shown(root)}", file=sys.stderr)
            status = 1
            continue
        if info["state"] == "not a model" and not entry.is_symlink():  # a link is removed itself, never followed
            print(f"error: {shown(name)}: not a model ({info['problems'][0]}); remove it yourself if it is not needed",
                  file=sys.stderr)
            status = 1
            continue
        lock_file = root / f"{name}.lock"
        with lock(lock_file, name):
            size = tree_size(entry) + (tree_size(partial) if info["download"] else 0)
            remove_tree(root, entry)
            if info["download"]:
                remove_tree(root, partial)
            sweep_temp_dirs(root, name)
            remove_lock(lock_file)
        with contextlib.suppress(OSError):
            if not (root / DOWNLOADS).is_symlink():
                (root / DOWNLOADS).rmdir()  # only when no other download is left
        print(f"removed {shown(name)} ({human(size)})")
    return status


def _cmd_verify(root: Path, args: argparse.Namespace) -> int:
    names = [_canonical(n) for n in args.names] or entry_names(root)
    for name in names:  # all names checked before anything is touched
        entry_path(root, name)
    if not names:
        print(f"(no models in {shown(root)})")
    bad, status = [], 0
    for name in names:
        info = entry_state(root, name, full=True)
        if info["state"] is None and not info["download"]:
            print(f"error: {shown(name)}: not in the cache {shown(root)}", file=sys.stderr)
            return 1
        if info["download"]:
            print(f"{shown(name)}: {_DOWNLOAD}")
            status = status or (1 if args.names and info["state"] != "complete" else 0)
        if info["state"] is None:
            continue
        print(f"{shown(name)}: {'ok' if info['state'] == 'complete' else _describe(name, info)}")
        if info["state"] == "not a model":
            status = status or (1 if args.names else 0)  # listed, never touched
        elif info["state"] != "complete":
            bad.append(name)
            with contextlib.suppress(OSError, ValueError):
                invalidate(root / name)
    if bad and args.fix:
        for name in list(bad):
            if not hub.is_known_name(name):
                print(f"{shown(name)}: not a registered name; left for removal "
                      f"(python -m bert_port.cache remove {shown(name)})")
                continue
            hub.resolve(name, cache_dir=root)
            print(f"{shown(name)}: re-fetched")
            bad.remove(name)
    elif bad:
        print("the next load re-fetches these (or run: python -m bert_port.cache verify --fix)")
    return 1 if bad else status


def _cmd_fetch(root: Path, args: argparse.Namespace) -> int:
    offline = hub.settings(root).offline
    for name in args.names:
        try:
            print(hub.resolve(name, cache_dir=root))
        except hub.HubError as e:  # the reason only: resolve's advice includes running this very command
            if not hasattr(e, "reason"):
                raise
            hint = "unset BERT_PORT_OFFLINE to download" if offline else \
                "check the network, a proxy (HTTPS_PROXY) or BERT_PORT_HUB_URL"
            raise hub.HubError(f"{e.reason}; {hint}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = runner.parser("python -m bert_port.cache", "Manage bert_port's model cache.")
    parser.add_argument("--cache-dir", help="cache root (default: $BERT_PORT_CACHE or ~/.cache/bert_port)")
    sub = parser.add_subparsers(dest="command", metavar="{list,remove,verify,fetch}")
    for name, helptext in (("list", "models in the cache, their size and state"),
                           ("remove", "delete cached models and their interrupted downloads"),
                           ("verify", "re-hash cached files against their manifests"),
                           ("fetch", "download and convert models now (to use them offline later)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == "verify":
            p.add_argument("names", nargs="*", help="cached model names (default: every cached model)")
            p.add_argument("--fix", action="store_true", help="re-download and convert corrupt models now")
        elif name != "list":
            p.add_argument("names", nargs="+", help="model names (pretrained names or aliases)")
    return parser


def _run(args: argparse.Namespace) -> int:
    commands = {"list": _cmd_list, "remove": _cmd_remove, "verify": _cmd_verify, "fetch": _cmd_fetch}
    root = hub.settings(args.cache_dir).cache_dir
    return commands[args.command](root, args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return runner.run(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
