"""Where a source lives: one rule for every model and dataset loader (epmq.io.hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from epmq.io.hub import is_hub_id, local_path, written_as_path
from epmq.io.weights import resolve_source


def test_existing_paths_are_local_and_hub_ids_have_the_owner_name_shape(tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # a folder named like a hub id is local when it exists: the disk wins
    assert local_path("org/model") == Path("org/model") and local_path(tmp_path / "w.safetensors") is not None
    assert local_path("org/absent") is None and local_path(3) is None and local_path(None) is None
    assert local_path("~") == Path.home()
    for source in ("openai/clip-vit-base-patch32", "tanganke/{task}", "org/model"):
        assert is_hub_id(source) and not written_as_path(source)
    for source in ("./org/model", "/abs/path", "~/x", "org\\model", "a/b/c", "mnist", "org/w.safetensors",
                   "org/model.bin"):
        assert not is_hub_id(source), source
    assert all(written_as_path(s) for s in ("./x", "../x", "/x", "~/x", "a\\b"))


def test_a_model_source_that_is_neither_names_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"suite\.base '/nowhere/model' does not exist \(not a file, folder or hub"):
        resolve_source("/nowhere/model", what="suite.base")
    with pytest.raises(ValueError, match=r"suite\.base 'a/b/c' does not exist"):
        resolve_source("a/b/c", what="suite.base")
    assert resolve_source(tmp_path, what="suite.base") == tmp_path
