"""Decoder-only causal language models of the Llama module names (the model types declared in
epmq.families.causal_lm.architectures: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3):
experts of one base, perplexity.

    python train.py suite=causal_lm suite.base=<hub id or folder> \
        suite.experts='{math: <id or folder>, code: <id or folder>}' \
        suite.datasets='{math: <id or folder>, code: <id or folder>}' suite.text_columns='{math: text, code: text}'

or one model to quantize, without base and experts (its folder gives the config and the tokenizer):

    python train.py suite=causal_lm merge=none suite.merged=<id or folder> quant=gptq suite.datasets=<text>

Experts are a mapping task -> source, or a pattern with `{task}` plus `suite.tasks`; sharded
safetensors folders (model.safetensors.index.json) load one tensor at a time. Each task has its
own text, or one shared source for every task: a .txt file (a sample per line), a .jsonl file (a text field
or chat `messages`), a list of strings, or a dataset (a hub id or a `save_to_disk` folder with a train and a
held-out split; epmq.families.causal_lm.sources). The engine calibrates the decoder layers true-sequentially
in the groups the model type declares (epmq.families.causal_lm.architectures: q/k/v, o, gate/up, down; Phi-3:
qkv, o, gate_up, down) unless `calibration.true_sequential=false`. Evaluation is each task's perplexity on its
own held-out text (epmq.families.causal_lm.evaluate; lower is better), when it has some.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from epmq.engine.adapters import ModelAdapter
from epmq.families.base import Suite
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.causal_lm.architectures import architecture
from epmq.families.causal_lm.data import PERPLEXITY, TextWindowDataModule
from epmq.families.causal_lm.evaluate import PerplexityEvaluator
from epmq.families.causal_lm.sources import is_sample_list
from epmq.io.weights import resolve_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


ONE_TASK = "calibration"  # the task of one model quantized without experts, when nothing names it


def _per_task(value, tasks: Sequence[str], what: str) -> dict:
    """task -> value from a mapping, a `{task}` pattern or one value shared by every task; a list (of samples)
    is a value, kept as a list of strings."""
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        if missing:
            raise ValueError(f"suite.{what}: no entry for task(s) {missing}; it has {sorted(value)}")
        return {t: _value(value[t]) for t in tasks}
    if value is None:
        raise ValueError(f"suite.{what} is not set")
    if is_sample_list(value):
        return {t: _value(value) for t in tasks}
    return {t: str(value).format(task=t) for t in tasks}


def _value(value):
    return [str(v) if isinstance(v, str) else v for v in value] if is_sample_list(value) else str(value)


def _task_names(tasks, experts, datasets) -> list[str]:
    """The tasks: as given, else the keys of experts (or, without experts, of datasets), else one task."""
    if tasks is not None:
        return list(tasks)
    if experts is not None and not isinstance(experts, Mapping):
        raise ValueError("suite.tasks is needed when suite.experts is a pattern")
    named = experts if experts is not None else datasets if isinstance(datasets, Mapping) else None
    return list(named) if named is not None else [ONE_TASK]


class CausalLMSuite(Suite):
    """Experts of a causal-LM base, each with its own text for calibration and perplexity.

    Args:
        base: hub id or folder of the base AutoModelForCausalLM (with its tokenizer); None: quantize `merged`
            alone (its folder gives the config and the tokenizer).
        experts: task -> hub id or folder, or a pattern with `{task}`; None: no experts (one model quantized).
        tasks: task names (None: the keys of `experts` when it is a mapping; without experts, the keys of
            `datasets` when it is a mapping, else one task, "calibration").
        datasets: task -> text source, a `{task}` pattern, or one source for every task: a .txt or .jsonl file,
            a list of strings, or a dataset (hub id or save_to_disk folder); epmq.families.causal_lm.sources.
        text_columns: task -> text column (or JSONL field), or one column name for every task.
        splits: names of the train split (calibration, selection) and the held-out split (perplexity).
        seq_len: tokens per window (calibration and evaluation).
        perplexity: how the held-out windows are cut: "gptq" (the GPTQ reference's protocol, which published
            perplexities use: texts joined with "\n\n", tokenised once, non-overlapping windows) or "packed"
            (each text tokenised alone, EOS between texts, as the calibration windows); lower is better.
        dtype: "float32", "bfloat16" or "float16": the weights' dtype while calibrating and evaluating
            (statistics and solves stay in float32/float64).
        tokenizer: where the tokenizer lives (default: the base, or without one the merged model).
        merged: a merged model to quantize as is (merge=none).
        lm_eval_tasks: lm-evaluation-harness task names to run on the quantized model as well (needs the
            `lmeval` extra; skipped with a warning when it is not installed). lm_eval_limit: examples
            per lm-eval task (None: all).
    """

    name = "causal_lm"
    metric = "perplexity"
    higher_is_better = False
    metric_scale = 1  # tables print perplexity as it is (accuracies print in percent)
    symmetric = True  # quant.sym's default: vLLM's GPTQ kernels are symmetric only, GPTQModel reads asymmetric v2 only

    def __init__(self, base: str | None = None, experts=None, tasks: Sequence[str] | None = None, datasets=None,
                 text_columns="text",
                 splits: Sequence[str] = ("train", "test"), seq_len: int = 512, dtype: str = "float32",
                 tokenizer: str | None = None, merged: str | None = None, lm_eval_tasks: Sequence[str] = (),
                 lm_eval_limit: int | None = None, perplexity: str = "gptq"):
        if base is None and merged is None:
            raise ValueError("suite.merged is not set: give the model to quantize (merge=none suite.merged=<folder "
                             "or hub id>), or suite.base and suite.experts to merge")
        self.tasks = _task_names(tasks, experts, datasets)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"suite.tasks must be a non-empty list of distinct names, got {self.tasks}")
        if dtype not in DTYPES:
            raise ValueError(f"suite.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if len(tuple(splits)) != 2:
            raise ValueError(f"suite.splits must name the train and the held-out split, got {list(splits)}")
        self.base = None if base is None else str(base)
        self.experts = {} if experts is None else _per_task(experts, self.tasks, "experts")
        self.sources = _per_task(datasets, self.tasks, "datasets")
        self.text_columns = _per_task(text_columns, self.tasks, "text_columns")
        self.splits, self.seq_len, self.dtype, self.merged = tuple(splits), int(seq_len), DTYPES[dtype], merged
        self.lm_eval_tasks, self.lm_eval_limit = list(lm_eval_tasks or ()), lm_eval_limit
        if perplexity not in PERPLEXITY:
            raise ValueError(f"suite.perplexity must be one of {PERPLEXITY}, got {perplexity!r}")
        self.perplexity = perplexity
        # the architecture, config and tokenizer: the base's, or without a base the merged model's
        option, source = ("suite.base", self.base) if base is not None else ("suite.merged", str(merged))
        self.architecture = (option, source)
        base_dir = resolve_source(source, option)
        self.config = AutoConfig.from_pretrained(str(base_dir))
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(tokenizer, "suite.tokenizer") if tokenizer else base_dir))
        architecture(self.config.model_type, f"{option} {source}")  # a declared type, or a ValueError

    def model(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The base's architecture (or the merged model's, without a base) holding `state_dict` (None: that
        model's own weights), in eval mode."""
        if state_dict is None:
            option, source = self.architecture
            return AutoModelForCausalLM.from_pretrained(str(resolve_source(source, option)), dtype=self.dtype).eval()
        model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        result = model.load_state_dict(state_dict, strict=False)
        tied = set(_tied_keys(model))
        missing = sorted(set(result.missing_keys) - tied)
        if missing or result.unexpected_keys:
            raise ValueError(f"weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
        model.tie_weights()  # a tied output head follows the embeddings it shares
        return model.eval()

    def datamodule(self, calib_samples: int = 64, select_samples: int = 16, batch_size: int = 8, seed: int = 0,
                   test_samples: int | None = 64, num_workers: int | str = "auto", **loading) -> TextWindowDataModule:
        """Windows of seq_len tokens per task (epmq.families.causal_lm.data)."""
        return TextWindowDataModule(self.tasks, self.sources, self.text_columns, self.tokenizer, self.seq_len,
                                    calib_samples, select_samples, test_samples, batch_size, seed, num_workers,
                                    self.splits, self.perplexity, **loading)

    regmean_unsupported = ("RegMean's Gram pass (epmq.jobs.compare.regmean_merge) sums every token of a batch and "
                           "would count padded tokens")

    def adapter(self, model: nn.Module) -> ModelAdapter:
        return LlamaAdapter()

    def evaluator(self, models, prefix: str) -> PerplexityEvaluator:
        return PerplexityEvaluator({t: models[t] for t in self.tasks}, prefix)

    def extra_evaluation(self, model: nn.Module) -> dict:
        """lm-evaluation-harness scores of `model` on `lm_eval_tasks` ({} when none are asked for, or when
        lm-eval is not installed: then a warning says so)."""
        if not self.lm_eval_tasks:
            return {}
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
        except ImportError:
            log.warning("suite.lm_eval_tasks %s skipped: lm-eval is not installed (pip install -e '.[lmeval]')",
                        self.lm_eval_tasks)
            return {}
        results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=self.tokenizer), tasks=self.lm_eval_tasks,
                                  limit=self.lm_eval_limit)
        return {"lm_eval": results["results"]}

    def describe(self) -> dict:
        datasets = {t: f"{len(s)} samples given in the config" if is_sample_list(s) else s
                    for t, s in self.sources.items()}
        return {"name": self.name, "base": self.base, "experts": self.experts, "merged": self.merged,
                "tasks": self.tasks, "datasets": datasets, "seq_len": self.seq_len, "perplexity": self.perplexity,
                "dtype": str(self.dtype).removeprefix("torch."), "metric": self.metric,
                "higher_is_better": self.higher_is_better}


def _tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that share storage with an earlier key (e.g. lm_head.weight = embed_tokens)."""
    seen, tied = {}, []
    for key, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if ptr in seen:
            tied.append(key)
        seen.setdefault(ptr, key)
    return tied
