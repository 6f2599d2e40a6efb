"""StepSaver: save every finished calibration step, so that a killed run can resume.

After each fit epoch (one schedule step, solved in the epoch's last batch) rank 0 appends the step
to an epmq.io.step_store.StepStore in the run folder: the step's codes and grids, then the progress
file that lists it, each written atomically. `python train.py ... resume=<run folder>` reloads
them and continues after the last finished step (epmq.engine.calibration.BlockwiseCalibration(resume=...)).
"""

from __future__ import annotations

import lightning as L

from epmq.io.step_store import StepStore


class StepSaver(L.Callback):
    """Saves each step BlockwiseCalibration finishes into `store` (rank 0 only)."""

    def __init__(self, store: StepStore):
        self.store = store

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        saved = {s["index"] for s in self.store.steps}
        for step in pl_module.finished:
            if step.index not in saved:
                self.store.save(step)
