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
from bert_port.cache import (DOWNLOADS, check_entry, entry_names, entry_path, human, invalidate, lock, read_manifest,
                             remove_tree, sweep_temp_dirs, tree_size)


def _canonical(name: str) -> str:
    return hub.canonical_name(name) if hub.is_known_name(name) else name


def _cmd_list(root: Path, args: argparse.Namespace) -> int:
    names = entry_names(root)
    if not names:
        print(f"(no models in {root})")
        return 0
    print(f"cache: {root}")
    for name in names:
        entry, partial = root / name, root / DOWNLOADS / name
        if entry.is_dir():
            problems = check_entry(entry)
            state = "complete" if not problems else ("incomplete" if read_manifest(entry) is None else "corrupt")
            print(f"{name:32} {human(tree_size(entry)):>10}  {state}")
        if partial.is_dir():
            print(f"{name:32} {human(tree_size(partial)):>10}  download in progress or interrupted")
    return 0


def _cmd_remove(root: Path, args: argparse.Namespace) -> int:
    status = 0
    for raw in args.names:
        name = _canonical(raw)
        entry, partial = entry_path(root, name), entry_path(root / DOWNLOADS, name)
        if not entry.exists() and not partial.exists():
            print(f"error: {raw}: not in the cache {root}", file=sys.stderr)
            status = 1
            continue
        with lock(root / f"{name}.lock", name):
            size = tree_size(entry) + tree_size(partial)
            remove_tree(entry)
            remove_tree(partial)
            sweep_temp_dirs(root, name)
        with contextlib.suppress(OSError):
            partial.parent.rmdir()  # only when no other download is left
        print(f"removed {name} ({human(size)})")
    return status


def _cmd_verify(root: Path, args: argparse.Namespace) -> int:
    names = [_canonical(n) for n in args.names] or [n for n in entry_names(root) if (root / n).is_dir()]
    for name in names:  # all names checked before anything is touched
        entry_path(root, name)
    if not names:
        print(f"(no models in {root})")
    bad = []
    for name in names:
        if not (root / name).is_dir():
            print(f"error: {name}: not in the cache {root}", file=sys.stderr)
            return 1
        problems = check_entry(root / name, full=True)
        if not problems:
            print(f"{name}: ok")
            continue
        print(f"{name}: CORRUPT: " + "; ".join(problems))
        bad.append(name)
        if (root / name).is_dir():
            with contextlib.suppress(OSError):
                invalidate(root / name)
    if bad and args.fix:
        for name in list(bad):
            if not hub.is_known_name(name):
                print(f"{name}: not a registered name; left for removal (python -m bert_port.cache remove {name})")
                continue
            hub.resolve(name, cache_dir=root)
            print(f"{name}: re-fetched")
            bad.remove(name)
    elif bad:
        print("the next load re-fetches these (or run: python -m bert_port.cache verify --fix)")
    return 1 if bad else 0


def _cmd_fetch(root: Path, args: argparse.Namespace) -> int:
    for name in args.names:
        try:
            print(hub.resolve(name, cache_dir=root))
        except hub.HubError as e:  # the reason only: resolve's advice includes running this very command
            if not hasattr(e, "reason"):
                raise
            hint = "unset BERT_PORT_OFFLINE to download" if hub.settings(root).offline else \
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
