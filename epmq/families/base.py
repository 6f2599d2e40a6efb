"""What the jobs ask of a model family: its Suite (the base class below, optional members with defaults) and the
engine's adapter for a model (by class name, for callers that hold only a model).

A family is one folder, epmq/families/<family>/: adapter.py (the ModelAdapter the engine walks), suite.py (a
Suite subclass), data.py and evaluate.py (its DataModule and evaluator), and a conf/suite/<name>.yaml whose
`_target_` names the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from hydra.utils import get_class
from torch import nn

from epmq.engine.adapters import ModelAdapter
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.causal_lm.architectures import model_classes
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.flan_t5.adapter import T5Adapter


class Suite:
    """Which base, which experts, which tasks and data, and how a model is evaluated on each task.

    A suite is what a run's `suite:` config group instantiates (`_target_`). Every suite gives:

        tasks                   the task names, in report order
        base, experts           model sources for epmq.io.pool.ExpertPool (folders, files, hub ids or a state dict)
        model(state_dict)       a model of the family holding the given weights (what is calibrated)
        datamodule(**data)      the per-task data (calibration, selection, test loaders)
        evaluator(models, p)    a LightningModule for trainer.test (epmq.families.tasks.PerTaskEvaluator)
        describe()              what report.json records about the suite

    and may change the defaults below: the metric, its direction and scale, the engine's adapter, a merged model
    brought by the user, more scores of the quantized model, and RegMean's inputs.
    """

    name = ""
    tasks: list[str]
    metric = "acc"              # the per-task metric's name ("acc": accuracy in [0, 1])
    higher_is_better = True     # False for perplexity: a choice by the metric then takes the lowest
    metric_scale = 100          # how tables print the metric (100: percent; 1: as it is)
    merged: str | None = None   # a merged model to quantize instead of merging (merge=none)
    symmetric = False           # quant.sym's default: asymmetric min-max grids, unless the family deploys symmetric ones
    tokenizer = None            # a text family's tokenizer (saved beside a quantized model: save_companions)
    #: why compare's RegMean → GPTQ is not offered for this suite (None: it is; see regmean_inputs)
    regmean_unsupported: str | None = "its batches have no RegMean inputs (Suite.regmean_inputs)"

    def model(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        raise NotImplementedError

    def datamodule(self, **data):
        raise NotImplementedError

    def evaluator(self, models: Mapping[str, nn.Module | Callable[[], nn.Module]], prefix: str):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "tasks": self.tasks}

    def adapter(self, model: nn.Module) -> ModelAdapter:
        """The engine's adapter for this family's model."""
        return adapter_for(model)

    def extra_evaluation(self, model: nn.Module) -> dict:
        """More scores of the quantized model for report.json's "extra_metrics" (e.g. lm-eval tasks); none here."""
        return {}

    def save_companions(self, folder: Path) -> None:
        """Write into a saved quantized model's folder what its clients load beside the weights: the suite's
        tokenizer files (with its chat template, when it has one), so that GPTQ clients load the folder."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))

    def regmean_inputs(self, batch: Mapping) -> dict:
        """The model's forward arguments of a calibration batch, for RegMean's Gram pass over each expert."""
        raise ValueError(f"suite {self.name}: {self.regmean_unsupported}")


def suite_class(node) -> type[Suite]:
    """The Suite class a `suite:` config node names (`_target_`), without making the suite (no downloads)."""
    try:
        cls = get_class(node._target_)
    except Exception as e:
        raise ValueError(f"suite._target_: cannot import {node._target_!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Suite)):
        raise ValueError(f"suite._target_={node._target_} is not an epmq.families.base.Suite")
    return cls


ADAPTERS = {"CLIPVisionModel": CLIPVisionAdapter, "CLIPVisionModelWithProjection": CLIPVisionAdapter,
            "CLIPModel": CLIPVisionAdapter,
            **{name: LlamaAdapter for name in model_classes()},  # the declared decoder types (Model, ForCausalLM)
            **{name: T5Adapter for name in ("T5ForConditionalGeneration", "T5Model", "T5EncoderModel")}}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`'s class, by class name; ValueError listing the known ones."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no adapter for model class {name}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]()
