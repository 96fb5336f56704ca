"""The package's import graph points one way (ARCHITECTURE.md): no cycles between its modules and subpackages.

Every ``import`` counts, also the ones inside functions: a call-time import is still a dependency, and a cycle
of them is what makes modules impossible to understand (or to import) on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tilenorm_bmz

ROOT = Path(tilenorm_bmz.__file__).parent


def _unit(module: str) -> str:
    """``tilenorm_bmz.bmz.gate`` -> ``tilenorm_bmz.bmz``: top-level modules and subpackages are the units."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_init else parts)
        package = module if is_init else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join(base + ([node.module] if node.module else []))]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tilenorm_bmz"):
                targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("tilenorm_bmz")]
            for t in targets:
                if _unit(t) != _unit(module):
                    graph.setdefault(_unit(module), set()).add(_unit(t))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "tilenorm_bmz.bmz" in graph and "tilenorm_bmz.introspect" in graph["tilenorm_bmz.tiling"]
    assert cycles(graph) == []


def test_introspection_and_errors_are_the_bottom_layer() -> None:
    graph = import_graph()
    for bottom in ("tilenorm_bmz.introspect", "tilenorm_bmz.errors"):
        assert graph.get(bottom, set()) == set(), f"{bottom} imports {graph[bottom]}"
    for user in ("tilenorm_bmz.tiling", "tilenorm_bmz.metrics", "tilenorm_bmz.bmz", "tilenorm_bmz.conversion"):
        assert "tilenorm_bmz.introspect" in graph[user]
