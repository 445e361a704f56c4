"""Showing untrusted text (names, keys, paths, strings taken from files) on a terminal.

Every such echo goes through `shown`: control and other non-printable characters are written as
escapes (`\\x1b`, `\\u202e`), never sent to the terminal, and the result is cut to at most 200
characters, so a 1 MiB tensor name or a label with an escape sequence prints as one short line.
"""
from __future__ import annotations

import os
from typing import Union

LIMIT = 200


def _escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    return ch.encode("unicode_escape", "backslashreplace").decode("ascii")


def shown(text: Union[str, bytes, "os.PathLike[str]", object], limit: int = LIMIT) -> str:
    """`text` escaped and cut to `limit` characters (an ellipsis marks a cut)."""
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    if not isinstance(text, str):
        text = repr(text)
    out, size = [], 0
    for ch in text[:limit + 1]:
        piece = _escape(ch)
        out.append(piece)
        size += len(piece)
        if size > limit:
            break
    if size <= limit:
        return "".join(out)
    while size > limit - 1:  # room for the ellipsis
        size -= len(out.pop())
    return "".join(out) + "…"


def quoted(name: object, limit: int = 100) -> str:
    """A name or key from a file as a quoted Python literal (ascii(): escapes spelled out), cut to
    `limit` characters with "..." after a cut; a non-string is shown by its type name."""
    if type(name) is not str:
        return type(name).__name__
    return ascii(name[:limit]) + ("..." if len(name) > limit else "")
