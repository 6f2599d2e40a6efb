"""Per-task evaluation with torchmetrics for `trainer.test`: what every suite's evaluator shares
(PerTaskEvaluator), and accuracy of per-task classifiers (TaskEvaluator).

Besides its metric every evaluator keeps each task's mean negative log-likelihood (of the true label
or the target tokens, in nats): a smoother score than accuracy on a few hundred samples, which is
what the anchor selection needs.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy


class PerTaskEvaluator(LightningModule):
    """One model per task, and the logging of per-task scores.

    models: task -> nn.Module, or a function returning one: it is built when its task's loader
    starts and dropped when the next one does, so that each expert is in memory only while its own
    task runs. Several tasks may share one module (a merged or quantized model). The test
    dataloaders come one per task, in `models` order. Subclasses update their metrics in test_step
    and hand the computed scores to `publish` at the end of the epoch.
    """

    def __init__(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], prefix: str = "test"):
        super().__init__()
        self.tasks = list(models)
        self.models = nn.ModuleDict({t: m for t, m in models.items() if isinstance(m, nn.Module)})
        self.builders = {t: m for t, m in models.items() if not isinstance(m, nn.Module)}
        self.prefix = prefix
        self._built: tuple[str, nn.Module] | None = None  # the one lazily built model
        self.results: dict[str, float] = {}
        self.nll: dict[str, float] = {}

    def model(self, task: str) -> nn.Module:
        """Task's model, on this module's device."""
        if task in self.models:
            return self.models[task]
        if self._built is None or self._built[0] != task:
            self._built = None  # drop the previous task's model before building the next
            self._built = (task, self.builders[task]().to(self.device).eval())
        return self._built[1]

    def losses(self, task: str, batch: Mapping) -> torch.Tensor:
        """The NLL terms (nats; per sample, or per target token) of one batch of `task`, 1-D: their mean
        over a task's samples is the task's `nll`. Subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} does not score single batches")

    @torch.no_grad()
    def mean_loss(self, loaders, device: torch.device) -> float:
        """Mean over tasks of each task's mean NLL on its loader (loaders in task order), computed here
        without a Trainer on `device` (where the models already are): what `nll["avg"]` is after
        trainer.test on the same loaders, up to float summation order."""
        per_task = []
        for task, loader in zip(self.tasks, loaders, strict=True):
            total, count = 0.0, 0
            for batch in loader:
                terms = self.losses(task, move_data_to_device(batch, device))
                total, count = total + float(terms.double().sum()), count + terms.numel()
            if count == 0:
                raise ValueError(f"no selection samples for task {task!r}")
            per_task.append(total / count)
        return sum(per_task) / len(per_task)

    def publish(self, scores: Mapping[str, torch.Tensor], nll: Mapping[str, torch.Tensor],
                names: str | Mapping[str, str], avg_name: str) -> None:
        """Log `<prefix>/<task>/<name>` per task, `<prefix>/avg_<avg_name>` (their unweighted mean) and
        `<prefix>/avg_nll`; keep them in `results` and `nll` (task -> value, and "avg")."""
        log = dict(add_dataloader_idx=False, sync_dist=True)
        for t, value in scores.items():
            self.log(f"{self.prefix}/{t}/{names if isinstance(names, str) else names[t]}", value, **log)
        avg = torch.stack([v.float() for v in scores.values()]).mean()
        avg_nll = torch.stack([v.float() for v in nll.values()]).mean()
        self.log(f"{self.prefix}/avg_{avg_name}", avg, **log)
        self.log(f"{self.prefix}/avg_nll", avg_nll, **log)
        self.results = {t: float(v) for t, v in scores.items()} | {"avg": float(avg)}
        self.nll = {t: float(v) for t, v in nll.items()} | {"avg": float(avg_nll)}
        for metric in self.modules():  # ready for the next trainer.test
            if isinstance(metric, Metric):
                metric.reset()
        self._built = None


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
