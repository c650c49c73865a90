"""The project's dependency rules, read from the source (ast) of every module, module-level and function-level imports alike.

- the coordinator (server/) and the sites (client/) share only federation/ and strategies/: neither imports the other;
- strategies/ is pure aggregation math: no Flower, no torch;
- no import cycles among project modules (a cycle means two modules that cannot be read, or changed, one at a time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "federation", "strategies", "simulations")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imported_names(path: Path) -> set[str]:
    """Every module name an import statement in `path` names (absolute imports; relative ones resolved)."""
    names = set()
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # "from client import app"
    return names


def _graph() -> dict[str, set[str]]:
    """{project module: the project modules it imports}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imported_names(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and modules[imported].name != "__init__.py":
                deps.add(imported)
        graph[name] = deps
    return graph


def _external(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported_names(path)}


def test_the_graph_sees_known_edges():
    """The parser finds module-level and function-level imports (otherwise every check below passes vacuously)."""
    graph = _graph()
    assert "federation.protocol" in graph["server.app"]
    assert "federation.compose" in graph["simulations.cli"]  # imported inside a function


@pytest.mark.parametrize("side, other", [("server", "client"), ("client", "server")])
def test_coordinator_and_sites_do_not_import_each_other(side, other):
    offending = {name: sorted(d for d in deps if d.split(".")[0] == other)
                 for name, deps in _graph().items() if name.split(".")[0] == side}
    assert {k: v for k, v in offending.items() if v} == {}


def test_strategies_are_pure_math():
    offending = {name: sorted(_external(path) & {"flwr", "torch"})
                 for name, path in _modules().items() if name.split(".")[0] == "strategies"}
    assert {k: v for k, v in offending.items() if v} == {}


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
