"""Import circles in fuseflow/ and services/: every import statement (module level or inside a function,
relative or absolute, ``importlib.import_module("…")`` with a constant) as an edge between fuseflow modules,
then the strongly connected components of that graph with more than one module (issue 25).

    python scripts/import_cycles.py          # prints each circle, exits 1 if there is one

A function-level import closes a circle as surely as a top-level one: the two modules still need each other,
only later. An import of ``a.b.c`` is an edge to ``a.b.c`` alone (not to the packages ``a`` and ``a.b`` that
Python runs first: every module would otherwise sit in a circle with its package's ``__init__``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where each import name lives (pyproject.toml's package-dir).
PACKAGE_DIRS = {"fuseflow": "fuseflow", "fuseflow.teacher": "services/teacher", "fuseflow.trainer": "services/trainer",
                "fuseflow.gateway": "services/gateway"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{module name: file}`` of every module of the distribution (generated stubs included)."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "fuseflow" and any(name.startswith(p + ".") or name == p for p in PACKAGE_DIRS if p != "fuseflow"):
                continue  # a services package's name never resolves to fuseflow/<name>
            out[name] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, mods) -> list[str]:
    """The module names an import node brings in: ``from x import y`` is ``x.y`` when that is a module, else
    ``x``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, name, is_package, mods):
                if target in mods and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def main() -> int:
    graph = import_graph()
    found = circles(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges, {len(found)} import circles")
    for c in found:
        members = set(c)
        edges = sorted(f"{a} -> {b}" for a in c for b in graph[a] if b in members)
        print(f"- {len(c)} modules: " + "; ".join(edges))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
