"""Per-task evaluation with torchmetrics: one metric object per task, logged as `<prefix>/<task>/acc`.

Besides accuracy the evaluator keeps each task's mean cross-entropy (negative log-likelihood of the
true label, in nats): a smoother score than accuracy on a few hundred samples, which is what the
anchor selection needs.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from lightning.pytorch import LightningModule
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class TaskEvaluator(LightningModule):
    """Accuracy of per-task classifiers, for `trainer.test`.

    classifiers: task -> nn.Module mapping pixel_values (B, C, H, W) to logits (B, num_classes[task]);
    the modules may share one tower (a merged or quantized model) or each be its own. A value may
    also be a function returning the module: it is built when its task's loader starts and dropped
    when the next one does, so that each expert is in memory only while its own task runs.
    The test dataloaders come one per task, in `classifiers` order; dataloader i is scored with
    task i's classifier and its own MulticlassAccuracy (micro accuracy, in [0, 1]).
    Logged: `<prefix>/<task>/acc` for each task, `<prefix>/avg_acc` (their unweighted mean) and
    `<prefix>/avg_nll`; kept in `results` (task -> accuracy, and "avg") and `nll` (task -> mean
    cross-entropy in nats, and "avg").
    """

    def __init__(self, classifiers: Mapping[str, nn.Module | Callable[[], nn.Module]],
                 num_classes: Mapping[str, int], prefix: str = "test"):
        super().__init__()
        tasks = list(classifiers)
        missing = [t for t in tasks if t not in num_classes]
        if missing:
            raise ValueError(f"num_classes has no entry for task(s) {missing}")
        self.classifiers = nn.ModuleDict({t: c for t, c in classifiers.items() if isinstance(c, nn.Module)})
        self.builders = {t: c for t, c in classifiers.items() if not isinstance(c, nn.Module)}
        self._built: tuple[str, nn.Module] | None = None  # the one lazily built classifier
        self.tasks = tasks
        self.prefix = prefix
        self.accuracy = nn.ModuleDict(
            {t: MulticlassAccuracy(num_classes=num_classes[t], average="micro") for t in tasks})
        self.cross_entropy = nn.ModuleDict({t: MeanMetric() for t in tasks})
        self.results: dict[str, float] = {}
        self.nll: dict[str, float] = {}

    def classifier(self, task: str) -> nn.Module:
        if task in self.classifiers:
            return self.classifiers[task]
        if self._built is None or self._built[0] != task:
            self._built = None  # drop the previous task's model before building the next
            self._built = (task, self.builders[task]().to(self.device).eval())
        return self._built[1]

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        logits = self.classifier(task)(batch["pixel_values"])
        self.accuracy[task].update(logits, batch["label"])
        self.cross_entropy[task].update(F.cross_entropy(logits.float(), batch["label"], reduction="none"))

    def on_test_epoch_end(self) -> None:
        accs = {t: self.accuracy[t].compute() for t in self.tasks}
        for t, acc in accs.items():
            self.log(f"{self.prefix}/{t}/acc", acc, add_dataloader_idx=False, sync_dist=True)
        avg = torch.stack(list(accs.values())).mean()
        self.log(f"{self.prefix}/avg_acc", avg, add_dataloader_idx=False, sync_dist=True)
        nll = {t: self.cross_entropy[t].compute() for t in self.tasks}
        avg_nll = torch.stack(list(nll.values())).mean()
        self.log(f"{self.prefix}/avg_nll", avg_nll, add_dataloader_idx=False, sync_dist=True)
        self.results = {t: float(a) for t, a in accs.items()} | {"avg": float(avg)}
        self.nll = {t: float(x) for t, x in nll.items()} | {"avg": float(avg_nll)}
        for m in [*self.accuracy.values(), *self.cross_entropy.values()]:
            m.reset()
        self._built = None
