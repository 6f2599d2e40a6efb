"""Text as fixed-length token windows, per task: calibration, selection and held-out evaluation data.

Language-model calibration (as in the GPTQ reference) uses windows of `seq_len` tokens cut from
running text, so that no window needs padding. Per task, the texts of a split are tokenised in a
seeded order and joined (with the tokenizer's EOS between texts) into one token stream until enough
tokens are there; the stream is cut into consecutive, non-overlapping windows:

    train split  windows shuffled with a seeded generator: the first `calib_samples` calibrate,
                 the next `select_samples` (disjoint) choose the anchor strength
    test split   the first `test_samples` windows, in order (all of the split when None), for
                 perplexity: every token of a window but its first is predicted from those before it

The test windows follow one of two protocols (`perplexity`):

    gptq     the GPTQ reference's, which published WikiText-2 perplexities use: the split's texts joined
             with "\n\n" in their order, tokenised once (with the tokenizer's special tokens, so a BOS
             token opens the stream), cut into non-overlapping windows, the tail dropped (the default)
    packed   as the calibration windows: each text tokenised alone, EOS after every text

Batches: {"input_ids": (B, seq_len) int64, "attention_mask": (B, seq_len) ones, "task": (B,)}; every
calibration batch holds one task's windows. Datasets come from a hub id (`datasets.load_dataset`) or
a folder written by `DatasetDict.save_to_disk`, one source per task, with a text column per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from datasets import DatasetDict, load_from_disk
from torch.utils.data import Dataset

from epmq.families.tasks import PerTaskDataModule, check_integers, task_generator
from epmq.io.hub import load_dataset, local_path, written_as_path


def load_text_dataset(source: str, split_names: Sequence[str]) -> DatasetDict:
    """A DatasetDict from a save_to_disk folder, or a hub id with an optional config after a colon
    ("Salesforce/wikitext:wikitext-2-raw-v1"); ValueError naming the source otherwise."""
    path = local_path(source)
    if path is not None and path.is_dir():
        try:
            data = load_from_disk(str(path))
        except Exception as e:  # not a saved dataset
            raise ValueError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    elif path is not None:
        raise ValueError(f"dataset {source!r} is a file, not a folder saved with save_to_disk")
    elif written_as_path(source):
        raise ValueError(f"dataset folder {source!r} does not exist")
    else:  # a hub id: refused within seconds, naming it, when the hub does not answer
        name, _, config = str(source).partition(":")
        data = load_dataset(name, config or None, what="suite.datasets", splits=list(split_names))
    if not isinstance(data, DatasetDict):
        raise ValueError(f"dataset {source!r} must have splits (a DatasetDict), got {type(data).__name__}")
    missing = [s for s in split_names if s not in data]
    if missing:
        raise ValueError(f"dataset {source!r} has no split(s) {missing} (splits: {list(data)})")
    return data


def token_windows(texts: Sequence[str], tokenizer, seq_len: int, windows: int, order: torch.Tensor) -> torch.Tensor:
    """(n, seq_len) int64: consecutive windows of the texts taken in `order`, joined by EOS; stops
    once `windows` windows are full (n <= windows when the texts run out)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = windows * seq_len
    for i in order.tolist():
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        stream += ids + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    n = min(windows, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def joined_windows(texts: Sequence[str], tokenizer, seq_len: int, windows: int) -> torch.Tensor:
    """(n, seq_len) int64: the GPTQ reference's evaluation windows: "\n\n".join(texts) tokenised once, the
    first min(windows, tokens // seq_len) non-overlapping windows (the tail is dropped)."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = min(windows, len(ids) // seq_len)
    return ids[: n * seq_len].view(n, seq_len).long()


PERPLEXITY = ("gptq", "packed")


class _Windows(Dataset):
    def __init__(self, ids: torch.Tensor, task_id: int):
        self.ids, self.task_id = ids, task_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "task": torch.tensor(self.task_id)}


class TextWindowDataModule(PerTaskDataModule):
    """Token windows per task for causal-LM calibration, anchor selection and perplexity.

    tasks: task names (the task index order). sources: task -> dataset source (hub id or folder).
    text_columns: task -> column holding the text. tokenizer: the base's tokenizer. seq_len: tokens
    per window. calib_samples / select_samples: windows per task from the train split (disjoint).
    test_samples: windows per task from the test split (None: the whole split). splits: names of the
    train and test splits. perplexity: how the test windows are cut, "gptq" or "packed" (module docstring).
    """

    def __init__(self, tasks: Sequence[str], sources: Mapping[str, str], text_columns: Mapping[str, str], tokenizer,
                 seq_len: int = 512, calib_samples: int = 64, select_samples: int = 16, test_samples: int | None = 64,
                 batch_size: int = 8, seed: int = 0, num_workers: int | str = "auto",
                 splits: tuple[str, str] = ("train", "test"), perplexity: str = "gptq", **loading):
        super().__init__(tasks, calib_samples, select_samples, test_samples, batch_size, seed, num_workers, **loading)
        check_integers(seq_len=(seq_len, 2))
        if perplexity not in PERPLEXITY:
            raise ValueError(f"perplexity must be one of {PERPLEXITY}, got {perplexity!r}")
        self.perplexity = perplexity
        self.sources, self.text_columns, self.tokenizer = sources, text_columns, tokenizer
        self.seq_len, self.splits = seq_len, tuple(splits)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and cut every task's windows (once)."""
        if self._calib:
            return
        train, test = self.splits
        for t, task in enumerate(self.tasks):
            data = load_text_dataset(self.sources[task], self.splits)
            column = self.text_columns[task]
            for split in self.splits:
                if column not in data[split].column_names:
                    raise ValueError(f"task {task!r}: split {split!r} has no text column {column!r} "
                                     f"(columns: {data[split].column_names})")
            texts = data[train][column]
            need = self.calib_samples + self.select_samples
            order = torch.randperm(len(texts), generator=task_generator(self.seed, task, "train"))
            windows = token_windows(texts, self.tokenizer, self.seq_len, need, order)
            if len(windows) < need:
                raise ValueError(f"task {task!r}: its {train!r} split gives {len(windows)} windows of {self.seq_len} "
                                 f"tokens, fewer than calib_samples + select_samples = {need}")
            windows = windows[torch.randperm(len(windows), generator=task_generator(self.seed, task, "windows"))]
            self._calib.append(_Windows(windows[: self.calib_samples], t))
            self._select.append(_Windows(windows[self.calib_samples: need], t))
            test_texts = data[test][column]
            limit = self.test_samples if self.test_samples is not None else (1 << 40) // self.seq_len  # all of it
            if self.perplexity == "gptq":
                held_out = joined_windows(test_texts, self.tokenizer, self.seq_len, limit)
            else:
                held_out = token_windows(test_texts, self.tokenizer, self.seq_len, limit, torch.arange(len(test_texts)))
            if len(held_out) == 0:
                raise ValueError(f"task {task!r}: its {test!r} split holds fewer than seq_len = {self.seq_len} tokens")
            self._test.append(_Windows(held_out, t))
