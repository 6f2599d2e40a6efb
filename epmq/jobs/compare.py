"""compare(cfg): every method on one set of experts, in one run (`python train.py experiment=compare`).

    references   each expert on its own task, the FP merged model, the FP RegMean merge (closed form
                 from the experts' own input Gram matrices on the calibration samples) and the FP
                 calibrated merge (E-PMQ's calibration at its chosen anchor, not rounded)
    per bit width
      rtn           round the merged weights to nearest
      gptq          GPTQ of the merged model
      regmean_gptq  GPTQ of the RegMean merge: the data-aware merge a careful user would try instead
      epmq          every anchor setting of the ablation grid (both forms) is calibrated, scored on the
                    selection samples and tested; E-PMQ's result is the best of `anchor.candidates` on
                    the selection samples, exactly as `run` chooses (never on test data)
      epmq_layer    one calibration, the strength chosen per layer among `anchor.candidates` by K-fold
                    cross-validation on the calibration samples (anchor.select=layer, output form)
      epmq_block    one calibration, the strength chosen per block among `anchor.candidates` by the heads' loss
                    on the selection samples (anchor.select=block, output form)
      ingredients   E-PMQ at the anchor it chose, once per entry of `compare.ingredients` with that
                    entry's calibration options over the configured ones (quant.normalize, interp,
                    extrapolate, calibrate_bias, calibrate_norms): the ablation of each ingredient, one row each

Shared instead of redone: the merged model, the experts' per-layer targets (one
ExpertTargets(keep=True) for every E-PMQ calibration at every bit width), the data. Every
finished unit (one method at one bit width, one ablation setting) is saved in the run folder
(units/), so that `resume=<run folder>` skips what a killed run already finished. Written to the run folder: results.json (schema in
epmq/jobs/compare_report.py), results.md and plots/*.png; logged to W&B as a table and images when the
wandb logger is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from epmq.core.anchor import parse_strength
from epmq.core.anchor_choice import BlockChoiceEPMQ, LayerwiseEPMQ, selection_key
from epmq.core.merge import simple_average
from epmq.core.regmean import RegMeanSums, gram_matrices
from epmq.core.solvers import EPMQ, GPTQ, INGREDIENTS, RTN, RelaxedEPMQ
from epmq.families.base import suite_class
from epmq.io.files import write_json_atomic
from epmq.io.fingerprint import resume_refusal
from epmq.jobs import compare_report
from epmq.jobs.steps import (Needs, calibrate, claim_run_folder, evaluate, evaluate_experts, layer_losses, logging_to,
                             phase, prepare, quiet_libraries, resolved_config, select_half_scores, select_scores,
                             solvers, target_provider)

log = logging.getLogger(__name__)



def compare_plan(cfg: DictConfig):
    """Validate `cfg.compare`, `cfg.quant` and `cfg.anchor` before any work: (methods, spec options by bits,
    selection candidates as (strength, form), ablation grid). The grid holds every selection
    candidate, strongest anchor first."""
    opts = cfg.compare
    methods = list(opts.methods)
    bad = [m for m in methods if m not in compare_report.METHODS]
    if bad or not methods:
        raise ValueError(f"compare.methods must be a non-empty subset of {compare_report.METHODS}, got {methods}")
    # a suite whose batches RegMean's Gram pass cannot read says why (its `regmean_unsupported`), before any work
    why = suite_class(cfg.suite).regmean_unsupported if "regmean_gptq" in methods else None
    if why:
        rest = ",".join(m for m in methods if m != "regmean_gptq")
        raise ValueError(f"compare.methods: regmean_gptq is not available for suite {cfg.suite._target_}: {why}; "
                         f"leave it out: compare.methods=[{rest}]")
    quant = OmegaConf.merge(OmegaConf.to_container(cfg.quant, resolve=True), {"_target_": "epmq.core.solvers.EPMQ"})
    run_level = OmegaConf.merge(cfg.anchor, {"select": "run"})  # the epmq rows: one calibration per setting
    selection = [(s.strength, s.form) for s in solvers(quant, run_level)]
    bits = list(opts.bits)
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"compare.bits must be a non-empty list of distinct bit widths, got {bits}")
    spec = solvers(OmegaConf.merge(quant, {"strength": float("inf"), "form": "output"}), run_level)[0].spec
    specs = {int(b): dataclasses.replace(spec, bits=b).__dict__ for b in bits}  # QuantSpec checks 2..8
    for options in specs.values():
        EPMQ(**options)
    grid = set(selection)
    if opts.get("ablation") is not None:  # null: E-PMQ's own candidates only
        ablation = OmegaConf.merge(run_level, {"candidates": {"strength": list(opts.ablation.strength),
                                                              "form": list(opts.ablation.form)}})
        grid |= {(s.strength, s.form) for s in solvers(OmegaConf.merge(quant, {"strength": "auto", "form": "auto"}),
                                                       ablation)}
    return methods, specs, selection, sorted(grid, key=lambda c: (-c[0], c[1])), ingredient_plan(cfg)


def ingredient_plan(cfg: DictConfig) -> tuple[dict, dict[str, dict]]:
    """(E-PMQ's configured calibration options, {row name: that row's changes to them}), checked by
    building a solver with each (ValueError naming the row)."""
    configured = {k: cfg.quant[k] for k in INGREDIENTS if k in cfg.quant}
    rows = {}
    for name, change in (cfg.compare.get("ingredients") or {}).items():
        change = OmegaConf.to_container(change) if change is not None else {}
        unknown = sorted(set(change) - set(INGREDIENTS))
        if unknown:
            raise ValueError(f"compare.ingredients.{name}: unknown option(s) {unknown}; E-PMQ's are {list(INGREDIENTS)}")
        try:
            EPMQ(1.0, **{**configured, **change})
        except ValueError as e:
            raise ValueError(f"compare.ingredients.{name}: {e}") from None
        rows[name] = change
    return configured, rows


def compare(cfg: DictConfig) -> dict:
    """Run the comparison `cfg.compare` describes; returns the results (also written to results.json).

    The results' "objective" is E-PMQ's average test accuracy averaged over the bit widths.
    """
    start = time.perf_counter()
    quiet_libraries(cfg.log_http)
    plan = compare_plan(cfg)
    out_dir = Path(cfg.paths.output_dir)
    prepared = prepare(cfg, Needs(experts="experiment=compare scores the experts and the methods that read them"))
    with logging_to(prepared.loggers):
        return _compare(cfg, prepared, plan, out_dir, start)


class Units:
    """Finished units of a comparison run, one JSON file each under <run>/units/ (resume)."""

    def __init__(self, out_dir: Path, fingerprint: dict):
        self.folder = out_dir / "units"
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    def path(self, key: str) -> Path:
        return self.folder / (key.replace("/", "__") + ".json")

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(f"cannot resume {self.folder}: {resume_refusal(saved['fingerprint'], self.fingerprint)}")
        log.info("unit %s: finished by the resumed run", key)
        return saved["result"]

    def put(self, key: str, result: dict) -> dict:
        if rank_zero_only.rank == 0:
            write_json_atomic(self.path(key), {"fingerprint": self.fingerprint, "result": _json_ready(result)})
        return result


def _compare(cfg, prepared, plan, out_dir: Path, start: float) -> dict:
    methods, specs, selection, grid, (configured, ingredient_rows) = plan
    suite, pool, data = prepared.suite, prepared.pool, prepared.data
    claim_run_folder(out_dir, prepared, resume=cfg.get("resume"))
    units = Units(out_dir, prepared.fingerprint)
    timings = {"setup_s": time.perf_counter() - start}

    t0 = time.perf_counter()
    with phase("references (each expert on its task, the FP merge)"):
        references = {"experts": {"test": evaluate_experts(cfg, prepared)},
                      "merged": {"test": evaluate(cfg, prepared, suite.model(prepared.merged_state),
                                                  data.test_dataloader(), "merged/test").results}}
    timings["reference_eval_s"] = time.perf_counter() - t0
    states = {"merged": prepared.merged_state}
    if "regmean_gptq" in methods:
        t0 = time.perf_counter()
        with phase("RegMean merge"):
            states["regmean"] = regmean_merge(suite, pool, data, cfg.compare.regmean_alpha)
        seconds = time.perf_counter() - t0
        references["regmean"] = {"test": evaluate(cfg, prepared, suite.model(states["regmean"]),
                                                  data.test_dataloader(), "regmean/test").results,
                                 "seconds": seconds}
        timings["regmean_s"] = seconds

    targets = target_provider(cfg, pool, keep=True)
    entries, ablation, ingredients = [], [], []
    for bits, spec in specs.items():
        for method in methods:
            if method == "epmq":
                rows = [units.get(f"epmq/bits_{bits}/{form}/strength_{strength:g}") or units.put(
                            f"epmq/bits_{bits}/{form}/strength_{strength:g}",
                            ablation_row(cfg, prepared, EPMQ(strength, form, **spec, **configured), k, len(grid),
                                         targets))
                        for k, (strength, form) in enumerate(grid)]
                ablation += rows
                entries.append(epmq_entry(rows, selection, cfg.anchor.select_by, bits,
                                          prepared.suite.higher_is_better))
                anchor = entries[-1]["anchor"]
                for name, change in ingredient_rows.items():
                    key = f"ingredients/{name}/bits_{bits}"
                    solver = EPMQ(parse_strength(anchor["strength"]), anchor["form"], **spec, **{**configured, **change})
                    row = units.get(key) or units.put(key, ablation_row(cfg, prepared, solver, 0, 1, targets, name))
                    ingredients.append({"name": name, "options": change, **row})
                continue
            key = f"{method}/bits_{bits}"
            entry = units.get(key)
            if entry is None:
                state = "regmean" if method == "regmean_gptq" else "merged"
                if method == "epmq_layer":
                    solver = LayerwiseEPMQ(list(cfg.anchor.candidates.strength), cfg.anchor.folds, **spec)
                elif method == "epmq_block":
                    solver = BlockChoiceEPMQ(list(cfg.anchor.candidates.strength), "output", **spec)
                else:
                    solver = RTN(**spec) if method == "rtn" else GPTQ(**spec)
                experts = targets if method.startswith("epmq_") else None
                with phase(f"{method} {bits}-bit: calibration and test"):
                    calib = calibrate(cfg, prepared, solver, states[state], f"{method} {bits}-bit", targets=experts)
                    test = evaluate(cfg, prepared, calib.model, data.test_dataloader(),
                                    f"compare/{method}/bits_{bits}/test").results
                extra = {}
                if method == "epmq_block":  # its choices, and its scores on the selection halves (judging rules)
                    extra["block_strengths"] = [strength for _, strength in calib.module.step_strengths]
                    if cfg.compare.get("select_halves", True):
                        extra.update(select_half_scores(cfg, prepared, calib.model, f"compare/{method}/bits_{bits}"))
                entry = units.put(key, {"method": method, "bits": bits, "seconds": calib.seconds, "anchor": None,
                                        "test": test, **layer_losses(calib), **extra})
            entries.append(entry)
            log.info("%s %d-bit: test accuracy %.2f", method, bits, 100 * entry["test"]["avg"])
    epmq_entries = sorted((e for e in entries if e["method"] == "epmq"), key=lambda e: -e["bits"])
    if cfg.compare.get("fp_calibrated", True) and epmq_entries:
        references["calibrated"] = units.get("epmq_fp") or units.put(
            "epmq_fp", fp_calibrated(cfg, prepared, epmq_entries[0]["anchor"], specs, targets, configured))
    del targets
    timings["total_s"] = time.perf_counter() - start

    epmq_avgs = [e["test"]["avg"] for e in entries if e["method"] == "epmq"]
    results = {
        "objective": sum(epmq_avgs) / len(epmq_avgs) if epmq_avgs else None,
        "suite": suite.describe(),
        "tasks": suite.tasks,
        "merge": merge_description(cfg),
        "seed": cfg.seed,
        "bits": list(specs),
        "group_size": next(iter(specs.values()))["group_size"],
        "references": references,
        "methods": entries,
        "ablation": ablation,
        "ingredients": ingredients,
        "timings": timings,
        "config": resolved_config(cfg),
    }
    if rank_zero_only.rank == 0:
        publish(prepared.loggers, results, out_dir)
    return results


def regmean_merge(suite, pool, data, alpha: float) -> dict:
    """RegMean of the experts, each expert's Grams from its own task's calibration samples.

    One expert at a time: its float32 Grams go into RegMeanSums and are dropped, so memory does not grow with
    the number of experts. The sums are stored in float32 (each task's terms formed and added in float64, the
    solve in float64): at ViT-B/32 shapes that halves their 1.75 GB, and the merged weights move by 2e-6 of
    their norm against float64 sums (README, the comparison job). The entries without Grams are the experts'
    mean, merged tensor by tensor from the files.
    """
    by_task = task_batches(data, len(suite.tasks))
    sums = RegMeanSums(alpha, dtype=torch.float32)
    for t, task in enumerate(suite.tasks):
        t0 = time.perf_counter()
        tower = suite.model(pool.expert_state_dict(task))
        layers = regmean_layers(suite, tower)
        grams = gram_matrices(tower, layers, [suite.regmean_inputs(b) for b in by_task[t]], dtype=torch.float32)
        sums.add(task, {key: layer.weight for key, layer in layers.items()}, grams)
        del tower, layers, grams
        log.info("RegMean: expert %d/%d (%s): Grams of %d layer inputs in %.1f s", t + 1, len(suite.tasks), task,
                 len(sums.S), time.perf_counter() - t0)
    merged = pool.merge(simple_average, tasks=suite.tasks)
    for key, W in sums.solutions(lambda key: sum(pool.lazy_expert(t)[key].to(torch.float64) for t in suite.tasks)
                                 / len(suite.tasks)):
        merged[key] = W.to(merged[key].dtype)
    return merged


def regmean_layers(suite, tower) -> dict:
    """Weight key -> nn.Linear of every layer the suite's adapter quantizes: the layers RegMean solves."""
    adapter = suite.adapter(tower)
    return {adapter.block_prefix(stage, i) + name + ".weight": linear
            for stage in adapter.stages(tower)
            for i, block in enumerate(adapter.blocks(tower, stage))
            for name, linear in adapter.linear_layers(block, stage).items()}


def task_batches(data, n_tasks: int) -> dict[int, list[dict]]:
    """Task index -> that task's calibration samples, in the loader's batches (rows of one task each)."""
    by_task = {t: [] for t in range(n_tasks)}
    for batch in data.train_dataloader():
        for t in batch["task"].unique().tolist():
            by_task[t].append({k: v[batch["task"] == t] for k, v in batch.items()})
    return by_task


def ablation_row(cfg, prepared, solver, k: int, n: int, targets, ingredient: str = "") -> dict:
    """One E-PMQ setting at one bit width (an anchor of the grid, or an ingredient's row): calibrate,
    score on the selection samples, test."""
    bits = solver.spec.bits
    label = f"{bits}-bit {solver.form}/strength_{solver.strength:g} ({k + 1}/{n})"
    where = f"ablation/{solver.form}/bits_{bits}/strength_{solver.strength:g}"
    if ingredient:
        label, where = f"{bits}-bit ingredient {ingredient}", f"ingredients/{ingredient}/bits_{bits}"
    log.info("%s: calibration, selection scores and test ...", label)
    calib = calibrate(cfg, prepared, solver, label=label, targets=targets)
    t0 = time.perf_counter()
    scores = select_scores(cfg, prepared, calib.model, where)
    select_seconds = time.perf_counter() - t0
    if cfg.compare.get("select_halves", True):  # for choosing design rules on A and judging them on B
        scores.update(select_half_scores(cfg, prepared, calib.model, where))
    test = evaluate(cfg, prepared, calib.model, prepared.data.test_dataloader(), f"{where}/test").results
    log.info("%s: select %.2f / nll %.4f, test %.2f", label, 100 * scores["select_avg_acc"],
             scores["select_avg_nll"], 100 * test["avg"])
    return {"bits": bits, "form": solver.form, "strength": solver.strength, **scores, "test": test,
            "seconds": calib.seconds, "select_seconds": select_seconds, **layer_losses(calib)}


def epmq_entry(rows: list[dict], selection: list[tuple[float, str]], select_by: str, bits: int,
               higher_is_better: bool = True) -> dict:
    """E-PMQ's result: the selection candidates' best on the selection samples (strongest first,
    ties keep the stronger anchor, as in the main job); its time is the whole selection's."""
    wanted = set(selection)
    pool = [r for r in rows if (parse_strength(r["strength"]), r["form"]) in wanted]  # rows come strongest first
    best = max(pool, key=lambda r: selection_key(r, select_by, higher_is_better))
    return {"method": "epmq", "bits": bits, "test": best["test"], "anchor": {"strength": best["strength"],
            "form": best["form"]}, "seconds": sum(r["seconds"] + r["select_seconds"] for r in pool),
            "layer_loss": best["layer_loss"], "rtn_layer_loss": best["rtn_layer_loss"]}


def fp_calibrated(cfg, prepared, anchor: dict, specs: dict, targets, options: dict) -> dict:
    """The FP calibrated merge: E-PMQ's calibration (with its configured ingredients `options`) at the
    anchor it chose at the widest bit width (on the selection samples), W* written without rounding; tested."""
    strength, form = parse_strength(anchor["strength"]), anchor["form"]
    spec = next(iter(specs.values()))  # only percdamp (the damping δ) matters without rounding
    calib = calibrate(cfg, prepared, RelaxedEPMQ(strength, form, **spec, **options), label="FP calibrated merge",
                      targets=targets)
    test = evaluate(cfg, prepared, calib.model, prepared.data.test_dataloader(), "calibrated/test").results
    log.info("FP calibrated merge (λ=%g, %s): test accuracy %.2f", strength, form, 100 * test["avg"])
    return {"test": test, "strength": strength, "form": form, "seconds": calib.seconds}


def merge_description(cfg: DictConfig) -> dict:
    """name, label (for tables, e.g. "task arithmetic (λ=0.3)") and config of the run's merge."""
    node = OmegaConf.to_container(cfg.merge, resolve=True) if cfg.merge else {}
    target = node.get("_target_", "none").rsplit(".", 1)[-1]
    name = {"TaskArithmetic": "task_arithmetic", "TiesMerging": "ties",
            "SimpleAverage": "simple_average"}.get(target, target.lower())
    scaling = node.get("scaling_factor")
    label = name.replace("_", " ") + (f" (λ={scaling:g})" if scaling is not None else "")
    return {"name": name, "label": label, "config": node}


def publish(loggers, results: dict, out_dir: Path) -> None:
    """Rank 0: results.json, results.md, plots; W&B gets the table and the plots."""
    results = _json_ready(results)  # what results.json holds is what the report is made from
    json_path = write_json_atomic(out_dir / "results.json", results)
    paths = compare_report.write_report(results, out_dir)
    columns = ["bits", "method", *results["tasks"], "avg", "seconds"]
    rows = [[e["bits"], e["method"], *[e["test"][t] for t in results["tasks"]], e["test"]["avg"], e["seconds"]]
            for e in results["methods"]]
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_table(key="compare/results", columns=columns, data=rows)
            images = [p for name, p in paths.items() if str(p).endswith(".png")]
            logger.log_image(key="compare/plots", images=[str(p) for p in images],
                             caption=[Path(p).stem for p in images])
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
