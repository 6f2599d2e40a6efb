"""epmq.io.hub.load_dataset against the local hub (tests/helpers/hub_server.py): only the splits a run reads are
downloaded, later runs without the hub read the same files, a script-only repository loads from the hub's parquet
conversion, a revision is honoured, and the dataset card is checked before any data file is fetched."""

from __future__ import annotations

import logging

import datasets
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from epmq.io import hub

from helpers.hub_server import dataset_card, parquet_files

FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
ROWS = {"train": 6, "test": 3, "extra": 9}


def add_dataset(server, tmp_path, repo_id="org/tiny", rows=ROWS, revision="main"):
    """A parquet dataset repository: a card with features, split sizes and data files, one file per split."""
    dd = DatasetDict({split: Dataset.from_dict({"text": [f"row {100 * k + i}" for i in range(n)],
                                                "label": [i % 2 for i in range(n)]}, features=FEATURES)
                      for k, (split, n) in enumerate(rows.items())})
    files = parquet_files(dd, tmp_path, "data/{split}-00000-of-00001.parquet")
    server.add_repo(repo_id, {"README.md": dataset_card({"default": dd}, "data/{split}-*"), **files},
                    repo_type="dataset", revision=revision)


def parquet(tmp_path, rows: int, first: int = 0) -> bytes:
    path = tmp_path / f"rows-{rows}-{first}.parquet"
    Dataset.from_dict({"text": [f"row {first + i}" for i in range(rows)], "label": [i % 2 for i in range(rows)]},
                      features=FEATURES).to_parquet(path)
    return path.read_bytes()


def fetched(server) -> list[str]:
    return [path for method, path in server.requested("/resolve/") if method == "GET"]


def test_only_the_splits_asked_for_are_downloaded_and_read_again_offline(hub_server, tmp_path, monkeypatch):
    add_dataset(hub_server, tmp_path)
    dd = hub.load_dataset("org/tiny", splits=["train", "test"])
    assert {split: len(ds) for split, ds in dd.items()} == {"train": 6, "test": 3}
    assert dd["train"].features["label"] == FEATURES["label"]  # the card's ClassLabel, kept
    assert dd["test"]["text"] == ["row 100", "row 101", "row 102"]
    assert any("train-00000" in p for p in fetched(hub_server)) and any("test-00000" in p for p in fetched(hub_server))
    assert not hub_server.requested("extra-00000")  # neither fetched nor asked about

    asked = len(hub_server.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a later run on a machine without the hub: the same files
    again = hub.load_dataset("org/tiny", splits=["train", "test"])
    assert len(hub_server.log) == asked
    assert again["train"]["text"] == dd["train"]["text"] and again["test"].features == dd["test"].features
    with pytest.raises(ValueError, match="'org/other'.*HF_HUB_OFFLINE.*not in the datasets cache"):
        hub.load_dataset("org/other", splits=["train", "test"])


def test_every_split_without_a_choice(hub_server, tmp_path):
    add_dataset(hub_server, tmp_path)
    assert {split: len(ds) for split, ds in hub.load_dataset("org/tiny").items()} == ROWS


def test_a_revision_is_read_from_its_branch(hub_server, tmp_path):
    add_dataset(hub_server, tmp_path)
    add_dataset(hub_server, tmp_path, rows={"train": 2, "test": 4}, revision="v1")
    dd = hub.load_dataset("org/tiny", splits=["train", "test"], revision="v1")
    assert {split: len(ds) for split, ds in dd.items()} == {"train": 2, "test": 4}


def test_a_script_only_repository_loads_from_the_parquet_conversion(hub_server, tmp_path, caplog):
    hub_server.add_repo("org/cars", {"cars.py": "import datasets\n"}, repo_type="dataset")
    hub_server.add_repo("org/cars", {"default/train/0000.parquet": parquet(tmp_path, 4),
                                     "default/test/0000.parquet": parquet(tmp_path, 2, 50)},
                        repo_type="dataset", revision="refs/convert/parquet")
    with pytest.raises(RuntimeError, match="scripts are no longer supported"):  # what datasets itself does
        datasets.load_dataset("org/cars")
    with caplog.at_level(logging.INFO, logger="epmq.io.hub"):
        dd = hub.load_dataset("org/cars", splits=["train", "test"], what="suite.datasets (cars)")
    assert {split: len(ds) for split, ds in dd.items()} == {"train": 4, "test": 2}
    assert dd["test"]["text"] == ["row 50", "row 51"]
    assert "loading script" in caplog.text and "refs/convert/parquet" in caplog.text


def test_the_card_is_checked_before_any_data_file(hub_server, tmp_path):
    add_dataset(hub_server, tmp_path)
    seen = {}

    def check(sizes, features):
        seen.update(sizes=sizes, classes=features["label"].num_classes)
        raise ValueError("task tiny: 64 calibration samples exceed the 6 rows of its train split")

    with pytest.raises(ValueError, match="^task tiny: 64 calibration samples exceed the 6 rows"):
        hub.load_dataset("org/tiny", splits=["train", "test"], check=check)
    assert seen == {"sizes": ROWS, "classes": 2}
    assert not [p for p in fetched(hub_server) if p.endswith(".parquet")]
