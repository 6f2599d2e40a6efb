"""Per-block calibration metrics, and a progress bar that counts blocks instead of epochs.

BlockMetrics logs, once block i is quantized (it calls the module's idempotent finish_block()):

    calib/block_<i>/<layer>/loss   GPTQ layer loss tr((Q - W*) H (Q - W*)ᵀ), H = Σ_t (w_t/n_t) X̂ᵀX̂
    calib/block_<i>/time_s         wall time of the block (statistics + solve + advancing inputs)
    calib/block_<i>/peak_mem_mb    peak accelerator memory of the block (CUDA), else the process's
                                   peak resident memory so far (CPU; monotone)

and keeps the same numbers in `history` (a list of dicts, one per block) for reports.
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
    """Logs per-layer loss, time and peak memory of each calibrated block."""

    def __init__(self):
        self.history: list[dict] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        i = pl_module.block_index
        if i >= pl_module.num_blocks:
            return
        pl_module.finish_block()
        record = {f"calib/block_{i}/{layer}/loss": loss for layer, loss in pl_module.block_losses[i].items()}
        record[f"calib/block_{i}/time_s"] = time.perf_counter() - self._t0
        record[f"calib/block_{i}/peak_mem_mb"] = peak_memory_mb(trainer.strategy.root_device)
        for key, value in record.items():  # losses agree over ranks; time and memory are averaged
            pl_module.log(key, value, on_epoch=True, sync_dist=True)
        self.history.append({"block": i, **record})


class BlockProgressBar(TQDMProgressBar):
    """TQDM bar described as 'block 2/4 · task mnist' rather than 'Epoch 1'."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(pl_module.progress_description())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.train_progress_bar.set_description(pl_module.progress_description(batch), refresh=False)
