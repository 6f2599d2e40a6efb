"""GLUE as text to text: each example becomes a prompt, each label a target word.

The prompts, label words and evaluation splits are data (epmq/families/flan_t5/glue_templates.json), taken from
FusionBench's FLAN-T5 GLUE task pool, whose experts (tanganke/flan-t5-base_glue-<task>) were
fine-tuned on exactly these strings; rendering them the same way is what makes our scores comparable
with FusionBench's and the E-PMQ paper's. A prompt is the template's `str.format` over the example's
text columns; a target is the label's word (classification) or the label printed with one decimal
(STS-B, e.g. "3.8").

Metrics: "exact_match" (decoded generation equals the decoded target word) for the classification
tasks, "spearman" (rank correlation of the parsed numbers) for STS-B.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

TEMPLATES = Path(__file__).with_name("glue_templates.json")
GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")  # GLUE-8, report order
METRICS = ("exact_match", "spearman")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as text to text.

    prompt: str.format template over `columns`; targets: label id -> word (classification) or None;
    target_format: how a regression label is printed (STS-B: "{:.1f}"); eval_split: the split scored
    ("validation", or "validation_matched" for MNLI); metric: "exact_match" or "spearman".
    """

    name: str
    prompt: str
    columns: tuple[str, ...]
    targets: Mapping[int, str] | None
    target_format: str | None
    eval_split: str
    metric: str

    def render(self, example: Mapping) -> tuple[str, str]:
        """(prompt, target) of one example (a row with the task's columns and "label")."""
        missing = [c for c in (*self.columns, "label") if c not in example]
        if missing:
            raise ValueError(f"GLUE task {self.name!r}: example lacks column(s) {missing} (has {sorted(example)})")
        prompt = self.prompt.format(**{c: example[c] for c in self.columns})
        return prompt, self.target(example["label"])

    def target(self, label) -> str:
        """The target text of a label: its word, or the number as target_format prints it."""
        if self.targets is None:
            return self.target_format.format(float(label))
        word = self.targets.get(int(label))
        if word is None:  # GLUE's test splits carry -1: unlabelled rows cannot be scored or calibrated on
            raise ValueError(f"GLUE task {self.name!r}: label {label!r} has no target word "
                             f"(known labels {sorted(self.targets)})")
        return word


@lru_cache(maxsize=1)
def _templates() -> dict:
    return json.loads(TEMPLATES.read_text())


def glue_task(name: str) -> GlueTask:
    """The text-to-text description of GLUE task `name` (one of GLUE_TASKS); ValueError otherwise."""
    tasks = _templates()["tasks"]
    if name not in tasks:
        raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(tasks)}")
    t = tasks[name]
    targets = {int(k): v for k, v in t["targets"].items()} if "targets" in t else None
    if t["metric"] not in METRICS:
        raise ValueError(f"{TEMPLATES}: task {name!r} has metric {t['metric']!r}, expected one of {METRICS}")
    return GlueTask(name, t["prompt"], tuple(t["columns"]), targets, t.get("target_format"), t["eval_split"],
                    t["metric"])


def templates_source() -> dict:
    """Where the templates come from (repository, files, commits), for reports."""
    return dict(_templates()["source"])
