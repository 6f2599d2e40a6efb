"""compare(cfg): every method on one set of experts, in one run (`python train.py experiment=compare`).

    references   each expert on its own task, the FP merged model, and the FP RegMean merge
                 (closed form from the experts' own input Gram matrices on the calibration samples)
    per bit width
      rtn           round the merged weights to nearest
      gptq          GPTQ of the merged model
      regmean_gptq  GPTQ of the RegMean merge: the data-aware merge a careful user would try instead
      epmq          every anchor setting of the ablation grid (both forms) is calibrated, scored on the
                    selection samples and tested; E-PMQ's result is the best of `quant.candidates` on
                    the selection samples, exactly as `run` chooses (never on test data)

Shared instead of redone: the merged model, its captured block-0 inputs (one input_cache per merged
model), the experts' per-layer targets (one ExpertActivationCache(keep=True) for every E-PMQ
calibration at every bit width), the data. Written to the run folder: results.json (schema in
epmq/compare_report.py), results.md and plots/*.png; logged to W&B as a table and images when the
wandb logger is on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks.expert_cache import ExpertActivationCache
from epmq import compare_report
from epmq.adapters import adapter_for
from epmq.regmean import gram_matrices, regmean
from epmq.report import write_json_atomic
from epmq.tracking import close_logger
from epmq.run import (Candidate, build, calibrate, evaluate, evaluate_experts, prepare, quant_plan,
                      quiet_lightning, resolved_config, select_scores, selection_key)

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "regmean_gptq", "epmq")


def compare_plan(cfg: DictConfig):
    """Validate `cfg.compare` and `cfg.quant` before any work: (methods, specs by bits, selection
    candidates, ablation grid). The grid holds every selection candidate, strongest anchor first."""
    opts = cfg.compare
    methods = list(opts.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"compare.methods must be a non-empty subset of {METHODS}, got {methods}")
    quant = OmegaConf.merge(cfg.quant, {"method": "epmq"})
    _, spec, selection = quant_plan(quant)
    bits = list(opts.bits)
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"compare.bits must be a non-empty list of distinct bit widths, got {bits}")
    specs = {int(b): dataclasses.replace(spec, bits=b) for b in bits}  # QuantSpec checks 2..8
    ablation = OmegaConf.merge(quant, {"strength": "auto", "form": "auto", "candidates": {
        "strength": list(opts.ablation.strength), "form": list(opts.ablation.form)}})
    _, _, grid = quant_plan(ablation)
    grid = sorted(set(grid) | set(selection), key=lambda c: (-c.strength, c.form))
    return methods, specs, selection, grid


def compare(cfg: DictConfig) -> dict:
    """Run the comparison `cfg.compare` describes; returns the results (also written to results.json).

    The results' "objective" is E-PMQ's average test accuracy averaged over the bit widths.
    """
    start = time.perf_counter()
    quiet_lightning()
    methods, specs, selection, grid = compare_plan(cfg)
    out_dir = Path(cfg.paths.output_dir)
    suite, pool, merged_state, data = prepare(cfg)
    timings = {"setup_s": time.perf_counter() - start}

    t0 = time.perf_counter()
    references = {"experts": {"test": evaluate_experts(cfg, suite, pool, data)},
                  "merged": {"test": evaluate(cfg, suite, suite.tower(merged_state), data.test_dataloader(),
                                              "merged/test").results}}
    timings["reference_eval_s"] = time.perf_counter() - t0
    states = {"merged": merged_state}
    if "regmean_gptq" in methods:
        t0 = time.perf_counter()
        states["regmean"] = regmean_merge(suite, pool, data, cfg.compare.regmean_alpha)
        seconds = time.perf_counter() - t0
        references["regmean"] = {"test": evaluate(cfg, suite, suite.tower(states["regmean"]),
                                                  data.test_dataloader(), "regmean/test").results,
                                 "seconds": seconds}
        timings["regmean_s"] = seconds

    input_caches = {name: {} for name in states}
    expert_cache = ExpertActivationCache(pool, keep=True)
    entries, ablation = [], []
    for bits, spec in specs.items():
        for method in methods:
            if method == "epmq":
                rows = [ablation_row(cfg, suite, pool, data, merged_state, spec, cand, k, len(grid),
                                     expert_cache, input_caches["merged"]) for k, cand in enumerate(grid)]
                ablation += rows
                entries.append(epmq_entry(rows, selection, cfg.quant.select_by, bits))
                continue
            state = "regmean" if method == "regmean_gptq" else "merged"
            calib = calibrate(cfg, suite, pool, data, states[state], "rtn" if method == "rtn" else "gptq",
                              spec, Candidate(math.inf, "output"), f"{method} {bits}-bit",
                              input_cache=input_caches[state])
            entries.append({"method": method, "bits": bits, "seconds": calib.seconds, "anchor": None,
                            "test": evaluate(cfg, suite, calib.model, data.test_dataloader(), "test").results,
                            **losses(calib)})
            log.info("%s %d-bit: test accuracy %.2f", method, bits, 100 * entries[-1]["test"]["avg"])
    del expert_cache
    timings["total_s"] = time.perf_counter() - start

    epmq_avgs = [e["test"]["avg"] for e in entries if e["method"] == "epmq"]
    results = {
        "objective": sum(epmq_avgs) / len(epmq_avgs) if epmq_avgs else None,
        "suite": suite.describe(),
        "tasks": suite.tasks,
        "merge": merge_description(cfg),
        "seed": cfg.seed,
        "bits": list(specs),
        "group_size": next(iter(specs.values())).group_size,
        "references": references,
        "methods": entries,
        "ablation": ablation,
        "timings": timings,
        "config": resolved_config(cfg),
    }
    if rank_zero_only.rank == 0:
        publish(cfg, results, out_dir)
    return results


def regmean_merge(suite, pool, data, alpha: float) -> dict:
    """RegMean of the experts, each expert's Grams from its own task's calibration samples."""
    base = suite.tower(pool.base_state_dict()).state_dict()
    by_task = {t: [] for t in range(len(suite.tasks))}  # task index -> its calibration samples, batched
    for batch in data.train_dataloader():
        for t in batch["task"].unique().tolist():
            by_task[t].append({k: v[batch["task"] == t] for k, v in batch.items()})
    experts, grams = {}, {}
    for t, task in enumerate(suite.tasks):
        tower = suite.tower(pool.expert_state_dict(task))
        adapter = adapter_for(tower)
        layers = {adapter.block_prefix(tower, i) + name + ".weight": linear
                  for i, block in enumerate(adapter.blocks(tower))
                  for name, linear in adapter.linear_layers(block).items()}
        grams[task] = gram_matrices(tower, layers, [adapter.model_inputs(tower, b) for b in by_task[t]])
        experts[task] = tower.state_dict()
    return regmean(base, experts, grams, alpha)


def ablation_row(cfg, suite, pool, data, merged_state, spec, cand: Candidate, k: int, n: int,
                 expert_cache, input_cache) -> dict:
    """One anchor setting at one bit width: calibrate, score on the selection samples, test."""
    label = f"{spec.bits}-bit {cand.label} ({k + 1}/{n})"
    calib = calibrate(cfg, suite, pool, data, merged_state, "epmq", spec, cand, label, expert_cache, input_cache)
    t0 = time.perf_counter()
    scores = select_scores(cfg, suite, calib.model, data)
    select_seconds = time.perf_counter() - t0
    test = evaluate(cfg, suite, calib.model, data.test_dataloader(), "test").results
    log.info("%s: select %.2f / nll %.4f, test %.2f", label, 100 * scores["select_avg_acc"],
             scores["select_avg_nll"], 100 * test["avg"])
    return {"bits": spec.bits, "form": cand.form, "strength": cand.strength, **scores, "test": test,
            "seconds": calib.seconds, "select_seconds": select_seconds, **losses(calib)}


def epmq_entry(rows: list[dict], selection: list[Candidate], select_by: str, bits: int) -> dict:
    """E-PMQ's result: the selection candidates' best on the selection samples (strongest first,
    ties keep the stronger anchor, as in `run`); its time is the whole selection's."""
    wanted = {(c.strength, c.form) for c in selection}
    pool = [r for r in rows if (r["strength"], r["form"]) in wanted]  # rows come strongest first
    best = max(pool, key=lambda r: selection_key(r, select_by))
    return {"method": "epmq", "bits": bits, "test": best["test"], "anchor": {"strength": best["strength"],
            "form": best["form"]}, "seconds": sum(r["seconds"] + r["select_seconds"] for r in pool),
            "layer_loss": best["layer_loss"], "rtn_layer_loss": best["rtn_layer_loss"]}


def losses(calib) -> dict:
    """Σ over layers of the solver's loss and of round-to-nearest's under the same H (None: RTN)."""
    module = calib.module
    if not module.rtn_losses:
        return {"layer_loss": None, "rtn_layer_loss": None}
    total = lambda per_block: sum(sum(layer.values()) for layer in per_block.values())  # noqa: E731
    return {"layer_loss": total(module.block_losses), "rtn_layer_loss": total(module.rtn_losses)}


def merge_description(cfg: DictConfig) -> dict:
    """name, label (for tables, e.g. "task arithmetic (λ=0.3)") and config of the run's merge."""
    node = OmegaConf.to_container(cfg.merge, resolve=True) if cfg.merge else {}
    target = node.get("_target_", "none").rsplit(".", 1)[-1]
    name = {"TaskArithmetic": "task_arithmetic", "TiesMerging": "ties",
            "SimpleAverage": "simple_average"}.get(target, target.lower())
    scaling = node.get("scaling_factor")
    label = name.replace("_", " ") + (f" (λ={scaling:g})" if scaling is not None else "")
    return {"name": name, "label": label, "config": node}


def publish(cfg, results: dict, out_dir: Path) -> None:
    """Rank 0: results.json, results.md, plots; loggers get the flat metrics, a table and the plots."""
    results = _json_ready(results)  # what results.json holds is what the report is made from
    json_path = write_json_atomic(out_dir / "results.json", results)
    paths = compare_report.write_report(results, out_dir)
    flat = {}
    for e in results["methods"]:
        for t, acc in e["test"].items():
            key = "avg_acc" if t == "avg" else f"{t}/acc"
            flat[f"compare/{e['method']}/bits_{e['bits']}/test/{key}"] = acc
    for r in results["ablation"]:
        flat[f"ablation/{r['form']}/bits_{r['bits']}/strength_{r['strength']}/test/avg_acc"] = r["test"]["avg"]
    columns = ["bits", "method", *results["tasks"], "avg", "seconds"]
    rows = [[e["bits"], e["method"], *[e["test"][t] for t in results["tasks"]], e["test"]["avg"], e["seconds"]]
            for e in results["methods"]]
    for logger_cfg in (cfg.logger or {}).values():
        logger = build(logger_cfg)
        logger.log_hyperparams(results["config"])
        logger.log_metrics(flat)
        if type(logger).__name__ == "WandbLogger":
            logger.log_table(key="compare/results", columns=columns, data=rows)
            images = [p for name, p in paths.items() if str(p).endswith(".png")]
            logger.log_image(key="compare/plots", images=[str(p) for p in images],
                             caption=[Path(p).stem for p in images])
        close_logger(logger)
    print("\n" + compare_report.markdown_table(results))
    print(f"results: {json_path}\nreport: {paths.get('markdown', out_dir / 'results.md')}")


def _json_ready(obj):
    """Infinity as the string "inf" (JSON has no infinity)."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    return obj
