"""Per-block calibration metrics, and a progress bar that counts blocks instead of epochs.

The module logs each layer's numbers as its step is solved (calib/<block>/<layer>/loss, rtn_loss,
anchor_shift). BlockMetrics adds, once the last step of a block is solved:

    calib/<block>/time_s        wall time of the block (all its steps: statistics, solves, advancing
                                the batches to the next block)
    calib/<block>/peak_mem_mb   peak accelerator memory during the block (CUDA), else the process's
                                peak resident memory so far (CPU; monotone)

<block> is block_<i>, or <stage>/block_<i> for models with several stages (T5: encoder, decoder).
The same numbers are kept in `history` (one dict per block) for reports.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: allocated on a CUDA device, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class BlockMetrics(L.Callback):
    """Logs wall time and peak memory of each calibrated block."""

    def __init__(self):
        self.history: list[dict] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # a block's first step, or a run resumed in the middle of a block
        if pl_module.step_index < len(pl_module.schedule) and (pl_module.current_step.first or not self._t0):
            device = trainer.strategy.root_device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not pl_module.finished:
            return
        step = pl_module.schedule[pl_module.finished[-1].index]
        if not step.last or any(h["block"] == step.label for h in self.history):
            return
        record = {f"calib/{step.label}/time_s": time.perf_counter() - self._t0,
                  f"calib/{step.label}/peak_mem_mb": peak_memory_mb(trainer.strategy.root_device)}
        for key, value in record.items():  # time and memory are averaged over ranks
            pl_module.log(key, value, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        self.history.append({"block": step.label, **record})


class BlockProgressBar(TQDMProgressBar):
    """TQDM bar described as 'block 2/4 · task mnist' rather than 'Epoch 1'."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(pl_module.progress_description())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.train_progress_bar.set_description(pl_module.progress_description(batch), refresh=False)
