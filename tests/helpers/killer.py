"""A callback that kills its own process with SIGKILL in the middle of a calibration step (tests of
resuming: nothing gets a chance to clean up, as when a machine is preempted)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillInStep(L.Callback):
    """SIGKILL at the start of batch 1 of schedule step `step` (steps before it are finished)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.step_index == self.step and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)
