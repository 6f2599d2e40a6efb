"""ExpertActivationCache: the Lightning shell of the experts' targets provider (epmq.engine.targets).

It forwards the fit hooks of a BlockwiseCalibration to an ExpertTargets, which computes (or replays) each
expert's outputs for the current block, one block of one expert at a time; the module reads them in its
training step. The provider sees the calibration only through `module.view()`.
"""

from __future__ import annotations

import lightning as L

from epmq.engine.targets import ExpertTargets


class ExpertActivationCache(L.Callback):
    """Forwards fit, step and batch hooks to `targets` (share one ExpertTargets between fits to replay targets)."""

    def __init__(self, targets: ExpertTargets):
        if not isinstance(targets, ExpertTargets):
            raise ValueError(f"targets must be an epmq.engine.targets.ExpertTargets, got {type(targets).__name__}")
        self.targets = targets

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.targets.attach(pl_module.task_names, pl_module.model)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.targets.fit_start(pl_module.view())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.targets.step_start(pl_module.view())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.targets.batch_start(pl_module.view(), batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.targets.step_end(pl_module.view())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.targets.fit_end(pl_module.view())
