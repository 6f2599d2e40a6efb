"""The CLIP suite's data: where each task's images come from (FusionBench's sources, or folders saved with
save_to_disk), how they are read (a DatasetDict {"train", "test"} with "image" and "label" columns), and how an
image becomes pixel values (the base's image processor, without torchvision).

The task sets (TA8, TALL14, TALL20), FusionBench's dataset sources, class names and prompt templates are data:
tasks.json beside this file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch

from epmq.io.hub import is_hub_id, load_dataset, local_path

TASK_DATA = json.loads(resources.files("epmq.families.clip").joinpath("tasks.json").read_text(encoding="utf-8"))
TASK_SETS: dict[str, list[str]] = TASK_DATA["task_sets"]
HUB_NAMESPACE: str = TASK_DATA["hub_namespace"]  # the default dataset pattern, tanganke/{task}
DATASET_KEYS = ("path", "name", "revision", "train_split", "test_split", "image_column", "label_column")


def dataset_spec(task: str, pattern: str, defaults: dict, override) -> dict:
    """Where task's data comes from and how it is read: `pattern` with the task filled in (under the default
    tanganke/{task}, FusionBench's own sources for the tasks it loads from elsewhere), `defaults` (splits,
    columns), then `override` (suite.dataset_overrides.<task>: a source, or a mapping of DATASET_KEYS)."""
    spec = {**defaults, "path": pattern.replace("{task}", task)}
    if pattern == HUB_NAMESPACE:  # FusionBench's sources for tasks not under tanganke/
        spec.update(TASK_DATA["datasets"].get(task, {}))
    if isinstance(override, str):
        spec.update(path=override)
    elif isinstance(override, Mapping):
        unknown = [k for k in override if k not in DATASET_KEYS]
        if unknown:
            raise ValueError(f"suite.dataset_overrides.{task}: unknown key {unknown[0]!r} "
                             f"(known: {', '.join(DATASET_KEYS)})")
        spec.update(dict(override))
    elif override is not None:
        raise ValueError(f"suite.dataset_overrides.{task} must be a source or a mapping, got {override!r}")
    return spec


class ImageTransform:
    """PIL image -> pixel_values (C, H, W) float32 with the base's CLIP image processor (no torchvision)."""

    def __init__(self, processor, channels: int):
        self.processor, self.channels = processor, channels

    def __call__(self, image) -> torch.Tensor:
        if self.channels == 3 and getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")  # grayscale and palette images (MNIST, GTSRB) to three channels
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_processor(folder: Path):
    """The base's CLIP image processor, the PIL implementation (transformers 5 makes torchvision the
    default backend and falls back with a warning; transformers 4's CLIPImageProcessor is this one)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    try:
        return Processor.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"suite.base ({folder}): no CLIP image processor config "
                         f"(preprocessor_config.json): {type(e).__name__}: {e}") from None


class DatasetSource:
    """Loads one task's data as a DatasetDict {"train", "test"} with columns "image" and "label".

    spec: path (hub id or save_to_disk folder), name (hub config), revision (hub branch, tag or commit),
    train_split, test_split, image_column, label_column. From the hub only those two splits are downloaded,
    after the rows the run needs (`require`) were checked against the dataset card's split sizes. Loaded
    datasets are kept, so the DataModule's repeated calls are free.
    """

    def __init__(self, specs: Mapping[str, dict]):
        self.specs = dict(specs)
        self._loaded: dict = {}
        self.rows_needed: dict[str, int | None] = {"train": None, "test": None}
        self.classes: dict[str, tuple[int, str]] = {}  # task -> (class names the head has, where they come from)

    def require(self, train: int, test: int | None) -> None:
        """Rows the run reads: `train` from the training split (calibration + selection), `test` from the test
        split (None: all of it)."""
        self.rows_needed = {"train": train, "test": test}

    def expect_classes(self, classes: Mapping[str, tuple[int, str]]) -> None:
        """task -> (number of class names of its head, where they come from), checked against the card's label."""
        self.classes = dict(classes)

    def __repr__(self) -> str:
        return f"DatasetSource({ {t: s['path'] for t, s in self.specs.items()} })"

    def __call__(self, task: str):
        if task not in self._loaded:
            self._loaded[task] = self._load(task, self.specs[task])
        return self._loaded[task]

    def _load(self, task: str, spec: dict):
        from datasets import Dataset, DatasetDict, load_from_disk

        path = str(spec["path"])
        what = f"suite.datasets ({task})"
        folder = local_path(path)
        if folder is not None and folder.is_dir():
            try:
                dd = load_from_disk(str(folder))
            except Exception as e:
                raise ValueError(f"{what}: {path} is not a dataset saved with save_to_disk: {e}") from None
            if isinstance(dd, Dataset):
                raise ValueError(f"{what}: {path} holds one Dataset; save a DatasetDict with "
                                 f"'{spec['train_split']}' and '{spec['test_split']}' splits")
        elif folder is None and is_hub_id(path):
            dd = load_dataset(path, spec.get("name"), what=what, splits=[spec["train_split"], spec["test_split"]],
                              revision=spec.get("revision"), check=lambda sizes, features: self._check(task, spec, sizes, features))
        else:
            raise ValueError(f"{what}: '{path}' is neither a folder nor a hub id")
        splits = {"train": spec["train_split"], "test": spec["test_split"]}
        missing = [s for s in splits.values() if s not in dd]
        if missing:
            raise ValueError(f"{what}: {path} has no split {missing[0]!r} (splits: {list(dd)})")
        columns = {spec["image_column"]: "image", spec["label_column"]: "label"}
        out = {}
        for ours, theirs in splits.items():
            ds = dd[theirs]
            absent = [c for c in columns if c not in ds.column_names]
            if absent:
                raise ValueError(f"{what}: split {theirs!r} of {path} has no column {absent[0]!r} (columns: "
                                 f"{ds.column_names}); set suite.image_column / suite.label_column")
            ds = ds.select_columns(list(columns))
            out[ours] = ds.rename_columns({k: v for k, v in columns.items() if k != v})
        return DatasetDict(out)

    def _check(self, task: str, spec: dict, sizes: dict | None, features) -> None:
        """Refuse, from the dataset card, a run that needs more rows than a split has, or a head with another
        number of classes than the label column."""
        label = (features or {}).get(spec["label_column"])
        if task in self.classes and getattr(label, "num_classes", None) not in (None, self.classes[task][0]):
            count, where = self.classes[task]
            raise ValueError(f"task {task!r}: {count} class names ({where}) but its dataset's label has "
                             f"{label.num_classes} classes ({spec['path']}, from the hub's dataset card; nothing "
                             f"downloaded); give the right ones with suite.classnames.{task}")
        options = {"train": "calib_samples + select_samples", "test": "test_samples"}
        for ours, need in self.rows_needed.items():
            split = spec[f"{ours}_split"]
            if sizes and need and sizes.get(split) is not None and sizes[split] < need:
                raise ValueError(f"task {task!r}: {options[ours]} = {need} exceed the {sizes[split]} rows of its "
                                 f"{split!r} split ({spec['path']}, from the hub's dataset card; nothing downloaded)")
