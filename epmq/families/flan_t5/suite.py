"""FLAN-T5 on GLUE: FusionBench's experts on google/flan-t5-base, scored as text to text.

The model calibrated is the whole T5ForConditionalGeneration: the engine's T5Adapter calibrates the
encoder's blocks, then the decoder's (they see the calibrated encoder's output and the targets
shifted right, teacher forcing; padded prompt and target positions never enter H or C). Examples are
rendered as FusionBench renders them (epmq.families.flan_t5.glue), scored by greedy generation and exact match, STS-B
by Spearman correlation (epmq.families.flan_t5.evaluate).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from epmq.engine.adapters import ModelAdapter
from epmq.families.base import Suite
from epmq.families.flan_t5.adapter import T5Adapter
from epmq.families.flan_t5.data import DEFAULT_DATA, GlueDataModule
from epmq.families.flan_t5.evaluate import TextToTextEvaluator
from epmq.families.flan_t5.glue import GLUE_TASKS, glue_task, templates_source
from epmq.io.weights import resolve_source


class FlanT5Suite(Suite):
    """A FLAN-T5 base, one expert per GLUE task, GLUE data, text-to-text scoring.

    Args:
        base: the pretrained model: a save_pretrained folder (with its tokenizer) or a hub id.
        experts: where task t's expert is: a pattern with "{task}" (a hub id or a folder), or a
            mapping task -> source.
        data: GLUE as the `datasets` library lays it out: a hub id loaded with config = task
            ("nyu-mll/glue"), a pattern with "{task}" (one dataset per task), or a local folder of
            DatasetDicts saved with save_to_disk (<data>/<task>).
        tasks: a subset of GLUE-8 (cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb), in report order
            (None: all eight; one name: that task alone).
        tokenizer: where the tokenizer is (None: the base's; FusionBench scores every FLAN-T5 with
            google/flan-t5-base's).
        merged: a merged model to quantize instead of merging (`merge=none`): folder, file or hub id.
        max_source_length, max_target_length: truncation of prompts and targets, in tokens (512: the
            FLAN-T5 tokenizer's limit, where FusionBench truncates).
        max_new_tokens: generated tokens at most (9 = FusionBench's generate(max_length=10)).

    Nothing is read from disk or the hub here: the job's ExpertPool checks the model files first,
    then the tokenizer and the data are loaded when the data module is made.
    """

    name = "flan_t5"
    regmean_unsupported = ("RegMean's Gram pass (epmq.jobs.compare.regmean_merge) sums every token of a batch and "
                           "would count padded tokens")

    def __init__(self, base: str = "google/flan-t5-base",
                 experts: str | Mapping[str, str] = "tanganke/flan-t5-base_glue-{task}", data: str = DEFAULT_DATA,
                 tasks: Sequence[str] | None = None, tokenizer: str | None = None, merged: str | None = None,
                 max_source_length: int = 512, max_target_length: int = 16, max_new_tokens: int = 9):
        if tasks is None:
            tasks = GLUE_TASKS
        elif isinstance(tasks, str):  # one name is one task, not its letters
            tasks = [tasks]
        self.tasks = list(tasks)
        if not self.tasks:  # an empty list is a mistake, not "all eight"
            raise ValueError(f"suite.tasks is empty; name some of {list(GLUE_TASKS)} (null: all eight)")
        unknown = [t for t in self.tasks if t not in GLUE_TASKS]
        if unknown or len(set(self.tasks)) != len(self.tasks):
            what = f"unknown task(s) {unknown}" if unknown else f"duplicates in {self.tasks}"
            raise ValueError(f"suite.tasks: {what}; FLAN-T5 GLUE tasks are {list(GLUE_TASKS)}")
        if isinstance(experts, str):
            if "{task}" not in experts:
                raise ValueError(f"suite.experts must contain '{{task}}' (e.g. tanganke/flan-t5-base_glue-{{task}}), "
                                 f"got {experts!r}")
            self.experts = {t: experts.format(task=t) for t in self.tasks}
        else:
            missing = [t for t in self.tasks if t not in experts]
            if missing:
                raise ValueError(f"suite.experts has no source for task(s) {missing}")
            self.experts = {t: str(experts[t]) for t in self.tasks}
        for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length),
                            ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"suite.{name} must be a positive integer, got {value!r}")
        self.base, self.data, self.merged = str(base), str(data), merged
        self.tokenizer_source = str(tokenizer) if tokenizer else self.base
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.max_new_tokens = max_new_tokens
        self.metrics = {t: glue_task(t).metric for t in self.tasks}
        self._tokenizer = None
        self._config = None

    @property
    def metric(self) -> str:
        """'exact_match', naming STS-B's Spearman correlation when the suite has it."""
        others = sorted({f"{t}: {m}" for t, m in self.metrics.items() if m != "exact_match"})
        return "exact_match" + (f" ({', '.join(others)})" if others else "")

    @property
    def tokenizer(self):
        """The tokenizer (loaded once): suite.tokenizer's, or the base's."""
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(self.tokenizer_source)))
            except Exception as e:  # missing files, offline hub: the option at fault is named
                option = "suite.tokenizer" if self.tokenizer_source != self.base else "suite.base"
                raise ValueError(f"{option}: cannot load a tokenizer from {self.tokenizer_source!r} (a save_pretrained "
                                 f"folder with the tokenizer's files, or a hub id, is needed; suite.tokenizer can name "
                                 f"another): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        return self._tokenizer

    @property
    def config(self) -> T5Config:
        """The base's T5Config (read once, from the folder ExpertPool already resolved)."""
        if self._config is None:
            try:
                config = T5Config.from_pretrained(str(resolve_source(self.base, "suite.base")))
            except OSError as e:  # a weights file without its config.json
                raise ValueError(f"suite.base: {self.base} has no T5 config.json (a save_pretrained folder or "
                                 f"hub id is needed): {str(e).splitlines()[0] if str(e) else ''}") from None
            if config.model_type != "t5":
                raise ValueError(f"suite.base: {self.base} is a {config.model_type!r} model, not a T5")
            self._config = config
        return self._config

    def model(self, state_dict: dict[str, torch.Tensor] | None = None) -> T5ForConditionalGeneration:
        """A T5ForConditionalGeneration in eval mode holding `state_dict` (None: the base's weights).

        Checkpoints leave out tied copies (the encoder's and decoder's embed_tokens are the shared
        embedding). FLAN-T5 has an lm_head of its own, which transformers 5 ties to the shared
        embedding whatever the config says: when the state holds an lm_head that differs from the
        shared embedding, it is untied, as from_pretrained does.
        """
        if state_dict is None:
            return T5ForConditionalGeneration.from_pretrained(str(resolve_source(self.base, "suite.base"))).eval()
        model = T5ForConditionalGeneration(self.config)
        head, shared = state_dict.get("lm_head.weight"), state_dict.get("shared.weight")
        if head is not None and shared is not None and model.lm_head.weight is model.shared.weight \
                and not torch.equal(head, shared):
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.shared.weight))
            tied = getattr(model, "all_tied_weights_keys", None)
            if isinstance(tied, dict):  # so that save_pretrained keeps lm_head
                tied.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not _loaded_through_a_tie(model, k, state_dict)]
        if missing or unexpected:
            raise ValueError(f"the weights do not fit {type(model).__name__} of {self.base}: "
                             f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
        return model.eval()

    def adapter(self, model: nn.Module) -> ModelAdapter:
        return T5Adapter()

    def evaluator(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], prefix: str) -> TextToTextEvaluator:
        """Exact match (STS-B: Spearman) of each task's model on its task (epmq.families.flan_t5.evaluate)."""
        return TextToTextEvaluator({t: models[t] for t in self.tasks}, self.tokenizer, self.metrics, prefix,
                                   self.max_new_tokens)

    def datamodule(self, **data) -> GlueDataModule:
        """Calibration / selection rows from each task's train split, evaluation from its validation split."""
        return GlueDataModule(self.tasks, self.tokenizer, self.data, max_source_length=self.max_source_length,
                              max_target_length=self.max_target_length,
                              decoder_start_token_id=self.config.decoder_start_token_id, **data)

    def describe(self) -> dict:
        """What the report records about the suite: sources, tasks, each task's metric, the templates."""
        return {"name": self.name, "base": self.base, "experts": self.experts, "data": self.data,
                "tokenizer": self.tokenizer_source, "tasks": self.tasks, "metrics": self.metrics,
                "eval_splits": {t: glue_task(t).eval_split for t in self.tasks},
                "templates": templates_source(), "max_new_tokens": self.max_new_tokens}


def _loaded_through_a_tie(model: nn.Module, key: str, state_dict: Mapping) -> bool:
    """Whether `key`, absent from state_dict, is a tied copy of a key that is present (checkpoints
    store one tensor per tie group: encoder/decoder embed_tokens are the shared embedding)."""
    tensors = model.state_dict(keep_vars=True)
    return any(other in state_dict for other, t in tensors.items() if other != key and t is tensors[key])
