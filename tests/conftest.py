"""Fixtures shared by the test folders (which mirror epmq's packages); the tiny worlds, the config helper and
the W&B file reader are in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from epmq.core.merge import task_arithmetic
from epmq.families.offline.zoo import build_zoo

from helpers.hub_server import serve
from helpers.tiny import TASKS, tiny_model, with_task_vector

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores; the tests' tiny tensors gain
    torch.set_num_threads(1)              # nothing from intra-op threads, and N x cores threads contend (1.7x slower)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the processes a test starts


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hugging Face hub (tests/helpers/hub_server.py) that both hub libraries talk to, caches in tmp_path."""
    with serve(tmp_path, monkeypatch) as server:
        yield server


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Base, two experts (saved with save_pretrained) and their task-arithmetic merge."""
    root = tmp_path_factory.mktemp("zoo")
    base = tiny_model()
    base.save_pretrained(root / "base")
    experts = {}
    for t, task in enumerate(TASKS):
        expert = with_task_vector(base, seed=10 + t)
        expert.save_pretrained(root / task)
        experts[task] = expert
    merged = task_arithmetic(base.state_dict(), {t: e.state_dict() for t, e in experts.items()},
                             scaling_factor=0.5)
    return {"root": root, "base": base, "experts": experts, "merged": merged,
            "paths": {task: root / task for task in TASKS}}


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    """A cache folder holding the micro offline zoo (built once per test session): <epmq cache>/zoo,
    so that the config's own path interpolation (suite.cache_dir: ${paths.cache_dir}/zoo) finds it."""
    cache = tmp_path_factory.mktemp("epmq-cache") / "zoo"
    build_zoo("micro", cache_dir=cache, seed=0, progress=False)
    return cache
