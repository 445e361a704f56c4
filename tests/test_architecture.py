"""ARCHITECTURE.md's "Where a change goes" table names places that exist in the code.

Each backticked name in the table's right column is checked: a path must exist; a dotted name
(`converters.text.shown`, `heads.MODEL_CLASSES`) must be a module of bert_port or converters that
defines the last part; a bare name after a file (`converters/mapping.py` `RULES`) must be
defined in that file; a bare module name (`_finetune_train`) must be a module. A renamed or
deleted place fails here, so the table cannot go stale silently.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bert_port", "converters")


def table_rows() -> list:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Where a change goes", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Change")]
    return [tuple(cell.strip() for cell in row.strip("|").split("|", 1)) for row in rows]


def module_file(dotted: str) -> Optional[Path]:
    """bert_port/x/y.py or bert_port/x/y/__init__.py for "x.y" or "bert_port.x.y" (either package)."""
    parts = dotted.split(".")
    prefixes = [()] if parts[0] in PACKAGES else [(p,) for p in PACKAGES]
    for prefix in prefixes:
        base = ROOT.joinpath(*prefix, *parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py", base / "__main__.py"):
            if candidate.is_file():
                return candidate
    return None


def defines(path: Path, name: str) -> bool:
    text = path.read_text(encoding="utf-8")
    return re.search(rf"^\s*(def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]", text, re.M) is not None


def check_place(place: str) -> list:
    """The problems with one row's place cell (empty: every named place exists)."""
    problems, files, names = [], [], []
    for token in re.findall(r"`([^`]+)`", place):
        token = token.removesuffix("()")
        if " " in token or token.startswith("-") or re.fullmatch(r"\w+\.json", token):
            continue  # a command line, an option or a file the code writes: not a place in the code
        if "/" in token or token in PACKAGES:
            path = ROOT / token
            if not (path.exists() or path.with_suffix(".py").exists()):
                problems.append(f"{token}: no such path")
            files += [f for f in (path, path.with_suffix(".py")) if f.suffix == ".py" and f.is_file()]
        elif token.endswith(".py") or module_file(token) is not None:
            found = module_file(token.removesuffix(".py"))
            problems += [] if found else [f"{token}: no such module"]
            files += [found] if found else []
        elif "." in token:
            module, _, name = token.rpartition(".")
            path = module_file(module)
            problems += [] if path and defines(path, name) else [f"{token}: not defined"]
            files += [path] if path else []
        else:
            names.append(token)
    for name in names:  # a bare name: defined or used in a file the same cell names
        if not any(re.search(rf"\b{re.escape(name)}\b", f.read_text(encoding="utf-8")) for f in files):
            problems.append(f"{name}: not found in {[str(f.relative_to(ROOT)) for f in files] or 'any named file'}")
    return problems


def test_the_table_is_there():
    assert len(table_rows()) >= 10


@pytest.mark.parametrize("change,place", table_rows(), ids=[row[0][:40] for row in table_rows()])
def test_every_named_place_exists(change, place):
    assert not check_place(place), check_place(place)


def test_the_check_can_fail():
    assert check_place("`converters/no_such_module.py`")
    assert check_place("`converters/mapping.py` `NO_SUCH_TABLE`")
    assert check_place("`heads.NO_SUCH_REGISTRY`")
    assert not check_place("`converters/mapping.py` `RULES`")
