"""The package's structure: no import circles in normzoo/, lazy imports included.

The import graph is read from the source with `ast` (nothing is imported): every `import normzoo.x`,
`from normzoo.x import y` and relative `from .x import y` / `from .. import y`, at module level or inside a function,
and `importlib.import_module("normzoo.x")` with a literal name. An import inside a function that closes a circle is
still a circle: it only moves the failure from import time to the first call. A parent package that Python imports
on the way to a submodule is not an edge; `from normzoo import name` (a name the package's __init__ defines) is.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "normzoo"


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _nearest(name: str, modules) -> str | None:
    """The module `name` lives in: itself, or the longest dotted prefix of it that is a module of the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, for the modules of the package at `root`."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in modules.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]  # the package relative imports start from
        edges: dict[str, int] = {}

        def add(target: str | None, line: int) -> None:
            if target is not None and target != name:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(_nearest(alias.name, modules), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else _nearest(base, modules), node.lineno)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                add(_nearest(node.args[0].value, modules), node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The circles of the graph, as [a, b, ..., a]: the strongly connected groups of modules (Tarjan), and in each
    the shortest circle through each of its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out, seen = [], set()
    for group in groups:  # the shortest circle through each module of the group, by breadth-first search
        for start in sorted(group):
            paths = {start: [start]}
            frontier = [start]
            while not any(start in graph[v] for v in frontier):
                nxt = []
                for v in frontier:
                    for w in sorted(graph[v]):
                        if w in group and w not in paths:
                            paths[w] = paths[v] + [w]
                            nxt.append(w)
                frontier = nxt
            cycle = paths[next(v for v in frontier if start in graph[v])]
            if frozenset(cycle) not in seen:
                seen.add(frozenset(cycle))
                out.append(cycle + [start])
    return out


def _describe(cycle: list[str], graph) -> str:
    modules = _modules(PACKAGE)
    steps = [f"{a} -> {b} ({modules[a][0].relative_to(PACKAGE.parent)}:{graph[a][b]})"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_no_import_circles():
    graph = import_graph()
    assert "normzoo.check" in graph and "normzoo.sweeps.grid" in graph  # the graph is of this package
    found = cycles(graph)
    assert not found, "import circles in normzoo/:\n" + "\n".join(_describe(c, graph) for c in found)


def test_the_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\nVERSION = 1\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import importlib\n\ndef g():\n    return importlib.import_module('pkg.c')\n")
    (pkg / "c.py").write_text("from pkg import VERSION\nimport pkg.sub\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a": 1}
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
    assert graph["pkg.sub.b"] == {"pkg.c": 4}
    assert graph["pkg.c"] == {"pkg": 1, "pkg.sub": 2}
    assert cycles(graph) == [["pkg", "pkg.a", "pkg.sub.b", "pkg.c", "pkg"]]
