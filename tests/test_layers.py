"""The package is layers with arrows pointing one way (ARCHITECTURE.md).

`converters` is the bottom layer: it never imports `bert_port`, and importing any of its modules
imports no torch (a conversion runs without it). Across both packages no import cycle exists,
counting every import statement, including those inside functions: a lazy import is still an
arrow a reader has to follow.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("converters", "bert_port")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_names(tree: ast.AST, top_level_only: bool = False) -> Set[str]:
    """Absolute names of modules (or, for `from m import x`, of m.x and m) that a file imports."""
    nodes = ast.iter_child_nodes(tree) if top_level_only else ast.walk(tree)
    names: Set[str] = set()
    for node in nodes:
        if top_level_only and isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):  # still module level
            names |= {n for child in node.body + node.orelse for n in imported_names(ast.Module([child], []), True)}
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_imports(name: str) -> Set[str]:
    """The project modules `name` imports (a parent package's __init__ does not count as an arrow:
    both packages' __init__ files import their submodules lazily or not at all)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    return {n for n in imported_names(tree) if n in MODULES and n not in PACKAGES and n != name}


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1 on the stack, 2 done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_no_import_cycles():
    graph = {name: project_imports(name) for name in MODULES}
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_converters_never_import_bert_port_and_torch_only_when_called():
    for name, path in MODULES.items():
        if not name.startswith("converters"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        upward = sorted(n for n in imported_names(tree) if n.split(".")[0] == "bert_port")
        assert not upward, f"{name} imports {upward}: converters is the layer below bert_port"
        eager_torch = sorted(n for n in imported_names(tree, top_level_only=True) if n.split(".")[0] == "torch")
        assert not eager_torch, f"{name} imports torch at module level"


def test_importing_every_converters_module_loads_no_torch_and_no_bert_port():
    names = sorted(n for n in MODULES if n.startswith("converters"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'bert_port')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
