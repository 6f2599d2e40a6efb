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
calibration batch holds one task's windows. Text comes from a .txt or .jsonl file, a list of strings, a hub
dataset id or a `save_to_disk` folder, one source per task (epmq.families.causal_lm.sources). A task needs
calib_samples + select_samples full windows of train text (ValueError saying how many its text gives). Files
and lists hold no held-out text: then no task has test windows (`held_out` is False) and nothing is scored on
perplexity; a run's tasks have held-out text all or none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from epmq.families.causal_lm.sources import load_text
from epmq.families.tasks import PerTaskDataModule, check_integers, task_generator


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

    tasks: task names (the task index order). sources: task -> text source (a .txt / .jsonl file, a list of
    strings, a hub id or a save_to_disk folder: epmq.families.causal_lm.sources). text_columns: task -> column
    (or JSONL field) holding the text. tokenizer: the base's tokenizer. seq_len: tokens
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
        held_out = {}
        for t, task in enumerate(self.tasks):
            text = load_text(self.sources[task], self.text_columns[task], self.tokenizer, self.splits)
            need = self.calib_samples + self.select_samples
            order = torch.randperm(len(text.train), generator=task_generator(self.seed, task, "train"))
            windows = token_windows(text.train, self.tokenizer, self.seq_len, need, order)
            if len(windows) < need:
                asked = (f"data.calib_samples + data.select_samples = {need}" if self.select_samples
                         else f"data.calib_samples = {need}")
                raise ValueError(f"task {task!r}: {text.what} gives {len(windows)} windows of suite.seq_len = "
                                 f"{self.seq_len} tokens, fewer than {asked}")
            windows = windows[torch.randperm(len(windows), generator=task_generator(self.seed, task, "windows"))]
            self._calib.append(_Windows(windows[: self.calib_samples], t))
            self._select.append(_Windows(windows[self.calib_samples: need], t))
            held_out[task] = text.test
        lacking = [task for task, texts in held_out.items() if texts is None]
        if lacking and len(lacking) < len(self.tasks):
            raise ValueError(f"suite.datasets: task(s) {lacking} have no held-out text and the others have: give "
                             f"every task a held-out split ({self.splits[1]!r}), or none")
        if not lacking:
            self._test = [self._held_out(task, t, texts) for t, (task, texts) in enumerate(held_out.items())]

    def _held_out(self, task: str, t: int, texts: list[str]) -> _Windows:
        """Task t's perplexity windows, cut by the protocol (module docstring)."""
        limit = self.test_samples if self.test_samples is not None else (1 << 40) // self.seq_len  # all of it
        if self.perplexity == "gptq":
            windows = joined_windows(texts, self.tokenizer, self.seq_len, limit)
        else:
            windows = token_windows(texts, self.tokenizer, self.seq_len, limit, torch.arange(len(texts)))
        if len(windows) == 0:
            raise ValueError(f"task {task!r}: its {self.splits[1]!r} split holds fewer than seq_len = {self.seq_len} "
                             f"tokens")
        return _Windows(windows, t)
