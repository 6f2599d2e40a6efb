"""Per-task perplexity of causal language models with torchmetrics, for `trainer.test`.

For a window of tokens x_1..x_L the model predicts each x_{i+1} from x_1..x_i; the task's
perplexity is exp(mean over every predicted token of every test window of −log p(x_{i+1} | x_≤i)),
computed by torchmetrics' Perplexity. Lower is better.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.text import Perplexity

from epmq.families.tasks import PerTaskEvaluator


class PerplexityEvaluator(PerTaskEvaluator):
    """Perplexity of each task's language model on its own test windows.

    models: task -> causal LM (returning .logits (B, L, vocab)), or a function building one (see
    epmq.families.tasks.PerTaskEvaluator). Test loaders come one per task, in `models` order, with batches
    {"input_ids", "attention_mask"}. Logged: `<prefix>/<task>/perplexity`, `<prefix>/avg_perplexity`
    (the mean over tasks) and `<prefix>/avg_nll`; kept in `results` (task -> perplexity, and "avg")
    and `nll` (task -> mean token NLL in nats = log perplexity, and "avg").
    """

    def __init__(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], prefix: str = "test"):
        super().__init__(models, prefix)
        self.perplexity = nn.ModuleDict({t: Perplexity(ignore_index=-100) for t in self.tasks})

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.tasks[dataloader_idx]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.model(task)(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, L, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # x_{i+1}, padding ignored
        self.perplexity[task].update(logits[:, :-1].float(), target)

    def losses(self, task: str, batch: Mapping) -> torch.Tensor:
        """NLL of every next token (padding not scored), (tokens,) nats: their mean is log perplexity."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.model(task)(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, L, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        real = target != -100
        return F.cross_entropy(logits[:, :-1][real].float(), target[real], reduction="none")

    def on_test_epoch_end(self) -> None:
        ppl = {t: self.perplexity[t].compute() for t in self.tasks}
        self.publish(ppl, {t: torch.log(v) for t, v in ppl.items()}, "perplexity", "perplexity")
