"""run(cfg): the main job behind `python train.py`.

    1. check the quantization options (before any long work)
    2. the suite: base, experts, tasks, data; the pool validates every expert file
    3. merge the experts (or take the merged model the suite brings)
    4. evaluate the experts (each on its own task) and the FP merged model
    5. calibrate the merged model block by block (RTN, GPTQ or E-PMQ); with `strength: auto` or
       `form: auto`, once per candidate, keeping the one with the best accuracy on held-out
       calibration samples (never test data)
    6. evaluate the quantized model; log, print the table, write report.json, save the model
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks.anchoring import MergedWeightAnchoring
from callbacks.block_metrics import BlockMetrics, peak_memory_mb
from callbacks.expert_cache import ExpertActivationCache
from epmq.anchor import FORMS
from epmq.evaluate import TaskEvaluator
from epmq.export import save_quantized
from epmq.module import METHODS, BlockwiseCalibration
from epmq.pool import ExpertPool
from epmq.quant import QuantSpec
from epmq.report import accuracy_table, write_json_atomic
from epmq.tracking import close_logger

log = logging.getLogger(__name__)

SPEC_FIELDS = ("bits", "group_size", "sym", "act_order", "static_groups", "percdamp", "blocksize")


@dataclass(frozen=True)
class Candidate:
    """One anchor setting: strength λ >= 0 (inf: plain GPTQ) and form ("output" | "weight")."""

    strength: float
    form: str

    @property
    def label(self) -> str:
        return f"{self.form}/strength_{self.strength:g}"


def quant_plan(quant: DictConfig) -> tuple[str, QuantSpec, list[Candidate]]:
    """Validate `cfg.quant` and return (method, spec, candidates), raising ValueError on bad options.

    RTN and GPTQ have the single candidate (inf, "output"). E-PMQ takes `strength` / `form` as
    given, or every value of `candidates.strength` / `candidates.form` where they are `auto`.
    """
    method = quant.method
    if method not in METHODS:
        raise ValueError(f"quant.method must be one of {METHODS}, got {method!r}")
    spec = QuantSpec(**{k: quant[k] for k in SPEC_FIELDS})
    if method != "epmq":
        return method, spec, [Candidate(math.inf, "output")]
    if quant.get("select_by", "nll") not in SELECT_BY:
        raise ValueError(f"quant.select_by must be one of {SELECT_BY}, got {quant.select_by!r}")
    strengths = quant.candidates.strength if quant.strength == "auto" else [quant.strength]
    forms = quant.candidates.form if quant.form == "auto" else [quant.form]
    strengths = [_strength(s) for s in strengths]
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"quant.form must be 'auto' or one of {FORMS}, got {list(forms)}")
    if not strengths:
        raise ValueError("quant.candidates.strength is empty")
    # Strongest anchoring first, so that ties go to the setting closest to plain GPTQ. inf (W* = W_m)
    # and 0 (W* = (C + δ W_m)(H + δI)⁻¹) are the same model whatever the form: tried once.
    candidates = [Candidate(s, f) for s in sorted(set(strengths), reverse=True) for f in forms]
    return method, spec, [c for c in candidates if c.form == forms[0] or 0 < c.strength < math.inf]


def _strength(value) -> float:
    if isinstance(value, str) and value.strip().lower() in (".inf", "inf", "infinity"):
        return math.inf  # YAML spells infinity .inf; Hydra's command line spells it inf
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"quant.strength must be 'auto', a number >= 0 or inf, got {value!r}") from None
    if math.isnan(s) or s < 0:
        raise ValueError(f"quant.strength must be >= 0 (inf allowed), got {value!r}")
    return s


def run(cfg: DictConfig) -> dict:
    """Merge, quantize and evaluate as `cfg` says; returns the report (also written to report.json).

    The report's "objective" is the quantized model's average test accuracy, for sweepers. With a
    `compare` node (`experiment=compare`) the run is epmq.compare.compare(cfg) instead.
    """
    if cfg.get("compare"):
        from epmq.compare import compare  # compare builds on this module's steps

        return compare(cfg)
    start = time.perf_counter()
    quiet_lightning()
    method, spec, candidates = quant_plan(cfg.quant)
    out_dir = Path(cfg.paths.output_dir)
    suite, pool, merged_state, data = prepare(cfg)
    timings = {"setup_s": time.perf_counter() - start}

    metrics: dict[str, dict[str, float]] = {}
    if cfg.evaluate_references:
        t0 = time.perf_counter()
        metrics["experts"] = evaluate_experts(cfg, suite, pool, data)
        metrics["merged"] = evaluate(cfg, suite, suite.tower(merged_state), data.test_dataloader(),
                                     "merged/test").results
        timings["reference_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selection, best = [], None
    # E-PMQ's targets do not depend on the anchor: record them once, replay them for every candidate
    expert_cache = ExpertActivationCache(pool, keep=len(candidates) > 1)
    for k, cand in enumerate(candidates):
        label = f"{cand.label} ({k + 1}/{len(candidates)})" if len(candidates) > 1 else ""
        calib = calibrate(cfg, suite, pool, data, merged_state, method, spec, cand, label, expert_cache)
        if len(candidates) > 1:
            scores = select_scores(cfg, suite, calib.model, data)
            selection.append({"strength": cand.strength, "form": cand.form, **scores, "seconds": calib.seconds})
            log.info("candidate %s: select accuracy %.2f, nll %.4f", cand.label,
                     100 * scores["select_avg_acc"], scores["select_avg_nll"])
            key = selection_key(scores, cfg.quant.select_by)
            if best is None or key > best[0]:  # candidates come strongest first: ties keep the stronger
                best = (key, cand, calib)
        else:
            best = (None, cand, calib)
    del expert_cache
    _, chosen, calib = best
    timings["calibration_s"] = time.perf_counter() - t0
    timings["chosen_calibration_s"] = calib.seconds

    t0 = time.perf_counter()
    metrics["quantized"] = evaluate(cfg, suite, calib.model, data.test_dataloader(), "test").results
    timings["quantized_eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start

    report = {
        "objective": metrics["quantized"]["avg"],
        "suite": suite.describe(),
        "method": method,
        "quant": {"spec": spec.__dict__, "strength": chosen.strength, "form": chosen.form},
        "selection": selection,
        "metrics": metrics,
        "calibration": calib.history,
        "timings": timings,
        "peak_memory_mb": peak_memory_mb(calib.module.device),
        "config": resolved_config(cfg),
    }
    if rank_zero_only.rank == 0:
        publish(cfg, report, suite.tasks, calib, out_dir)
    return report


def prepare(cfg: DictConfig):
    """Seed, then (suite, expert pool, merged state dict, set-up datamodule): the steps every job shares.
    The pool validates every expert file before anything is merged."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    suite = build(cfg.suite)
    pool = ExpertPool(suite.base, suite.experts, merged=getattr(suite, "merged", None))
    merged_state = merge(cfg, pool, suite)
    data = suite.datamodule(**OmegaConf.to_container(cfg.data, resolve=True), seed=cfg.seed)
    data.setup("fit")
    return suite, pool, merged_state, data


def quiet_lightning() -> None:
    """Keep the terminal for the block progress and the table: one trainer per calibration and
    evaluation would otherwise repeat Lightning's device banner many times."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning internals


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, re-raising a ValueError of the target itself (bad options) unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain data, interpolations resolved (Hydra's own node left out)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def merge(cfg: DictConfig, pool: ExpertPool, suite) -> dict[str, torch.Tensor]:
    """The merged state dict: `cfg.merge` applied to the pool, or the suite's own merged model."""
    if cfg.merge and "_target_" in cfg.merge:
        merger = build(cfg.merge)
        experts = {t: pool.expert_state_dict(t) for t in suite.tasks}
        merged = merger(pool.base_state_dict(), experts)
        del experts
    else:
        merged = pool.merged_state_dict()
        if merged is None:
            raise ValueError("merge=none needs a merged model: set the suite's `merged` to its folder or hub id")
    bad = next((k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"the merged model has NaN/Inf values in '{bad}'")
    return merged


@dataclass
class Calibration:
    model: torch.nn.Module
    module: BlockwiseCalibration
    history: list[dict]
    seconds: float


def calibrate(cfg, suite, pool, data, merged_state, method, spec, cand: Candidate, label: str = "",
              expert_cache: ExpertActivationCache | None = None, input_cache: dict | None = None) -> Calibration:
    """Quantize a fresh copy of the merged model with one anchor setting; one fit epoch per block.

    expert_cache: an ExpertActivationCache to use (keep=True shares the experts' targets between
    calibrations); None: a fresh one. input_cache: block-0 inputs shared between calibrations of
    this same merged model (see BlockwiseCalibration).
    """
    model = suite.tower(merged_state)
    # strength inf is GPTQ of the merged model exactly (W* = W_m): skip the experts' work
    effective = "gptq" if method == "epmq" and math.isinf(cand.strength) else method
    module = BlockwiseCalibration(model, spec=spec, method=effective, task_names=suite.tasks,
                                  input_cache=input_cache)
    module.label = label
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if effective == "epmq":
        callbacks += [expert_cache or ExpertActivationCache(pool), MergedWeightAnchoring(cand.strength, cand.form)]
    trainer = instantiate(cfg.trainer, max_epochs=module.num_blocks, callbacks=callbacks, logger=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    metrics = next((cb for cb in callbacks if isinstance(cb, BlockMetrics)), None)
    return Calibration(model, module, metrics.history if metrics else [], seconds)


def evaluate(cfg, suite, tower, loaders, prefix: str) -> TaskEvaluator:
    """`tower` with each task's head on the per-task loaders; .results: accuracy in [0, 1] per task
    and "avg", .nll: mean cross-entropy in nats per task and "avg"."""
    evaluator = TaskEvaluator({t: suite.classifier(tower, t) for t in suite.tasks}, suite.num_classes, prefix)
    _test(cfg, evaluator, loaders)
    return evaluator


SELECT_BY = ("nll", "acc")


def select_scores(cfg, suite, tower, data) -> dict[str, float]:
    """Average accuracy and cross-entropy on the held-out selection samples (never test data)."""
    evaluator = evaluate(cfg, suite, tower, data.select_dataloader(), "select")
    return {"select_avg_acc": evaluator.results["avg"], "select_avg_nll": evaluator.nll["avg"]}


def selection_key(scores: dict[str, float], select_by: str) -> float:
    """Higher is better: -cross-entropy ("nll") or accuracy ("acc") on the selection samples."""
    return -scores["select_avg_nll"] if select_by == "nll" else scores["select_avg_acc"]


def evaluate_experts(cfg, suite, pool, data) -> dict[str, float]:
    """Each expert on its own task's test split, one expert in memory at a time."""
    loaders = dict(zip(suite.tasks, data.test_dataloader()))
    results = {}
    for t in suite.tasks:
        tower = suite.tower(pool.expert_state_dict(t))
        evaluator = TaskEvaluator({t: suite.classifier(tower, t)}, suite.num_classes, "experts/test")
        _test(cfg, evaluator, [loaders[t]])
        results[t] = evaluator.results[t]
    results["avg"] = sum(results.values()) / len(results)
    return results


def _test(cfg, evaluator: TaskEvaluator, loaders) -> None:
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    trainer.test(evaluator, dataloaders=list(loaders), verbose=False)


def publish(cfg, report: dict, tasks: list[str], calib: Calibration, out_dir: Path) -> None:
    """Rank 0: loggers, the terminal table, report.json and (optionally) the quantized model."""
    metrics = report["metrics"]
    flat = {}
    for name, prefix in (("quantized", "test"), ("merged", "merged/test"), ("experts", "experts/test")):
        for t, acc in metrics.get(name, {}).items():
            flat[f"{prefix}/avg_acc" if t == "avg" else f"{prefix}/{t}/acc"] = acc
    for s in report["selection"]:
        key = f"select/{s['form']}/strength_{s['strength']:g}"
        flat[f"{key}/avg_acc"], flat[f"{key}/avg_nll"] = s["select_avg_acc"], s["select_avg_nll"]
    for logger_cfg in (cfg.logger or {}).values():
        logger = instantiate(logger_cfg)
        logger.log_hyperparams(report["config"])
        for record in calib.history:
            logger.log_metrics({k: v for k, v in record.items() if k != "block"}, step=record["block"])
        logger.log_metrics(flat, step=len(calib.history))
        close_logger(logger)

    names = {"experts": "experts (each on its task)", "merged": "merged (FP32)",
             "quantized": f"{report['method']} {report['quant']['spec']['bits']}-bit"}
    table = accuracy_table({names[k]: v for k, v in metrics.items()}, tasks)
    chosen = report["quant"]
    print(f"\n{table}\n")
    if report["method"] == "epmq":
        print(f"anchor: strength {chosen['strength']:g}, form {chosen['form']}"
              + (" (chosen on held-out calibration samples)" if report["selection"] else ""))
    if cfg.save_model:
        model_dir = save_quantized(calib.model, calib.module.quant_results, out_dir / "quantized_model",
                                   {"method": report["method"], **chosen, "config": report["config"]})
        report["model_dir"] = str(model_dir)
        print(f"quantized model: {model_dir}")
    path = write_json_atomic(out_dir / "report.json", report)
    print(f"report: {path}")
