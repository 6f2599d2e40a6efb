"""Image classification tasks: their data (TaskDataModule), their evaluation (TaskEvaluator) and what the
suites of such tasks share (ImageSuite: a classifier per task over the calibrated vision tower).

One data module serves both kinds of task data:

- the offline zoo's datasets, `<zoo>/data/<task>` written by `epmq.families.offline.zoo.build_zoo`: splits
  train/calibration/test with a ready "pixel_values" column (float32, C x H x W, normalised);
- hub-format datasets, `datasets.load_dataset("tanganke/<task>")` or a DatasetDict saved with
  `save_to_disk` under `<root>/<task>`: splits train/test with "image" (PIL) and "label" columns,
  turned into pixel values by a `transform` callable (a CLIP image processor or any image -> tensor
  function). Without a "calibration" split, calibration samples come from "train".

From the calibration split of each task a seeded torch.Generator draws `calib_samples` rows for
calibration and a disjoint `select_samples` rows for choosing the anchor strength. Batches are
dicts {"pixel_values": (B, C, H, W) float32, "label": (B,) long, "task": (B,) long task index};
every calibration batch holds samples of a single task.

DDP: every rank gets the same full calibration loader and BlockwiseCalibration shards its batches
exactly by rank; run the Trainer with `use_distributed_sampler=False` so that Lightning does not
replace the batch sampler with a padded DistributedSampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from datasets import DatasetDict, load_dataset, load_from_disk
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from epmq.families.base import Suite
from epmq.families.tasks import PerTaskDataModule, PerTaskEvaluator, saved_task_dir, saved_tasks
from epmq.io.hub import local_path, written_as_path

# Hub names that differ from the task name (DESIGN §4).
HUB_NAMES = {"stanford-cars": "stanford_cars"}
DEFAULT_HUB = "tanganke"


def hub_id(task: str, hub: str = DEFAULT_HUB) -> str:
    """Hub dataset id of a task: "<hub>/<name>", or hub.format(task=...) when hub has a {task} field."""
    return hub.format(task=task) if "{task}" in hub else f"{hub}/{HUB_NAMES.get(task, task)}"


def load_task_dataset(task: str, root_or_hub: str | Path = DEFAULT_HUB) -> DatasetDict:
    """Load one task's DatasetDict from a local folder (zoo root or folder of saved datasets) or the hub,
    or from a suite's own loader (a callable task -> DatasetDict with "train"/"test" splits)."""
    if callable(root_or_hub):
        return root_or_hub(task)
    root = local_path(root_or_hub)
    if root is not None:
        path = saved_task_dir(root, task)
        if path is None:
            raise ValueError(f"unknown task {task!r}: no saved dataset under {root} "
                             f"(looked for {task} and data/{task}); available: {saved_tasks(root)}")
        return load_from_disk(str(path))
    return load_dataset(hub_id(task, str(root_or_hub)))


def _pixel_values(out: Any) -> torch.Tensor:
    """Normalise a transform's output (tensor, array, or an image processor's BatchFeature) to (C, H, W)."""
    if isinstance(out, Mapping):
        out = out["pixel_values"]
    if isinstance(out, Sequence) and not isinstance(out, torch.Tensor):
        out = out[0] if len(out) == 1 else out
    x = torch.as_tensor(out, dtype=torch.float32)
    return x[0] if x.ndim == 4 else x


class TaskSamples(Dataset):
    """Selected rows of one task's split as dict samples {"pixel_values", "label", "task"}.

    Rows with a ready "pixel_values" column are read once into tensors (cheap for the small zoo
    images); "image" rows stay lazy and go through `transform` one at a time.
    """

    def __init__(self, split, rows: list[int], task_id: int, transform: Callable | None, task: str):
        self.rows, self.task_id, self.transform = list(rows), task_id, transform
        columns = split.column_names
        if "label" not in columns:
            raise ValueError(f"task {task!r}: dataset has no 'label' column (columns: {columns})")
        if "pixel_values" in columns:
            batch = split.with_format("torch", columns=["pixel_values", "label"])[self.rows]
            self.pixel_values, self.labels, self.split = batch["pixel_values"].float(), batch["label"].long(), None
        elif "image" in columns:
            if transform is None:
                raise ValueError(f"task {task!r} has an 'image' column: pass transform= (e.g. a CLIP image "
                                 f"processor) to turn images into pixel_values")
            self.split = split.select_columns(["image", "label"])
        else:
            raise ValueError(f"task {task!r}: dataset needs a 'pixel_values' or an 'image' column (columns: {columns})")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.split is None:
            x, y = self.pixel_values[i], self.labels[i]
        else:
            row = self.split[self.rows[i]]
            x, y = _pixel_values(self.transform(row["image"])), torch.tensor(row["label"], dtype=torch.long)
        return {"pixel_values": x, "label": y, "task": torch.tensor(self.task_id, dtype=torch.long)}


class TaskDataModule(PerTaskDataModule):
    """Calibration, selection and test data for a list of tasks.

    tasks: task names, in the order that defines the task index. root_or_hub: a local folder (a zoo
    root or a folder of saved DatasetDicts) or a hub namespace such as "tanganke" (or a template
    "org/{task}"), or a callable task -> DatasetDict (a suite's loader, e.g. per-task hub ids and
    columns). calib_samples / select_samples: rows per task for calibration / anchor selection
    (disjoint, both from the calibration split). test_samples: None for the whole test split, else
    a seeded subset of that many rows per task.
    """

    def __init__(self, tasks: Sequence[str], root_or_hub: str | Path = DEFAULT_HUB, calib_samples: int = 64,
                 select_samples: int = 0, batch_size: int = 32, seed: int = 0, transform: Callable | None = None,
                 test_samples: int | None = None, num_workers: int | str = "auto", **loading):
        super().__init__(tasks, calib_samples, select_samples, test_samples, batch_size, seed, num_workers, **loading)
        root = local_path(root_or_hub)
        if root is None and isinstance(root_or_hub, (str, Path)) and written_as_path(root_or_hub):
            raise ValueError(f"root_or_hub: no folder {root_or_hub!r} (hub ids look like 'tanganke')")
        if root is not None:  # fail on unknown tasks now, before any loading
            unknown = [t for t in tasks if saved_task_dir(root, t) is None]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown} under {root}; available: {saved_tasks(root)}")
        self.root_or_hub, self.transform = root_or_hub, transform
        self.calib_rows: dict[str, list[int]] = {}
        self.select_rows: dict[str, list[int]] = {}
        self.test_rows: dict[str, list[int]] = {}
        self.num_classes: dict[str, int] = {}
        self._declare_rows()  # before anything loads a dataset (a suite's heads read the class labels first)

    def prepare_data(self) -> None:
        """Download hub datasets once (rank 0); local folders need nothing."""
        if local_path(self.root_or_hub) is None:
            for task in self.tasks:
                load_task_dataset(task, self.root_or_hub)

    def _declare_rows(self) -> None:
        """Tell a suite's loader that can check split sizes before downloading (DatasetSource) what the run reads."""
        if hasattr(self.root_or_hub, "require"):
            self.root_or_hub.require(self.calib_samples + self.select_samples, self.test_samples)

    def setup(self, stage: str | None = None) -> None:
        """Load every task and draw its calibration, selection and test rows (once; later calls are no-ops)."""
        if self._calib:
            return
        for i, task in enumerate(self.tasks):
            dd = load_task_dataset(task, self.root_or_hub)
            if "test" not in dd:
                raise ValueError(f"task {task!r} has no 'test' split (splits: {list(dd)})")
            calib_split = dd["calibration"] if "calibration" in dd else dd["train"]
            self.calib_rows[task], self.select_rows[task] = self.draw_rows(task, len(calib_split),
                                                                           "calibration source split")
            self.test_rows[task] = self.held_out_rows(task, len(dd["test"]), "test")
            label = dd["test"].features.get("label")
            self.num_classes[task] = getattr(label, "num_classes", None) or int(max(dd["test"]["label"])) + 1
            self._calib.append(TaskSamples(calib_split, self.calib_rows[task], i, self.transform, task))
            self._select.append(TaskSamples(calib_split, self.select_rows[task], i, self.transform, task))
            self._test.append(TaskSamples(dd["test"], self.test_rows[task], i, self.transform, task))


class TaskEvaluator(PerTaskEvaluator):
    """Accuracy of per-task classifiers.

    classifiers: task -> nn.Module mapping pixel_values (B, C, H, W) to logits (B, num_classes[task]),
    or a function building one (see PerTaskEvaluator). Dataloader i is scored with task i's
    classifier and its own MulticlassAccuracy (micro accuracy, in [0, 1]). Logged:
    `<prefix>/<task>/acc`, `<prefix>/avg_acc` and `<prefix>/avg_nll` (mean cross-entropy in nats).
    """

    def __init__(self, classifiers: Mapping[str, nn.Module | Callable[[], nn.Module]],
                 num_classes: Mapping[str, int], prefix: str = "test"):
        super().__init__(classifiers, prefix)
        missing = [t for t in self.tasks if t not in num_classes]
        if missing:
            raise ValueError(f"num_classes has no entry for task(s) {missing}")
        self.accuracy = nn.ModuleDict(
            {t: MulticlassAccuracy(num_classes=num_classes[t], average="micro") for t in self.tasks})
        self.cross_entropy = nn.ModuleDict({t: MeanMetric() for t in self.tasks})

    def losses(self, task: str, batch: Mapping) -> torch.Tensor:
        """Cross-entropy of the true labels, (batch,) nats."""
        return F.cross_entropy(self.model(task)(batch["pixel_values"]).float(), batch["label"], reduction="none")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        logits = self.model(task)(batch["pixel_values"])
        self.accuracy[task].update(logits, batch["label"])
        self.cross_entropy[task].update(F.cross_entropy(logits.float(), batch["label"], reduction="none"))

    def on_test_epoch_end(self) -> None:
        self.publish({t: self.accuracy[t].compute() for t in self.tasks},
                     {t: self.cross_entropy[t].compute() for t in self.tasks}, "acc", "acc")


class ImageSuite(Suite):
    """A suite of image classification tasks: task t's classifier reads the calibrated vision tower.

    Subclasses give `classifier(tower, task)` and `num_classes` (task -> number of classes); the evaluator,
    and RegMean's inputs (the batches' pixel values), are shared here.
    """

    regmean_unsupported = None
    num_classes: dict[str, int]

    def classifier(self, tower: nn.Module, task: str) -> nn.Module:
        """Task t's classifier over `tower`'s features: logits (batch, classes) from pixel values."""
        raise NotImplementedError

    def classifiers(self):
        """classify(tower, task) for one evaluator (a suite may share heads between its tasks' classifiers)."""
        return self.classifier

    def evaluator(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], prefix: str) -> TaskEvaluator:
        """Per-task accuracy of each task's model under its classifier (TaskEvaluator)."""
        classify = self.classifiers()

        def classifier(task, model):
            if isinstance(model, nn.Module):
                return classify(model, task)
            return lambda: classify(model(), task)  # built when its task's turn comes
        return TaskEvaluator({t: classifier(t, models[t]) for t in self.tasks},
                             {t: self.num_classes[t] for t in self.tasks}, prefix)

    def regmean_inputs(self, batch: Mapping) -> dict:
        return {"pixel_values": batch["pixel_values"]}
