"""pyproject.toml's dependency ranges can be installed together: our lower bound on torch satisfies what every
installed dependency of ours asks of torch (transformers 5 disables torch below 2.6 and refuses `.bin` weights)."""

from __future__ import annotations

import importlib.metadata as metadata

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from helpers.config import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]}


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", ">", "==", "~=")]
    assert bounds, f"{requirement} has no lower bound"
    return max(bounds)


def test_our_torch_lower_bound_satisfies_every_dependency_that_asks_for_torch():
    ours = dependencies()
    torch_floor = lower_bound(ours["torch"])
    asked = {}
    for name in ours:
        if name == "torch":
            continue
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            # unconditional, or behind the extra that turns the package's torch support on
            if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": "torch"})):
                asked[name] = req
    assert "transformers" in asked  # transformers declares its torch floor behind its "torch" extra
    too_low = {name: str(req) for name, req in asked.items() if not req.specifier.contains(torch_floor)}
    assert not too_low, f"pyproject.toml's torch>={torch_floor} is below what these ask: {too_low}"
