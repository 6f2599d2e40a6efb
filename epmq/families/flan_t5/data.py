"""GLUE tasks as text-to-text data for calibration, anchor selection and evaluation (a LightningDataModule).

Sources, as the `datasets` library lays GLUE out: `load_dataset("nyu-mll/glue", task)` (a hub id
with config = task, or a "{task}" pattern naming one dataset per task), or DatasetDicts saved with
`save_to_disk` under `<root>/<task>` (or `<root>/data/<task>`). Every example is rendered as
FusionBench renders it (epmq.families.flan_t5.glue) and tokenized with the model's tokenizer (truncated to
max_source_length / max_target_length tokens; the tokenizer appends </s>).

From the train split of each task a seeded torch.Generator draws `calib_samples` rows for calibration
and a disjoint `select_samples` rows for choosing the anchor; the evaluation split (validation,
validation_matched for MNLI) is scored, whole or a seeded subset of `test_samples` rows.

Batches are dicts, padded per batch (right padding):
    input_ids               (B, S) long, pad id beyond each prompt
    attention_mask          (B, S) long, 1 on real tokens
    labels                  (B, L) long, target ids, -100 beyond each target (T5's ignore index)
    decoder_input_ids       (B, L) long, the labels shifted right behind the decoder start token, as T5
                            does for teacher forcing (pad id beyond each target)
    decoder_attention_mask  (B, L) long, 1 where a target token is predicted (labels != -100)
    task                    (B,)   long task index
The decoder mask is given rather than left to the engine to derive from the labels: the decoder
positions that count are exactly those T5's loss scores, however much padding the batch has (an
input position after the last target token exists only in padded rows and must not count).
Every calibration batch holds samples of a single task, task-major. DDP: every rank gets the same full
calibration loader (BlockwiseCalibration shards its batches exactly); use_distributed_sampler=False.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import DatasetDict, load_from_disk
from torch.utils.data import Dataset

from epmq.families.flan_t5.glue import glue_task
from epmq.families.tasks import PerTaskDataModule, check_integers, saved_task_dir, saved_tasks
from epmq.io.hub import load_dataset, local_path, written_as_path

DEFAULT_DATA = "nyu-mll/glue"
IGNORE = -100  # label id T5's loss (and the calibration's token mask) ignores


def _local(data: str | Path) -> Path | None:
    """The folder of saved GLUE tasks `data` names; None for a hub dataset. A path that does not exist is
    local too (it names no hub dataset): then a Path that is not a folder."""
    root = local_path(data)
    return root if root is not None or not written_as_path(data) else Path(str(data)).expanduser()


def load_glue(task: str, data: str | Path = DEFAULT_DATA) -> DatasetDict:
    """Task `task`'s DatasetDict from a local folder or the hub (`data`, config = task)."""
    root = _local(data)
    if root is not None:
        path = saved_task_dir(root, task) if root.is_dir() else None
        if path is None:
            available = saved_tasks(root) if root.is_dir() else []
            raise ValueError(f"no saved dataset for task {task!r} under {root} (looked for {task}/ and "
                             f"data/{task}/ with dataset_dict.json); available: {available}")
        return load_from_disk(str(path))
    data = str(data)  # a hub id: refused within seconds, naming it, when the hub does not answer
    splits = ["train", glue_task(task).eval_split]  # GLUE's test splits have no labels: never downloaded
    if "{task}" in data:
        return load_dataset(data.format(task=task), what="suite.data", splits=splits)
    return load_dataset(data, task, what="suite.data", splits=splits)


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []


class GlueSamples(Dataset):
    """Rendered and tokenized rows of one task's split: {"input_ids", "labels" (1-D long), "task"}."""

    def __init__(self, split, rows: list[int], task: str, task_id: int, tokenizer, max_source_length: int,
                 max_target_length: int):
        self.rows, self.task_id = list(rows), task_id
        spec = glue_task(task)
        missing = [c for c in (*spec.columns, "label") if c not in split.column_names]
        if missing:
            raise ValueError(f"task {task!r}: dataset lacks column(s) {missing} (columns: {split.column_names})")
        pairs = [spec.render(e) for e in split.select(self.rows)]  # [(prompt, target)]
        self.prompts, self.targets = [p for p, _ in pairs], [t for _, t in pairs]
        self.input_ids = _encode(tokenizer, self.prompts, max_source_length)  # per row: prompt ids + </s>
        self.labels = _encode(tokenizer, self.targets, max_target_length)     # per row: target ids + </s>

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(self.input_ids[i], dtype=torch.long),
                "labels": torch.tensor(self.labels[i], dtype=torch.long),
                "task": torch.tensor(self.task_id, dtype=torch.long)}


class PadBatch:
    """Collate samples into a right-padded batch (see the module doc). A class, so loaders pickle.

    pad_id: the tokenizer's pad id; decoder_start_id: the model's decoder start token (T5: the pad id).
    """

    def __init__(self, pad_id: int, decoder_start_id: int):
        self.pad_id, self.decoder_start_id = int(pad_id), int(decoder_start_id)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        S = max(len(s["input_ids"]) for s in samples)
        L_ = max(len(s["labels"]) for s in samples)
        input_ids = torch.full((len(samples), S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), S), dtype=torch.long)
        labels = torch.full((len(samples), L_), IGNORE, dtype=torch.long)
        for b, s in enumerate(samples):
            n, m = len(s["input_ids"]), len(s["labels"])
            input_ids[b, :n], attention_mask[b, :n], labels[b, :m] = s["input_ids"], 1, s["labels"]
        # teacher forcing as T5's _shift_right: the start token, then each target token but the last
        decoder_input_ids = torch.cat([torch.full((len(samples), 1), self.decoder_start_id), labels[:, :-1]], 1)
        decoder_input_ids[decoder_input_ids == IGNORE] = self.pad_id
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": (labels != IGNORE).long(),
                "task": torch.stack([s["task"] for s in samples])}


class GlueDataModule(PerTaskDataModule):
    """Calibration, selection and evaluation data of GLUE tasks as text to text.

    tasks: GLUE task names, in the order that defines the task index. tokenizer: the model's (a
    transformers tokenizer with a pad token). data: a hub id (config = task, or a "{task}" pattern) or
    a local folder of saved DatasetDicts. calib_samples / select_samples: train rows per task for
    calibration / anchor selection (disjoint). test_samples: None for the whole evaluation split, else
    a seeded subset of that many rows per task. max_source_length / max_target_length: truncation, in
    tokens. decoder_start_token_id: the model's (None: the pad id, as for T5).
    """

    def __init__(self, tasks: Sequence[str], tokenizer, data: str | Path = DEFAULT_DATA, calib_samples: int = 64,
                 select_samples: int = 0, batch_size: int = 32, seed: int = 0, test_samples: int | None = None,
                 num_workers: int | str = "auto", max_source_length: int = 512, max_target_length: int = 16,
                 decoder_start_token_id: int | None = None, **loading):
        super().__init__(tasks, calib_samples, select_samples, test_samples, batch_size, seed, num_workers, **loading)
        for task in tasks:
            glue_task(task)  # unknown names fail here
        check_integers(max_source_length=(max_source_length, 1), max_target_length=(max_target_length, 1))
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no pad token")
        root = _local(data)
        if root is not None:  # fail on a missing folder or task now, before any loading
            unknown = [t for t in tasks if not root.is_dir() or saved_task_dir(root, t) is None]
            if unknown:
                raise ValueError(f"no saved dataset for task(s) {unknown} under {root}; available: "
                                 f"{saved_tasks(root) if root.is_dir() else 'none (no such folder)'}")
        self.tokenizer, self.data = tokenizer, data
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        start = tokenizer.pad_token_id if decoder_start_token_id is None else decoder_start_token_id
        self.collate_fn = PadBatch(tokenizer.pad_token_id, start)
        self.calib_rows: dict[str, list[int]] = {}
        self.select_rows: dict[str, list[int]] = {}
        self.test_rows: dict[str, list[int]] = {}

    def prepare_data(self) -> None:
        """Download hub datasets once (rank 0); local folders need nothing."""
        if _local(self.data) is None:
            for task in self.tasks:
                load_glue(task, self.data)

    def setup(self, stage: str | None = None) -> None:
        """Load every task, draw its rows, render and tokenize them (once; later calls are no-ops)."""
        if self._calib:
            return
        lengths = (self.max_source_length, self.max_target_length)
        for i, task in enumerate(self.tasks):
            dd = load_glue(task, self.data)
            eval_split = glue_task(task).eval_split
            for split in ("train", eval_split):
                if split not in dd:
                    raise ValueError(f"task {task!r} has no {split!r} split (splits: {list(dd)})")
            train, test = dd["train"], dd[eval_split]
            self.calib_rows[task], self.select_rows[task] = self.draw_rows(task, len(train), "train split")
            self.test_rows[task] = self.held_out_rows(task, len(test), eval_split)
            self._calib.append(GlueSamples(train, self.calib_rows[task], task, i, self.tokenizer, *lengths))
            self._select.append(GlueSamples(train, self.select_rows[task], task, i, self.tokenizer, *lengths))
            self._test.append(GlueSamples(test, self.test_rows[task], task, i, self.tokenizer, *lengths))
