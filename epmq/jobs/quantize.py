"""quantize(cfg): the main job behind `python train.py` (`job._target_: epmq.jobs.quantize.quantize`).

    1. check the quantization options (before any long work)
    2. the suite: base, experts, tasks, data; the pool validates every expert file; merge (or the one model
       brought with merge=none suite.merged=..., without base or experts when the solver reads none); the
       per-module options (quant.overrides, quant.lm_head) checked against the model's layers
    3. evaluate the experts (each on its own task) and the FP merged model (evaluate_references; auto: when
       there are experts)
    4. calibrate the merged model step by step (RTN, GPTQ or E-PMQ); with `strength: auto` or
       `form: auto`, choose the anchor on held-out calibration samples (never test data): once per
       candidate (anchor.select=run), or after rounds at low fidelity (staged; epmq.jobs.staged_choice)
    5. evaluate the quantized model (when the data holds held-out samples); print the table, write report.json,
       save the model

Every finished calibration step is saved in the run folder (calibration/<candidate>/), so that
`python train.py <same options> resume=<run folder>` continues a killed run where it stopped.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from callbacks.block_metrics import peak_memory_mb
from epmq.engine.schedule import layer_names
from epmq.io.export import check_exportable, checkpoint_size, chosen_format, save_quantized
from epmq.io.files import write_json_atomic
from epmq.jobs.report import accuracy_table
from epmq.jobs.staged_choice import choose, open_loop_solvers, rounds_of
from epmq.jobs.steps import (Needs, calibration_record, candidate_label, claim_run_folder, evaluate, evaluate_experts,
                             logging_to, phase, prepare, quiet_libraries, resolved_config, solvers)

log = logging.getLogger(__name__)


def quantize(cfg: DictConfig) -> dict:
    """Merge, quantize and evaluate as `cfg` says; returns the report (also written to report.json).

    The report's "objective" is the quantized model's average test metric, for sweepers (None when the data
    holds no held-out samples: then nothing is evaluated).
    """
    start = time.perf_counter()
    quiet_libraries(cfg.log_http)
    candidates = solvers(cfg.quant, cfg.anchor)
    rounds = rounds_of(cfg.anchor) if len(candidates) > 1 else []
    if any(r.fidelity == "open_loop" for r in rounds):
        open_loop_solvers(candidates, rounds[0].pivot)  # refuses options the shared pass cannot take, before the merge
    if not all(s.requirements.codes for s in candidates):
        raise ValueError(f"quant._target_={cfg.quant._target_} does not quantize (the FP calibrated merge): it is a "
                         f"row of experiment=compare, not a job of its own")
    if cfg.save_model:  # refused now, not after the calibration
        fmt = chosen_format(cfg.checkpoint_format, cfg.quant.sym)
        check_exportable(cfg.quant.bits, fmt)
        for rule in getattr(candidates[0], "overrides", None) or ():  # every width an override asks for, too
            if rule.bits is not None:
                check_exportable(rule.bits, fmt, f"quant.overrides[{rule.pattern!r}].bits")
    if cfg.evaluate_references not in REFERENCES:
        raise ValueError(f"evaluate_references must be one of {REFERENCES}, got {cfg.evaluate_references!r}")
    out_dir = Path(cfg.paths.output_dir)
    prepared = prepare(cfg, needs_of(candidates))
    check_modules(prepared, candidates[0])
    with logging_to(prepared.loggers):
        return _quantize(cfg, prepared, candidates, rounds, out_dir, start)


REFERENCES = (True, False, "auto")


def needs_of(candidates: list) -> Needs:
    """What the solvers read besides the model they quantize: E-PMQ the experts (and the base to extrapolate);
    a choice among several candidates, or per step, the selection samples."""
    needs = [s.requirements for s in candidates]
    name = "E-PMQ" if candidates[0].name == "epmq" else candidates[0].name
    return Needs(experts=f"{name} needs the experts, its anchor is their outputs (quant=gptq or quant=rtn "
                         f"quantize one model without them)" if any(r.targets for r in needs) else "",
                 base=f"{name} reads the base model's layers (quant.extrapolate)" if any(r.base for r in needs) else "",
                 selection=len(candidates) > 1 or any(r.per_step_choice for r in needs))


def references_asked(cfg, prepared) -> bool:
    """evaluate_references: true, false, or auto (when the suite has experts: one model quantized without them
    is scored alone unless asked). True needs held-out samples to score them on."""
    asked = bool(prepared.pool.tasks) if cfg.evaluate_references == "auto" else cfg.evaluate_references
    if asked and not prepared.data.held_out:
        if cfg.evaluate_references is True:
            raise ValueError("evaluate_references=true needs held-out samples, and the data holds none (e.g. a "
                             "causal LM's calibration file: give a dataset with a held-out split)")
        return False
    return asked


def _quantize(cfg, prepared, candidates, rounds, out_dir: Path, start: float) -> dict:
    suite, data = prepared.suite, prepared.data
    references = references_asked(cfg, prepared)
    claim_run_folder(out_dir, prepared, resume=cfg.get("resume"))
    timings = {"setup_s": time.perf_counter() - start}
    metrics: dict[str, dict[str, float]] = {}
    if references:
        t0 = time.perf_counter()
        what = "each expert on its task, the FP merge" if prepared.pool.tasks else "the FP model"
        with phase(f"references ({what})"):
            if prepared.pool.tasks:
                metrics["experts"] = evaluate_experts(cfg, prepared)
            metrics["merged"] = evaluate(cfg, prepared, suite.model(prepared.merged_state), data.test_dataloader(),
                                         "merged/test").results
        timings["reference_eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    chosen, calib, selection, choice = choose(cfg, prepared, candidates, rounds, out_dir)
    timings["calibration_s"] = time.perf_counter() - t0
    timings["chosen_calibration_s"] = calib.seconds
    timings["rounds_s"] = sum(r["seconds"] for r in choice)
    log.info("calibration done in %.1f s; kept %s", timings["calibration_s"], candidate_label(chosen))

    t0 = time.perf_counter()
    if data.held_out:
        metrics["quantized"] = evaluate(cfg, prepared, calib.model, data.test_dataloader(), "test").results
    else:
        log.info("no held-out samples in the data (a text file, a list of samples, a dataset without a held-out "
                 "split): the quantized model's %s is not evaluated; report.json's objective is null", suite.metric)
    extra_metrics = suite.extra_evaluation(calib.model)  # e.g. lm-eval tasks of a causal LM
    timings["quantized_eval_s"] = time.perf_counter() - t0
    if metrics.get("quantized") or extra_metrics:
        log.info("quantized model evaluated in %.1f s", timings["quantized_eval_s"])
    timings["total_s"] = time.perf_counter() - start

    described = chosen.describe()
    report = {
        "objective": metrics["quantized"]["avg"] if "quantized" in metrics else None,
        "suite": suite.describe(),
        "method": described["method"],
        "metric": suite.metric,
        "metric_scale": suite.metric_scale,  # how tables print it (100: percent)
        "quant": {"spec": described["spec"], "strength": described.get("strength"), "form": described.get("form"),
                  **({"overrides": described["overrides"], "float_layers": calib.module.float_layers,
                      "layer_specs": layer_specs(chosen, calib.module.quant_results)}
                     if "overrides" in described else {}),
                  "lm_head": described.get("lm_head", False),
                  **({"select": described["select"], "candidates": described["candidates"],
                      **({"folds": described["folds"]} if "folds" in described else {}),
                      "layer_strengths": {k: m["anchor_strength"] for k, m in calib.module.layer_metrics.items()}}
                     if described.get("select") in ("layer", "block") else {})},
        "selection": selection,
        **({"anchor_rounds": choice} if choice else {}),
        "metrics": metrics,
        **({"extra_metrics": extra_metrics} if extra_metrics else {}),
        "calibration": calibration_record(calib),
        "timings": timings,
        "peak_memory_mb": peak_memory_mb(calib.module.placement.device),
        "config": resolved_config(cfg),
    }
    if rank_zero_only.rank == 0:
        publish(cfg, report, suite, calib, out_dir)
    return report


def publish(cfg, report: dict, suite, calib, out_dir: Path) -> None:
    """Rank 0: the terminal table, report.json and (optionally) the quantized model with what its clients load
    beside it (suite.save_companions)."""
    tasks = suite.tasks
    metrics = report["metrics"]
    names = {"experts": "experts (each on its task)", "merged": "merged (FP)" if "experts" in metrics else "FP model",
             "quantized": f"{report['method']} {report['quant']['spec']['bits']}-bit"}
    chosen = report["quant"]
    unit = " (%)" if report["metric_scale"] == 100 else ""
    if metrics:
        table = accuracy_table({names[k]: v for k, v in metrics.items()}, tasks, scale=report["metric_scale"])
        print(f"\n{suite.metric}{unit}, {'higher' if suite.higher_is_better else 'lower'} is better; avg: the mean "
              f"over tasks\n{table}\n")
    else:
        print(f"\nno held-out samples: no {suite.metric} evaluated\n")
    if report["method"] == "epmq" and chosen.get("select") == "layer":
        counts = Counter(chosen["layer_strengths"].values())
        print(f"anchor: form {chosen['form']}, strength chosen per layer by {chosen['folds']}-fold cross-validation "
              f"on the calibration samples: " + ", ".join(f"{s:g} ({counts[s]} layers)" for s in sorted(counts)))
    elif report["method"] == "epmq" and chosen.get("select") == "block":
        print(f"anchor: form {chosen['form']}, strength chosen per block on held-out calibration samples: "
              + ", ".join(f"{label} {strength:g}" for label, strength in calib.module.step_strengths))
    elif report["method"] == "epmq":
        print(f"anchor: strength {chosen['strength']:g}, form {chosen['form']}"
              + (" (chosen on held-out calibration samples)" if report["selection"] or report.get("anchor_rounds") else ""))
    if cfg.save_model:
        with phase("saving the quantized model"):
            model_dir = save_quantized(calib.model, calib.module.quant_results, out_dir / "quantized_model",
                                       chosen["spec"], method=report["method"], strength=chosen["strength"],
                                       form=chosen["form"], true_sequential=calib.module.true_sequential,
                                       checkpoint_format=chosen_format(cfg.checkpoint_format, cfg.quant.sym),
                                       companions=suite.save_companions, overrides=chosen.get("overrides"),
                                       lm_head=chosen["lm_head"])
        report["model_dir"] = str(model_dir)
        report["model_size"] = checkpoint_size(model_dir)
        print(f"quantized model: {model_dir}")
    path = write_json_atomic(out_dir / "report.json", report)
    print(f"report: {path}")


def check_modules(prepared, solver) -> None:
    """quant.overrides and quant.lm_head checked against the model's layers before the references are evaluated
    and the calibration starts (the calibration checks them again; the model is built on the meta device here)."""
    needs_head = solver.requirements.head
    if not (getattr(solver, "overrides", None) or needs_head):
        return
    with torch.device("meta"), warnings.catch_warnings():  # the architecture only: no memory, no weights copied
        warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter")
        model = prepared.suite.model(prepared.merged_state)
    adapter = prepared.suite.adapter(model)
    heads = adapter.head_stages(model) if needs_head else []
    if needs_head and not heads:
        raise ValueError(f"quant.lm_head=true: {type(model).__name__} has no head that {type(adapter).__name__} "
                         f"quantizes")
    if hasattr(solver, "check_modules"):
        try:
            solver.check_modules(layer_names(adapter, model, adapter.stages(model) + heads))
        except ValueError as e:
            raise ValueError(f"quant.{e}") from None


def layer_specs(solver, names) -> dict:
    """full layer name -> {bits, group_size} of every quantized layer among `names` whose options an override
    changed (the report's record of what the rules did)."""
    specs = {name: solver.for_module(name).spec for name in names}
    return {name: {"bits": spec.bits, "group_size": spec.group_size} for name, spec in specs.items()
            if spec != solver.spec}
