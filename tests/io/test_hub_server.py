"""The local hub of tests/helpers/hub_server.py: huggingface_hub and datasets download from it over HTTP, through
their online code paths, as they would from huggingface.co."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.request import urlopen

import datasets
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save as safetensors_bytes

README = """---
dataset_info:
  features:
  - name: text
    dtype: string
  - name: label
    dtype: int64
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
  - split: extra
    path: data/extra-*
---
# tiny
"""
ROWS = {"train": 5, "test": 3, "extra": 2}


def parquet_bytes(tmp_path: Path, rows: int, offset: int = 0) -> bytes:
    path = tmp_path / f"rows-{rows}-{offset}.parquet"
    datasets.Dataset.from_dict({"text": [f"row {offset + i}" for i in range(rows)],
                                "label": [(offset + i) % 2 for i in range(rows)]}).to_parquet(path)
    return path.read_bytes()


def torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def resolved(server, method: str = "GET") -> list[str]:
    """The files the clients fetched (or only asked about, with HEAD) from the resolve endpoint."""
    return [path.split("/resolve/", 1)[1] for _, path in server.requested("/resolve/", method=method)]


def test_snapshot_download_fetches_model_repos_byte_for_byte(hub_server, tmp_path):
    state = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.zeros(2)}
    config = json.dumps({"model_type": "tiny", "hidden_size": 3}).encode()
    repos = {"org/tiny-bin": {"config.json": config, "pytorch_model.bin": torch_bytes(state)},
             "org/tiny-st": {"config.json": config, "model.safetensors": safetensors_bytes(state)}}
    for repo_id, files in repos.items():
        hub_server.add_repo(repo_id, files)
    hub_server.add_repo("org/tiny-data", {"README.md": README}, repo_type="dataset")

    for repo_id, files in repos.items():
        folder = Path(snapshot_download(repo_id))
        assert folder.is_relative_to(tmp_path)  # the hub cache is the test's
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(files)
        assert all((folder / name).read_bytes() == data for name, data in files.items())
    loaded = torch.load(Path(hf_hub_download("org/tiny-bin", "pytorch_model.bin")), weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    api = HfApi()
    info = api.repo_info("org/tiny-bin")
    assert info.id == "org/tiny-bin" and info.sha == hub_server.sha("org/tiny-bin")
    assert sorted(s.rfilename for s in info.siblings) == ["config.json", "pytorch_model.bin"]
    assert api.repo_info("org/tiny-data", repo_type="dataset").sha == hub_server.sha("org/tiny-data", "dataset")
    assert api.list_repo_files("org/tiny-st") == ["config.json", "model.safetensors"]
    sizes = {f.path: f.size for f in api.list_repo_tree("org/tiny-st")}
    assert sizes == {name: len(data) for name, data in repos["org/tiny-st"].items()}
    [weights] = api.get_paths_info("org/tiny-st", ["model.safetensors", "absent.bin"])
    assert weights.size == len(repos["org/tiny-st"]["model.safetensors"]) and weights.lfs is not None

    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/absent")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("org/absent", repo_type="dataset")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/tiny-bin", "absent.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/tiny-bin", "config.json", revision="no-such-branch")
    # plain HTTP downloads: each file fetched once, nothing about xet
    assert sorted(resolved(hub_server)) == sorted(
        f"{hub_server.sha(repo_id)}/{name}" for repo_id, files in repos.items() for name in files)
    assert not hub_server.requested("xet")


def test_load_dataset_reads_a_parquet_repo_and_only_the_splits_asked_for(hub_server, tmp_path):
    files = {"README.md": README}
    for offset, (split, rows) in enumerate(ROWS.items()):
        files[f"data/{split}-00000-of-00001.parquet"] = parquet_bytes(tmp_path, rows, offset * 100)
    hub_server.add_repo("org/tiny-parquet", files, repo_type="dataset")

    # only two splits asked for, on fresh caches: the third split's file is never downloaded
    two = datasets.load_dataset("org/tiny-parquet", data_files={"train": "data/train-*", "test": "data/test-*"})
    assert {split: len(ds) for split, ds in two.items()} == {"train": 5, "test": 3}
    fetched = resolved(hub_server)
    assert any("train-00000" in path for path in fetched) and any("test-00000" in path for path in fetched)
    assert not hub_server.requested("extra-00000")

    loaded = datasets.load_dataset("org/tiny-parquet")
    assert {split: len(ds) for split, ds in loaded.items()} == ROWS
    assert loaded["test"][0] == {"text": "row 100", "label": 0}

    # a branch of its own, by name
    hub_server.add_repo("org/tiny-parquet", {"README.md": README.replace("extra", "train2"),
                                             "data/train-00000-of-00001.parquet": parquet_bytes(tmp_path, 7),
                                             "data/test-00000-of-00001.parquet": parquet_bytes(tmp_path, 1),
                                             "data/train2-00000-of-00001.parquet": parquet_bytes(tmp_path, 2)},
                        repo_type="dataset", revision="v2")
    v2 = datasets.load_dataset("org/tiny-parquet", revision="v2")
    assert {split: len(ds) for split, ds in v2.items()} == {"train": 7, "test": 1, "train2": 2}


def test_a_script_only_repo_fails_on_main_and_loads_from_its_parquet_conversion(hub_server, tmp_path):
    repo_id = "org/foo"  # datasets looks for the script <name>.py
    hub_server.add_repo(repo_id, {"foo.py": "import datasets\n"}, repo_type="dataset")
    hub_server.add_repo(repo_id, {"default/train/0000.parquet": parquet_bytes(tmp_path, 4),
                                  "default/test/0000.parquet": parquet_bytes(tmp_path, 2, 50)},
                        repo_type="dataset", revision="refs/convert/parquet")

    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported, but found foo.py"):
        datasets.load_dataset(repo_id)
    converted = datasets.load_dataset(repo_id, revision="refs/convert/parquet")
    assert {split: len(ds) for split, ds in converted.items()} == {"train": 4, "test": 2}
    assert converted["test"]["text"] == ["row 50", "row 51"]

    # the clients URL-encode the revision; the raw form names the same commit
    sha = hub_server.sha(repo_id, "dataset", "refs/convert/parquet")
    for revision in ("refs/convert/parquet", "refs%2Fconvert%2Fparquet"):
        with urlopen(f"{hub_server.url}/api/datasets/{repo_id}/revision/{revision}") as response:
            assert json.load(response)["sha"] == sha
    assert HfApi().list_repo_files(repo_id, repo_type="dataset", revision="refs/convert/parquet") == [
        "default/test/0000.parquet", "default/train/0000.parquet"]
    refs = HfApi().list_repo_refs(repo_id, repo_type="dataset")
    assert [(r.name, r.target_commit) for r in refs.converts] == [("parquet", sha)]
