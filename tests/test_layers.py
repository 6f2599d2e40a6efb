"""epmq's five packages import in one direction (../shared/LAYOUT.md), and nothing imports in a cycle:

    core  <-  io  <-  engine  <-  families, callbacks  <-  jobs

Every import counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers.config import ROOT

PACKAGES = ("epmq", "callbacks")
# what each layer may import (the package root `epmq` holds the version and the config resolvers)
ALLOWED = {
    "core": {"core"},
    "io": {"core", "io", "root"},
    "engine": {"core", "io", "engine", "root"},
    "families": {"core", "io", "engine", "families", "root"},
    "callbacks": {"io", "engine", "callbacks"},
    "jobs": {"core", "io", "engine", "families", "callbacks", "jobs", "root"},
    "root": {"root", "io"},  # `from epmq import load_quantized`, imported when asked for
}


def layer(module: str) -> str | None:
    """The layer of a dotted name of ours (a module, or a name in one); None for another package's. A name
    directly under epmq that is no layer is the package root's (its version, `load_quantized`)."""
    parts = module.split(".")
    if parts[0] == "callbacks":
        return "callbacks"
    if parts[0] != "epmq":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "root"


def placed(module: str) -> bool:
    """Whether a module of ours lives in a layer's package (only the package root may sit beside them)."""
    return module in ("epmq", "callbacks") or layer(module) != "root"


def imports(source: str, names: bool = False) -> set[str]:
    """The modules a source imports anywhere (module level and inside functions), as dotted names; with names,
    `from m import x` gives m.x too (x may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | ({f"{node.module}.{a.name}" for a in node.names} if names else set())
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(sources: dict[str, str]) -> list[str]:
    """'a imports b (layer x -> y)' for every import against the direction; sources: module name -> source."""
    found = []
    for name, source in sorted(sources.items()):
        own = layer(name)
        if not placed(name):
            found.append(f"{name} is in no layer: put it in one of epmq.{{core,io,engine,families,jobs}}")
            continue
        for imported in sorted(imports(source)):
            theirs = layer(imported)
            if theirs is not None and theirs not in ALLOWED[own]:
                found.append(f"{name} imports {imported} ({own} -> {theirs})")
    return found


def project_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def test_every_import_follows_the_layers():
    sources = project_sources()
    assert {layer(m) for m in sources} >= set(ALLOWED)  # every layer exists and is read
    assert violations(sources) == []


@pytest.mark.parametrize("module, source, expected", [
    ("epmq.core.gptq", "from epmq.engine.calibration import BlockwiseCalibration", "(core -> engine)"),
    ("epmq.core.anchor", "def f():\n    import epmq.io.hub\n", "(core -> io)"),
    ("epmq.io.step_store", "from epmq.engine.calibration import FinishedStep", "(io -> engine)"),
    ("epmq.engine.calibration", "from callbacks.expert_cache import ExpertActivationCache", "(engine -> callbacks)"),
    ("epmq.engine.targets", "from epmq.families.base import adapter_for", "(engine -> families)"),
    ("epmq.families.clip.suite", "from epmq.jobs.steps import build", "(families -> jobs)"),
    ("callbacks.block_metrics", "from epmq.jobs.report import accuracy_table", "(callbacks -> jobs)"),
    ("epmq.helpers", "import torch", "is in no layer"),
])
def test_an_import_against_the_layers_is_found(module, source, expected):
    sources = {**project_sources(), module: source}
    found = violations(sources)
    assert len(found) == 1 and found[0].startswith(module) and expected in found[0]


def test_no_import_cycle():
    sources = project_sources()
    graph = {m: {i for i in imports(s, names=True) if i in sources and i != m} for m, s in sources.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if n == "epmq" or m == "epmq":  # the package root imports only when asked (load_quantized)
                continue
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    assert len(graph) > 40 and "epmq.engine.calibration" in graph
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
