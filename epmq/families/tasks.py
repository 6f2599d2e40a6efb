"""What every family's per-task data and evaluation share: the DataModule base (checked options, seeded per-task
draws, the loaders) and the evaluator base (one model per task, torchmetrics, per-task logging).

Each family fills, in its `setup`, three lists of datasets in task order: calibration, anchor
selection and held-out test. Calibration batches never mix tasks (E-PMQ weighs tokens per task) and
come in the same fixed order on every rank: BlockwiseCalibration keeps batch b on rank
b % world_size, an exact split with no padding (DistributedSampler's padding would repeat samples
and bias H). Selection and test data come as one loader per task, in batches of eval_batch_size (forward
passes only, so they can be larger than the calibration's).

Loading: num_workers="auto" (the default) uses worker processes only where there is an accelerator (a CPU
run's cores are busy with the model, and workers would compete for them); pin_memory="auto" pins host
memory for a CUDA device's copies.

Every random draw has its own generator per (seed, task, stream), so one task's rows never depend
on which other tasks are in the run.

Besides its metric every evaluator keeps each task's mean negative log-likelihood (of the true label or the
target tokens, in nats): a smoother score than accuracy on a few hundred samples, which is what the anchor
selection needs.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Mapping

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchmetrics import Metric

from epmq.core.anchor_choice import check_share


def saved_task_dir(root: Path, task: str) -> Path | None:
    """The DatasetDict of `task` saved under root with save_to_disk: <root>/<task>, else <root>/data/<task> (a
    zoo's layout); None when neither holds one."""
    for path in (root / task, root / "data" / task):
        if (path / "dataset_dict.json").is_file():
            return path
    return None


def saved_tasks(root: Path) -> list[str]:
    """Names of the tasks saved under root (<root>/<task> or <root>/data/<task>, each a saved DatasetDict)."""
    folders = [root, root / "data"]
    return sorted({p.parent.name for f in folders if f.is_dir() for p in f.glob("*/dataset_dict.json")})


def task_generator(seed: int, task: str, stream: str) -> torch.Generator:
    """A torch.Generator for one (seed, task, stream), e.g. stream "calibration" or "test"."""
    digest = hashlib.sha256(f"{seed}/{task}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def check_integers(**options: tuple[object, int]) -> None:
    """ValueError naming the first option whose value is not an integer >= its lower bound.

    options: name -> (value, lower bound)."""
    for name, (value, low) in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def shared(n: int, share: float) -> int:
    """⌈share · n⌉ samples (at least one of n > 0); ValueError unless 0 < share <= 1."""
    return min(n, max(1, math.ceil(check_share(share, "a share of the samples") * n)))


def loader_workers(num_workers: int | str) -> int:
    """DataLoader worker processes: an integer as given; "auto": half the CPU cores (at most 8) when CUDA is
    available, else 0 (the loading runs in the main process, between the model's forward passes)."""
    if num_workers == "auto":
        return min(8, (os.cpu_count() or 2) // 2) if torch.cuda.is_available() else 0
    check_integers(num_workers=(num_workers, 0))
    return num_workers


def pinned(pin_memory: bool | str) -> bool:
    """Whether loaders pin host memory: as given, or "auto": when CUDA is available."""
    if pin_memory == "auto":
        return torch.cuda.is_available()
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory must be true, false or 'auto', got {pin_memory!r}")
    return pin_memory


class PerTaskDataModule(L.LightningDataModule):
    """Base of the families' DataModules.

    tasks: task names, in the order that defines the task index. calib_samples / select_samples:
    samples per task for calibration / anchor selection (disjoint). test_samples: None for the whole
    held-out split, else that many per task. batch_size: calibration batches; eval_batch_size:
    selection and test batches (None: batch_size). num_workers, pin_memory: the loaders' (int or
    "auto", bool or "auto": see loader_workers and pinned). Subclasses fill `_calib`, `_select` and
    `_test` (one dataset per task, in task order) in `setup`, and may set `collate_fn`.
    """

    collate_fn = None

    def __init__(self, tasks: Sequence[str], calib_samples: int, select_samples: int, test_samples: int | None,
                 batch_size: int, seed: int, num_workers: int | str = "auto", eval_batch_size: int | None = None,
                 pin_memory: bool | str = "auto"):
        super().__init__()
        if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct task names, got {tasks!r}")
        check_integers(calib_samples=(calib_samples, 1), select_samples=(select_samples, 0),
                       batch_size=(batch_size, 1))
        if eval_batch_size is not None:
            check_integers(eval_batch_size=(eval_batch_size, 1))
        if test_samples is not None and (not isinstance(test_samples, int) or test_samples < 1):
            raise ValueError(f"test_samples must be None or a positive integer, got {test_samples!r}")
        self.tasks = list(tasks)
        self.calib_samples, self.select_samples, self.test_samples = calib_samples, select_samples, test_samples
        self.batch_size, self.seed = batch_size, seed
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers, self.pin_memory = loader_workers(num_workers), pinned(pin_memory)
        self._calib: list[Dataset] = []
        self._select: list[Dataset] = []
        self._test: list[Dataset] = []

    # -- seeded rows ------------------------------------------------------------------------
    def draw_rows(self, task: str, n_rows: int, split: str) -> tuple[list[int], list[int]]:
        """Disjoint calibration and selection row indices of a split of n_rows rows (seeded)."""
        need = self.calib_samples + self.select_samples
        if need > n_rows:
            raise ValueError(f"task {task!r}: calib_samples + select_samples = {need} exceed the "
                             f"{n_rows} rows of its {split}")
        perm = torch.randperm(n_rows, generator=task_generator(self.seed, task, "calibration")).tolist()
        return perm[:self.calib_samples], perm[self.calib_samples:need]

    def held_out_rows(self, task: str, n_rows: int, split: str) -> list[int]:
        """Row indices to score: all n_rows, or a seeded sorted subset of test_samples rows."""
        if self.test_samples is None:
            return list(range(n_rows))
        if self.test_samples > n_rows:
            raise ValueError(f"task {task!r}: test_samples = {self.test_samples} exceed its {n_rows} {split} rows")
        perm = torch.randperm(n_rows, generator=task_generator(self.seed, task, "test")).tolist()
        return sorted(perm[:self.test_samples])

    # -- loaders ----------------------------------------------------------------------------
    def calibration_batches(self, share: float = 1.0) -> list[list[int]]:
        """Index lists into the concatenated calibration datasets: each batch from one task, task-major.
        share: the first ⌈share · n_t⌉ samples of each task only (its rows are a seeded draw, so a random subset)."""
        self.setup()
        batches, offset = [], 0
        for ds in self._calib:
            n = shared(len(ds), share)
            batches += [list(range(offset + k, offset + min(k + self.batch_size, n)))
                        for k in range(0, n, self.batch_size)]
            offset += len(ds)
        return batches

    def _loader(self, ds: Dataset, **kwargs) -> DataLoader:
        return DataLoader(ds, num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=self.collate_fn,
                          **kwargs)

    def train_dataloader(self, share: float = 1.0) -> DataLoader:
        """The calibration batches (see calibration_batches), in a fixed order on every rank."""
        self.setup()
        return self._loader(ConcatDataset(self._calib), batch_sampler=self.calibration_batches(share))

    def select_dataloader(self, share: float = 1.0) -> list[DataLoader]:
        """One loader per task (task order) over its anchor-selection samples (the first ⌈share · n⌉ of them)."""
        self.setup()
        return [self._loader(Subset(ds, range(shared(len(ds), share))) if share < 1 else ds,
                             batch_size=self.eval_batch_size) for ds in self._select]

    def select_halves_dataloaders(self) -> tuple[list[DataLoader], list[DataLoader]]:
        """The selection samples of each task cut in two halves (A: the first ⌊n/2⌋, B: the rest; the rows
        are a seeded random draw, so each half is too), one loader per task each. A comparison run scores
        its settings on both: a rule (grid, criterion, ingredient) chooses on A and is judged on B, so
        design choices are made without test data."""
        self.setup()
        halves = ([Subset(ds, range(len(ds) // 2)) for ds in self._select],
                  [Subset(ds, range(len(ds) // 2, len(ds))) for ds in self._select])
        return tuple([self._loader(ds, batch_size=self.eval_batch_size) for ds in half] for half in halves)

    @property
    def held_out(self) -> bool:
        """Whether the tasks have held-out samples to score (False: e.g. a causal LM calibrated on a text file)."""
        self.setup()
        return bool(self._test)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task (task order) over its held-out samples (none when `held_out` is False)."""
        self.setup()
        return [self._loader(ds, batch_size=self.eval_batch_size) for ds in self._test]


class PerTaskEvaluator(L.LightningModule):
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
