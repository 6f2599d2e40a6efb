"""The package's modules import each other without a cycle (module-level and function-level imports)."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = ("epmq", "callbacks")


def project_modules() -> dict[str, set[str]]:
    """module name -> the project modules it imports anywhere in its source."""
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            imported = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = imported
    return {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}


def test_no_import_cycle():
    graph = project_modules()
    assert len(graph) > 20 and "epmq.engine.calibration" in graph
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n == "epmq" or m == "epmq":  # the package itself (version, resolvers) imports nothing of ours
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
