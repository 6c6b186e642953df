"""The package's modules import each other in one direction only (STYLE.md: data flows one way).

Every `from .x import` counts, also one inside a function or under TYPE_CHECKING: a lazy import
hides a circle from Python, not from a reader."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"


def _name(path: Path) -> str:
    """`http` for appliance/http.py; `cli` for appliance/cli/__init__.py; `cli.ops` for ops.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _known(dotted: list[str], modules: set[str]) -> str | None:
    """The module an import names: the longest known prefix (`x.y` of `from .x.y.z import`)."""
    for n in range(len(dotted), 0, -1):
        if ".".join(dotted[:n]) in modules:
            return ".".join(dotted[:n])
    return None


def imports() -> dict[str, set[str]]:
    """Who imports whom inside appliance/, subpackages included (`from ..x` resolved)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_name(p) for p in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        package = list(path.relative_to(PACKAGE).parent.parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    targets = [base + node.module.split(".")]
                else:  # `from . import x`: the module x, else the package itself
                    targets = [base + [alias.name] for alias in node.names]
                    targets = [t if ".".join(t) in modules else base for t in targets]
                deps.update(m for t in targets if (m := _known(t, modules)) is not None)
        graph[_name(path)] = deps - {_name(path)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_appliance_imports_in_a_circle() -> None:
    graph = imports()
    assert len(graph) > 30 and graph["http"] >= {"errors", "payload", "record"}
    assert (
        graph["cli.store"] >= {"cli.common", "lmdbbackend", "record"} and "cli" in graph["__main__"]
    )
    assert circles(graph) == []
