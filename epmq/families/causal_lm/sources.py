"""Where a causal LM's text comes from: the forms a `suite.datasets` entry takes (per task, or one for all).

    a .txt file          one sample per line (blank lines skipped)
    a .jsonl file        one JSON object per line (blank lines skipped): its text field (suite.text_columns,
                         default "text"), or chat `messages` (a list of {role, content}) rendered as text by the
                         tokenizer's chat template (apply_chat_template, tokenize=False)
    a list of strings    the samples themselves, given in the config
    a dataset            a hub id ("owner/name", "owner/name:config") or a save_to_disk folder, with splits: the
                         first of suite.splits is the calibration text, the second the held-out text; rows are
                         read from the text column, or rendered from a `messages` column as above

Files and lists are calibration text only: they hold no held-out text, so nothing is scored on perplexity. A
dataset holding the calibration split alone has none either; one with other splits must have the held-out split
suite.splits names (a misspelt split is refused, not taken for "none").
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict, load_from_disk

from epmq.io.hub import load_dataset, local_path, written_as_path

FILE_SUFFIXES = (".txt", ".jsonl")
FILE_LOOKALIKES = (".json", ".csv", ".tsv", ".parquet")  # a missing file of these is not taken for a hub id
MESSAGES = "messages"  # the chat field of a JSONL line or a dataset row: [{"role": ..., "content": ...}, ...]


@dataclass
class TextSource:
    """One task's text: the calibration samples (`train`) and the held-out samples (`test`; None: there are
    none). `what` names where the calibration samples came from, for messages."""

    train: list[str]
    test: list[str] | None
    what: str


def is_sample_list(source) -> bool:
    """Whether a suite.datasets entry is a list of samples given in the config (not a path or an id)."""
    return isinstance(source, Sequence) and not isinstance(source, (str, bytes))


def load_text(source, column: str, tokenizer, splits: Sequence[str]) -> TextSource:
    """The text of one suite.datasets entry (module docstring): a .txt or .jsonl file, a list of strings, or a
    dataset; ValueError naming the file and line, the column or the split when it cannot be read."""
    if is_sample_list(source):
        samples = list(source)
        bad = next((k for k, s in enumerate(samples) if not isinstance(s, str)), None)
        if not samples or bad is not None:
            raise ValueError("suite.datasets: a list of samples must hold strings"
                             + (f"; item {bad} is a {type(samples[bad]).__name__}" if bad is not None else
                                ", and this one is empty"))
        return TextSource(samples, None, f"the list of samples in suite.datasets ({len(samples)})")
    path = local_path(source)
    if path is not None and path.is_file():
        return _file_text(path, column, tokenizer)
    return _dataset_text(str(source), column, tokenizer, splits)


def _file_text(path: Path, column: str, tokenizer) -> TextSource:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"suite.datasets file {path}: unsupported file type {suffix or '(none)'!r}; give a .txt "
                         f"file (one sample per line), a .jsonl file (a {column!r} or {MESSAGES!r} field per line), "
                         f"a list of strings, or a dataset (hub id or save_to_disk folder)")
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]  # line numbers from 1
    if suffix == ".txt":
        samples = [line for _, line in numbered]
    else:
        samples = [_record_text(_json_object(path, n, line), column, tokenizer, f"{path}: line {n}")
                   for n, line in numbered]
    if not samples:
        raise ValueError(f"suite.datasets file {path} holds no samples (every line is blank)")
    return TextSource(samples, None, f"{path} ({len(samples)} samples)")


def _json_object(path: Path, n: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: line {n} must be a JSON object, got a {type(record).__name__}")
    return record


def _record_text(record: Mapping, column: str, tokenizer, where: str) -> str:
    """One sample's text: record[column] (a string), else its chat `messages` through the chat template."""
    if column in record:
        if not isinstance(record[column], str):
            raise ValueError(f"{where}: field {column!r} must be a string, got a {type(record[column]).__name__}")
        return record[column]
    if MESSAGES in record:
        return chat_text(record[MESSAGES], tokenizer, where)
    raise ValueError(f"{where}: no field {column!r} (suite.text_columns) and no chat {MESSAGES!r}; "
                     f"fields: {sorted(record)}")


def chat_text(messages, tokenizer, where: str) -> str:
    """A conversation ([{role, content}, ...]) as the text the model reads: the tokenizer's chat template applied
    without tokenizing (its own special tokens included as text)."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise ValueError(f"{where}: {MESSAGES!r} must be a non-empty list of {{role, content}} strings")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat {MESSAGES!r} need a chat template, and the tokenizer has none "
                         f"(suite.tokenizer: one that has)")
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)


def _dataset_text(source: str, column: str, tokenizer, splits: Sequence[str]) -> TextSource:
    train, test = splits
    data = load_text_dataset(source, list(splits), required=[train])
    if test not in data and set(data) != {train}:
        raise ValueError(f"dataset {source!r} has no held-out split {test!r} (splits: {list(data)}); name it with "
                         f"suite.splits=[{train}, <split>]")
    texts = {split: _split_text(data[split], source, split, column, tokenizer) for split in (train, test)
             if split in data}
    return TextSource(texts[train], texts.get(test), f"the {train!r} split of {source!r}")


def _split_text(rows, source: str, split: str, column: str, tokenizer) -> list[str]:
    if column in rows.column_names:
        return list(rows[column])
    if MESSAGES in rows.column_names:
        return [chat_text(m, tokenizer, f"dataset {source!r}, split {split!r}, row {k}")
                for k, m in enumerate(rows[MESSAGES])]
    raise ValueError(f"dataset {source!r}: split {split!r} has no text column {column!r} and no chat {MESSAGES!r} "
                     f"(columns: {rows.column_names})")


def load_text_dataset(source: str, splits: Sequence[str], required: Sequence[str]) -> DatasetDict:
    """A DatasetDict from a save_to_disk folder, or a hub id with an optional config after a colon
    ("Salesforce/wikitext:wikitext-2-raw-v1"; only the files of `splits` are fetched when it has them all);
    ValueError naming the source otherwise, or when a `required` split is missing."""
    path = local_path(source)
    if path is not None and path.is_dir():
        try:
            data = load_from_disk(str(path))
        except Exception as e:  # not a saved dataset
            raise ValueError(f"{path}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from None
    elif written_as_path(source) or Path(source).suffix.lower() in FILE_SUFFIXES + FILE_LOOKALIKES:
        raise ValueError(f"suite.datasets: {source!r} does not exist (not a file, a dataset folder or a hub id)")
    else:  # a hub id: refused within seconds, naming it, when the hub does not answer
        name, _, config = str(source).partition(":")
        data = load_dataset(name, config or None, what="suite.datasets", splits=list(splits))
    if not isinstance(data, DatasetDict):
        raise ValueError(f"dataset {source!r} must have splits (a DatasetDict), got {type(data).__name__}")
    missing = [s for s in required if s not in data]
    if missing:
        raise ValueError(f"dataset {source!r} has no split(s) {missing} (splits: {list(data)})")
    return data
