"""The embedded offline suite: a small CLIP vision zoo built here, classified by frozen linear heads."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from epmq.engine.adapters import ModelAdapter
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.images import ImageSuite, TaskDataModule
from epmq.families.offline.classifier import CLIPClassifier
from epmq.families.offline.zoo import build_zoo, open_zoo


class OfflineSuite(ImageSuite):
    """The embedded offline suite: a small CLIP vision zoo built here on first use, then cached.

    Args:
        size: "default" (the benchmark, a few minutes to build) or "micro" (seconds; tests).
        cache_dir: where zoos are cached (None: $EPMQ_CACHE or ~/.cache/epmq/zoo).
        seed: the zoo's seed (data splits, pretraining, experts).
        tasks: a subset of the zoo's tasks, in the order to report them (None: all).
        progress: show the builder's progress bars.
        merged: a merged model to quantize instead of merging (`merge=none`): a save_pretrained
            folder, a weights file or a hub id, in the zoo's architecture.
        root: a zoo folder built earlier (e.g. on another machine), used as it is instead of
            building or looking up the cache; size, cache_dir and seed are then ignored.
    """

    name = "offline"

    def __init__(self, size: str = "default", cache_dir: str | None = None, seed: int = 0,
                 tasks: Sequence[str] | None = None, progress: bool = True, merged: str | None = None,
                 root: str | None = None):
        self.zoo = open_zoo(root if root else build_zoo(size, cache_dir, seed, progress))
        self.merged = merged
        known = self.zoo.tasks
        self.tasks = list(tasks) if tasks else known
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"suite.tasks: unknown task(s) {unknown}; the offline zoo has {known}")
        self.num_classes = {t: int(self.zoo.manifest["num_classes"][t]) for t in self.tasks}
        self.base = self.zoo.tower_dir("base")
        self.experts = {t: self.zoo.tower_dir(t) for t in self.tasks}
        self._config = CLIPVisionConfig.from_pretrained(str(self.base))
        self._heads = {t: self.zoo.head(t) for t in self.tasks}


    def model(self, state_dict: dict[str, torch.Tensor] | None = None) -> CLIPVisionModel:
        """A CLIPVisionModel in eval mode with `state_dict` loaded (None: the base's weights)."""
        if state_dict is None:
            return CLIPVisionModel.from_pretrained(str(self.base)).eval()
        model = CLIPVisionModel(self._config)
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def adapter(self, model: nn.Module) -> ModelAdapter:
        return CLIPVisionAdapter()

    def classifier(self, tower: nn.Module, task: str) -> nn.Module:
        """Task t's classifier: the frozen linear head of task t on `tower`'s pooled features."""
        return CLIPClassifier(tower, self._heads[task]).eval()

    def datamodule(self, **data) -> TaskDataModule:
        """Per-task calibration, selection and test data from the zoo's saved splits."""
        return TaskDataModule(self.tasks, root_or_hub=self.zoo.root / "data", **data)

    def describe(self) -> dict:
        """What the report records about the suite, with the hash of the zoo weights the run used."""
        return {"name": self.name, "root": str(self.zoo.root), "tasks": self.tasks,
                "fingerprint": self.zoo.manifest["fingerprint"], "weights_sha256": self.zoo.weights_sha256}
