"""Text-to-text evaluation of encoder-decoder models, per task, for `trainer.test`.

Scoring follows FusionBench's FLAN-T5 GLUE task pool, so that numbers compare with its experts':

- each prompt is answered by greedy generation (`model.generate`, no sampling, one beam, at most
  `max_new_tokens` tokens: 9 = FusionBench's max_length=10, which counts the decoder start token);
- the answer and the target are decoded without special tokens (the target from its token ids, -100
  and special ids dropped), so both went through the same tokenizer round trip;
- "exact_match": the two strings are equal (no stripping, no case folding); the task's score is the
  fraction of equal pairs, in [0, 1];
- "spearman" (STS-B): both strings are parsed as numbers, an unparseable answer counting as 0.0
  (FusionBench's fallback; a "nan" or "inf" answer too, where FusionBench would keep the value and a
  nan would make its correlation undefined); the score is Spearman's rank correlation
  (torchmetrics.SpearmanCorrCoef, average ranks for ties) over the task's rows, in [-1, 1], reported
  as it is (a negative value stays negative). When it is undefined (all answers equal, e.g. all
  unparseable) torchmetrics returns 0, which is what is reported.

The average ("avg") is the plain mean of the per-task scores, as FusionBench and the paper average
their GLUE columns. Besides the scores, `.nll` holds each task's mean token negative log-likelihood (in
nats) of the target under teacher forcing (every target token, </s> included, counts once): smooth
where exact match is a step, it is what the anchor selection minimises.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.regression import SpearmanCorrCoef

from epmq.families.flan_t5.data import IGNORE
from epmq.families.tasks import PerTaskEvaluator

METRICS = ("exact_match", "spearman")


def parse_number(text: str) -> float:
    """The number an answer states, or 0.0 when it states none or a non-finite one (FusionBench's fallback)."""
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def decode_targets(tokenizer, labels: torch.Tensor) -> list[str]:
    """Target strings from (B, L) label ids: -100 and special ids dropped, then decoded."""
    special = set(tokenizer.all_special_ids)
    rows = [[int(i) for i in row if i != IGNORE and int(i) not in special] for row in labels.tolist()]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


class TextToTextEvaluator(PerTaskEvaluator):
    """Per-task scores of encoder-decoder models on text-to-text batches.

    models: task -> model (a T5ForConditionalGeneration; the same object may serve several tasks) or a
    function building one (see epmq.families.tasks.PerTaskEvaluator). metrics: task -> "exact_match" |
    "spearman". The test dataloaders come one per task, in `models` order, with batches as
    epmq.families.flan_t5.data makes them (input_ids, attention_mask, labels). Logged: `<prefix>/<task>/<metric>`,
    `<prefix>/avg_score` and `<prefix>/avg_nll`; kept in `results` (task -> score, and "avg") and
    `nll` (task -> mean token NLL in nats, and "avg").
    """

    def __init__(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], tokenizer,
                 metrics: Mapping[str, str], prefix: str = "test", max_new_tokens: int = 9):
        super().__init__(models, prefix)
        tasks = self.tasks
        bad = {t: metrics.get(t) for t in tasks if metrics.get(t) not in METRICS}
        if bad:
            raise ValueError(f"metrics must map every task to one of {METRICS}; got {bad}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.metric_of = {t: metrics[t] for t in tasks}
        self.exact = nn.ModuleDict({t: MeanMetric() for t in tasks if self.metric_of[t] == "exact_match"})
        with warnings.catch_warnings():  # keeping every answer is the point (one number per row)
            warnings.filterwarnings("ignore", message=r".*will save all targets and predictions")
            self.spearman = nn.ModuleDict({t: SpearmanCorrCoef() for t in tasks if self.metric_of[t] == "spearman"})
        self.token_nll = nn.ModuleDict({t: MeanMetric() for t in tasks})

    @torch.no_grad()
    def answers(self, model: nn.Module, batch: Mapping) -> list[str]:
        """Greedy answers to the batch's prompts, decoded without special tokens."""
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def losses(self, task: str, batch: Mapping) -> torch.Tensor:
        """Teacher-forced NLL of every target token, (tokens,) nats (T5 shifts the labels right itself;
        -100 positions are not scored)."""
        labels = batch["labels"]
        logits = self.model(task)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=labels).logits
        real = labels != IGNORE                                           # (B, L)
        return F.cross_entropy(logits[real].float(), labels[real], reduction="none")

    @torch.no_grad()
    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        model = self.model(task)
        labels = batch["labels"]
        self.token_nll[task].update(self.losses(task, batch))
        answers, targets = self.answers(model, batch), decode_targets(self.tokenizer, labels)
        if self.metric_of[task] == "exact_match":
            self.exact[task].update(torch.tensor([float(a == t) for a, t in zip(answers, targets)], device=self.device))
        else:
            as_tensor = lambda xs: torch.tensor([parse_number(x) for x in xs], device=self.device)  # noqa: E731
            self.spearman[task].update(as_tensor(answers), as_tensor(targets))

    def on_test_epoch_end(self) -> None:
        scores = {t: (self.exact[t] if t in self.exact else self.spearman[t]).compute() for t in self.tasks}
        self.publish(scores, {t: self.token_nll[t].compute() for t in self.tasks}, self.metric_of, "score")
