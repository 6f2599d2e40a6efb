"""EvaluationProgress: what an evaluation is doing, on the console and in the run's log.

An evaluation of the paper's test sets runs for hours on a CPU (TA8 holds 87,433 test images, evaluated for the
experts, the FP merge and the quantized model). This callback says, for every evaluator run through
`trainer.test` (one loader per task, in the evaluator's task order):

    log lines   when an evaluation starts and ends; every `every_s` seconds within a task (done / total
                samples, rate, time left) and when a task that took that long ends (samples, seconds, rate),
                so that a log file shows progress without carriage returns (short tasks: debug level only)
    a bar       on the console (tqdm), one per task, when `bar` is on

The samples of a batch are counted from its "task" entry (every family's batches carry one).
"""

from __future__ import annotations

import logging
import time

import lightning as L
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class EvaluationProgress(L.Callback):
    """Per-task progress of `trainer.test` over a PerTaskEvaluator (its `tasks` name the loaders in order).

    Args:
        label: what is being evaluated, for the messages (e.g. "merged/test").
        bar: show a console bar per task besides the log lines.
        every_s: seconds between log lines within a task.
    """

    def __init__(self, label: str = "", bar: bool = True, every_s: float = 30.0):
        self.label, self.bar, self.every_s = label, bar, every_s
        self._task = None  # (loader index, task name, total samples or None)
        self._seen = 0
        self._t0 = self._last = 0.0
        self._pbar = None

    def on_test_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()
        self._samples = 0
        batches = trainer.num_test_batches
        log.info("%s: evaluating %d task(s), %d batches", self.label, len(batches), int(sum(batches)))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._task is None or self._task[0] != dataloader_idx:
            self._finish_task()
            name = pl_module.tasks[dataloader_idx] if dataloader_idx < len(pl_module.tasks) else str(dataloader_idx)
            loader = trainer.test_dataloaders[dataloader_idx]
            total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
            self._task = (dataloader_idx, name, total)
            self._seen = 0
            self._t0 = self._last = time.perf_counter()
            where = f"{name} ({dataloader_idx + 1}/{len(trainer.num_test_batches)})"
            log.debug("%s %s: %s samples", self.label, where, "?" if total is None else total)
            if self.bar:
                self._pbar = tqdm(total=total, desc=f"{self.label} · {where}", unit="sample", leave=False,
                                  dynamic_ncols=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        n = len(batch["task"]) if isinstance(batch, dict) and "task" in batch else 1
        self._seen += n
        if self._pbar is not None:
            self._pbar.update(n)
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            _, name, total = self._task
            rate = self._seen / max(now - self._t0, 1e-9)
            left = f", {(total - self._seen) / rate:.0f} s left" if total and rate > 0 else ""
            log.info("%s %s: %d/%s samples, %.1f samples/s%s", self.label, name, self._seen,
                     "?" if total is None else total, rate, left)

    def _finish_task(self) -> None:
        if self._task is None:
            return
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        seconds = time.perf_counter() - self._t0
        log.log(logging.INFO if seconds >= self.every_s else logging.DEBUG, "%s %s: %d samples in %.1f s (%.1f samples/s)",
                self.label, self._task[1], self._seen, seconds, self._seen / max(seconds, 1e-9))
        self._samples += self._seen
        self._task = None

    def on_test_end(self, trainer, pl_module) -> None:
        self._finish_task()
        seconds = time.perf_counter() - self._start
        log.info("%s: %d samples in %.1f s (%.1f samples/s)", self.label, self._samples, seconds,
                 self._samples / max(seconds, 1e-9))
