"""Results document from comparison runs: mean ± std over seeds, figures, and the paper's numbers quoted.

    python scripts/results_doc.py logs/compare/multiruns/<date> [more folders or results.json ...] \
        --command "python train.py -m experiment=compare seed=0,1,2" [--command ...] \
        [--out docs/RESULTS.md] [--figures docs/figures] [--notes docs/results_notes.md]

Reads every results.json below the given folders (written by `train.py experiment=compare`), groups the
runs by (zoo, merge label) and writes the markdown document plus figures/ablation.png and
figures/avg_acc_vs_bits.png. A zoo is one offline suite build, identified by (fingerprint, weights sha256) and
labelled by the suite seed it was built with ("zoo seed 1", from the stored config's suite.seed; the
fingerprint's first 8 hex digits when not recorded). With one zoo the sections are titled by the merge alone;
with several, "<merge> · zoo seed S". Each (zoo, merge, seed) may appear once and two zoos may not claim the
same suite seed; otherwise it stops and names the files at fault.

Per (zoo, merge), besides mean ± std: E-PMQ − GPTQ per seed, the FP calibrated merge's share of the
FP-merged-to-experts gap, and (when the runs hold "ingredients") each calibration ingredient's change of test
accuracy and of selection NLL against E-PMQ at its chosen anchor, with a summary over all settings.

Over all runs whose results hold scores on the two halves of the selection samples (select_a_*, select_b_*):
design rules (anchor grid, criterion, fixed λ) each choose an ablation row on half A and are judged by its
half-B scores, and each calibration ingredient's change on half B; test accuracy is only reported there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from epmq.core.anchor import parse_strength
from epmq.jobs.compare_report import (DISPLAY, METHODS, REFERENCES, ablation_curves, draw_ablation, draw_avg_vs_bits,
                                      format_strength, markdown_header, markdown_row, method_entry, panels, save_figure,
                                      validate, write_text_atomic)

BITS_COLORS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:pink")
FORM_STYLES = {"output": "-", "weight": "--"}

EXTERNAL = """## External reference (quoted from the paper, not reproduced here)

These numbers are quoted, not measured by this project: they come from other models, tasks and experts
than the offline suite above and are listed only to place the method. Average accuracy in %.

E-PMQ paper (Wang, Gu, Cai et al., arXiv 2605.16882), 4-bit weights, GPTQ → E-PMQ:

| model | tasks | merge | GPTQ | E-PMQ |
| --- | --- | --- | ---: | ---: |
| CLIP-ViT-B/32 | eight tasks (TA8) | task arithmetic | 65.0 | 73.6 |
| CLIP-ViT-B/32 | eight tasks (TA8) | TIES | 69.1 | 74.8 |
| CLIP-ViT-L/14 | twenty tasks (TALL20) | see the paper | 34.8 | 76.7 |
| FLAN-T5-base | GLUE (eight tasks) | see the paper | 78.26 | 83.34 |

FusionBench documentation, CLIP-ViT-B/32 on TA8 in FP32 (their own experts):

| model | avg acc |
| --- | ---: |
| individual experts | 90.3 |
| task arithmetic (λ = 0.3) | 68.0 |
| TIES (λ = 0.3, top 20%) | 72.2 |
| RegMean | 82.4 |
"""


@dataclass
class MergeRuns:
    """Per-seed numbers of one merge on one zoo, in percent (accuracy) and seconds.

    references: reference name -> [avg acc]; methods: (bits, method) -> [avg acc]; seconds likewise;
    anchors: bits -> ["form/λ" chosen by E-PMQ]; ablation: (bits, form, λ) -> [test avg acc];
    ingredients: (name, bits) -> [test avg acc of the ingredient row − E-PMQ's, points];
    ingredient_nll: (name, bits) -> [selection NLL (mean cross-entropy) of the row − that of the ablation
    row at E-PMQ's chosen anchor]; options: ingredient name -> "k=v, ..." (what the row changes);
    margins: bits -> {seed: E-PMQ − GPTQ test avg, points}; recovered: {seed: FP calibrated merge's
    gap recovered in %, None when the run has no calibrated merge}.
    """

    seeds: list = field(default_factory=list)
    references: dict = field(default_factory=lambda: defaultdict(list))
    methods: dict = field(default_factory=lambda: defaultdict(list))
    seconds: dict = field(default_factory=lambda: defaultdict(list))
    anchors: dict = field(default_factory=lambda: defaultdict(list))
    ablation: dict = field(default_factory=lambda: defaultdict(list))
    ingredients: dict = field(default_factory=lambda: defaultdict(list))
    ingredient_nll: dict = field(default_factory=lambda: defaultdict(list))
    options: dict = field(default_factory=dict)
    margins: dict = field(default_factory=lambda: defaultdict(dict))
    recovered: dict = field(default_factory=dict)

    @property
    def bits(self) -> list[int]:
        return sorted({b for b, _ in self.methods})


# ----------------------------------------------------------------------------- reading

def find_results(paths: list[Path]) -> list[Path]:
    """results.json files: given files as they are, folders searched recursively."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("results.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"results_doc: {path} does not exist")
    if not files:
        raise SystemExit(f"results_doc: no results.json under {', '.join(map(str, paths))}")
    return files


def zoo_key(results: dict) -> tuple:
    """A zoo's identity: (suite fingerprint, weights sha256); None where the run did not record it."""
    suite = results.get("suite") or {}
    return suite.get("fingerprint"), suite.get("weights_sha256")


def suite_seed(results: dict):
    """The seed the run's zoo was built with (the stored config's suite.seed), None when not recorded."""
    return ((results.get("config") or {}).get("suite") or {}).get("seed")


def zoo_labels(runs: list[dict]) -> dict[tuple, str]:
    """zoo key -> "zoo seed S" ("zoo <fingerprint[:8]>" without a recorded seed), ordered by suite seed,
    then by first appearance."""
    seeds: dict[tuple, object] = {}
    for results in runs:
        if seeds.get(zoo_key(results)) is None:
            seeds[zoo_key(results)] = suite_seed(results)
    order = sorted(seeds, key=lambda k: (seeds[k] is None, seeds[k] if isinstance(seeds[k], (int, float)) else 0))
    return {k: f"zoo seed {seeds[k]}" if seeds[k] is not None else f"zoo {str(k[0])[:8]}" for k in order}


def check_ingredients(results: dict) -> None:
    """Raise ValueError naming the first ingredient row that cannot be compared with E-PMQ."""
    for i, entry in enumerate(results.get("ingredients") or []):
        for key in ("name", "bits", "test"):
            if key not in entry:
                raise ValueError(f"results.json: ingredients[{i}] has no {key!r}")
        if "avg" not in entry["test"]:
            raise ValueError(f"results.json: ingredients[{i}].test has no 'avg'")
        if method_entry(results, "epmq", entry["bits"]) is None:
            raise ValueError(f"results.json: ingredients[{i}] ({entry['name']!r}) is at {entry['bits']} bits, "
                             f"where the run has no E-PMQ entry to compare it with")


def load_runs(files: list[Path]) -> list[dict]:
    """Read and check every file: valid schema, each (zoo, merge, seed) once, one zoo per suite seed."""
    runs, by_run, claims = [], defaultdict(list), defaultdict(lambda: defaultdict(list))
    for path in files:
        try:
            results = json.loads(path.read_text())
            validate(results)
            check_ingredients(results)
        except (ValueError, KeyError) as err:
            raise SystemExit(f"results_doc: {path}: {err}") from None
        runs.append(results)
        if suite_seed(results) is not None:
            claims[suite_seed(results)][zoo_key(results)].append(path)
        by_run[(zoo_key(results), results["merge"]["label"], results.get("seed"))].append(path)
    for seed, zoos in claims.items():
        if len(zoos) > 1:
            listing = "; ".join(f"fingerprint {fp}, weights {sha}: {', '.join(map(str, ps))}"
                                for (fp, sha), ps in zoos.items())
            raise SystemExit(f"results_doc: {len(zoos)} different zoos claim suite seed {seed} ({listing})")
    for (zoo, label, seed), paths in by_run.items():
        if len(paths) > 1:
            raise SystemExit(f"results_doc: merge {label!r} seed {seed} on zoo {zoo[0]} appears {len(paths)} "
                             f"times: {', '.join(map(str, paths))}; pass only one run per seed")
    return runs


def summarize(runs: list[dict]) -> dict[str, MergeRuns]:
    """section title -> per-seed numbers of one (zoo, merge), sorted by merge label, then zoo. The title is
    the merge label, followed by " · <zoo label>" when the runs come from more than one zoo."""
    zoos = zoo_labels(runs)
    order = {key: i for i, key in enumerate(zoos)}
    merges: dict[str, MergeRuns] = {}
    for results in sorted(runs, key=lambda r: (r["merge"]["label"], order[zoo_key(r)])):
        title = results["merge"]["label"]
        if len(zoos) > 1:
            title += f" · {zoos[zoo_key(results)]}"
        add_run(merges.setdefault(title, MergeRuns()), results)
    return merges


def add_run(merge: MergeRuns, results: dict) -> None:
    """Append one run's numbers (one seed) to its merge's."""
    merge.seeds.append(results.get("seed"))
    for key, name in REFERENCES.items():
        test = results["references"].get(key, {}).get("test", {})
        if "avg" in test:
            merge.references[name].append(100 * test["avg"])
    for entry in results["methods"]:
        key = (entry["bits"], entry["method"])
        merge.methods[key].append(100 * entry["test"]["avg"])
        if entry.get("seconds") is not None:
            merge.seconds[key].append(entry["seconds"])
        if entry.get("anchor"):
            a = entry["anchor"]
            merge.anchors[entry["bits"]].append(f"{a['form']}/{format_strength(a['strength'])}")
    ablation = results.get("ablation") or []
    for bits in {e["bits"] for e in ablation}:
        for form, points in ablation_curves([e for e in ablation if e["bits"] == bits]).items():
            for strength, acc in points:
                merge.ablation[(bits, form, strength)].append(100 * acc)
    add_margins(merge, results)
    add_ingredients(merge, results)


def gap_recovered(references: dict) -> float | None:
    """100·(calibrated − FP merged)/(experts − FP merged) on test avg; None when a reference is missing
    or the experts are no better than the merge (no gap)."""
    avg = {k: references.get(k, {}).get("test", {}).get("avg") for k in ("calibrated", "merged", "experts")}
    if None in avg.values() or avg["experts"] == avg["merged"]:
        return None
    return 100 * (avg["calibrated"] - avg["merged"]) / (avg["experts"] - avg["merged"])


def add_margins(merge: MergeRuns, results: dict) -> None:
    """E-PMQ − GPTQ per bit width (points) and the FP calibrated merge's gap recovered, for this run's seed."""
    seed = results.get("seed")
    for bits in results["bits"]:
        epmq, gptq = method_entry(results, "epmq", bits), method_entry(results, "gptq", bits)
        if epmq and gptq:
            merge.margins[bits][seed] = 100 * (epmq["test"]["avg"] - gptq["test"]["avg"])
    merge.recovered[seed] = gap_recovered(results["references"])


def anchor_row(ablation: list[dict], bits: int, anchor: dict) -> dict | None:
    """The ablation entry at `bits` and E-PMQ's chosen (strength, form); λ = 0 and ∞ do not depend on the
    form and are listed once, so there any form's entry serves. None when not found."""
    if "strength" not in anchor or "form" not in anchor:
        return None
    strength = parse_strength(anchor["strength"])
    rows = [e for e in ablation if e["bits"] == bits and parse_strength(e["strength"]) == strength]
    same_form = [e for e in rows if e["form"] == anchor["form"]]
    if same_form:
        return same_form[0]
    return rows[0] if rows and (strength == 0 or math.isinf(strength)) else None


def options_text(options: dict, configured: dict) -> str:
    """The options an ingredient row changes against the run's configured quant options, "k=v, ..." (all
    of them when the run's config does not say)."""
    changed = {k: v for k, v in options.items() if k not in configured or configured[k] != v}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()) or "as configured"


def add_ingredients(merge: MergeRuns, results: dict) -> None:
    """Each ingredient row's change against E-PMQ at its bit width: test avg (points), and selection NLL
    against the ablation row of E-PMQ's chosen anchor (the selection data is what decides the defaults)."""
    configured = (results.get("config") or {}).get("quant") or {}
    for entry in results.get("ingredients") or []:
        epmq = method_entry(results, "epmq", entry["bits"])
        key = (entry["name"], entry["bits"])
        merge.options.setdefault(entry["name"], options_text(entry.get("options") or {}, configured))
        merge.ingredients[key].append(100 * (entry["test"]["avg"] - epmq["test"]["avg"]))
        base = anchor_row(results.get("ablation") or [], entry["bits"], epmq.get("anchor") or entry)
        if base and base.get("select_avg_nll") is not None and entry.get("select_avg_nll") is not None:
            merge.ingredient_nll[key].append(entry["select_avg_nll"] - base["select_avg_nll"])


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(values: list[float]) -> str:
    """'73.03 ± 0.24' (or just the mean for one seed)."""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


# ----------------------------------------------------------------------------- markdown

def best_quantized(merge: MergeRuns, bits: int) -> float:
    """The highest mean average accuracy among the quantized methods at `bits`."""
    return max(statistics.mean(v) for (b, _), v in merge.methods.items() if b == bits)


def merge_table(merge: MergeRuns) -> str:
    """bits x method: mean ± std of average test accuracy, seeds, mean calibration seconds, anchors."""
    lines = [markdown_header(["bits", "method", "avg acc % (mean ± std)", "seeds", "calib s",
                              "anchors chosen (form/λ × runs)"], slice(2, -1))]
    for bits in merge.bits:
        best = best_quantized(merge, bits)
        for method in METHODS:
            values = merge.methods.get((bits, method))
            if not values:
                continue
            acc = fmt_mean_std(values)
            if statistics.mean(values) == best:
                acc = f"**{acc}**"
            secs = merge.seconds.get((bits, method))
            anchors = ""
            if method == "epmq":
                counts = {a: merge.anchors[bits].count(a) for a in sorted(set(merge.anchors[bits]))}
                anchors = ", ".join(f"{a} × {n}" for a, n in counts.items())
            lines.append(markdown_row([str(bits), DISPLAY[method], acc, str(len(values)),
                                       f"{statistics.mean(secs):.1f}" if secs else "-", anchors]))
    return "\n".join(lines)


def references_table(merge: MergeRuns) -> str:
    """FP references (experts, FP merged, FP RegMean): mean ± std of average test accuracy."""
    lines = [markdown_header(["model", "avg acc % (mean ± std)", "seeds"])]
    lines += [markdown_row([name, fmt_mean_std(v), str(len(v))]) for name, v in merge.references.items()]
    return "\n".join(lines)


def below_statements(merges: dict[str, MergeRuns]) -> list[str]:
    """One sentence per (merge, bits, method) where E-PMQ's mean is below that quantized method's."""
    sentences = []
    for label, merge in merges.items():
        for bits in merge.bits:
            epmq = merge.methods.get((bits, "epmq"))
            if not epmq:
                continue
            for method in METHODS:
                other = merge.methods.get((bits, method))
                if method == "epmq" or not other:
                    continue
                gap = statistics.mean(other) - statistics.mean(epmq)
                if gap > 0:
                    sentences.append(f"E-PMQ is below {DISPLAY[method]} by {gap:.2f} points "
                                     f"at {bits} bits on {label}.")
    return sentences


def comparison_section(merges: dict[str, MergeRuns]) -> str:
    """The plain statements of where E-PMQ loses (or that it never does)."""
    if not any((b, "epmq") in m.methods for m in merges.values() for b in m.bits):
        return "No run holds E-PMQ, so there is nothing to compare."
    sentences = below_statements(merges)
    if not sentences:
        return ("E-PMQ's mean is at or above every other quantized method's mean in every setting "
                "(merge, bits) found.")
    return "\n".join(f"- {s}" for s in sentences)


def ablation_table(merge: MergeRuns) -> str:
    """Mean test accuracy per λ (rows) and (form, bits) (columns)."""
    columns = sorted({(b, f) for b, f, _ in merge.ablation})
    strengths = sorted({s for _, _, s in merge.ablation})
    lines = [markdown_header(["λ", *(f"{f} {b}b" for b, f in columns)])]
    for s in strengths:
        cells = [statistics.mean(v) if (v := merge.ablation.get((b, f, s))) else None for b, f in columns]
        lines.append(markdown_row([format_strength(s), *("-" if c is None else f"{c:.2f}" for c in cells)]))
    return "\n".join(lines)


def seed_order(seeds) -> list:
    """Seeds in numeric order (others after, as text)."""
    return sorted(seeds, key=lambda s: (not isinstance(s, (int, float)), s if isinstance(s, (int, float)) else str(s)))


def per_seed_row(name: str, values: dict, seeds: list, fmt: str) -> str:
    """A row: name, the values in seed order ("-" where absent), their mean."""
    present = [values[s] for s in seeds if values.get(s) is not None]
    cells = ", ".join("-" if values.get(s) is None else format(values[s], fmt) for s in seeds)
    return markdown_row([name, cells, format(statistics.mean(present), fmt) if present else "-"])


def margins_table(merge: MergeRuns) -> str:
    """Per seed: E-PMQ − GPTQ test avg per bit width (points), and the FP calibrated merge's gap recovered
    (100·(calibrated − FP merged)/(experts − FP merged); "-" where the run has no calibrated merge)."""
    seeds = seed_order(merge.seeds)
    lines = [markdown_header(["", f"per seed ({', '.join(map(str, seeds))})", "mean"])]
    lines += [per_seed_row(f"E-PMQ − GPTQ, {bits} bits (points)", merge.margins[bits], seeds, "+.2f")
              for bits in sorted(merge.margins)]
    lines.append(per_seed_row("FP calibrated merge: gap recovered (%)", merge.recovered, seeds, ".1f"))
    return "\n".join(lines)


def delta_cell(tests: list[float] | None, nlls: list[float] | None) -> str:
    """"Δtest / ΔNLL" means over seeds, e.g. "+0.58 / +0.0013" ("-" where absent)."""
    if not tests:
        return "-"
    return f"{statistics.mean(tests):+.2f} / " + (f"{statistics.mean(nlls):+.4f}" if nlls else "-")


def ingredients_table(merge: MergeRuns) -> str | None:
    """Ingredient (its options) x bits: mean over seeds of Δtest / ΔNLL against E-PMQ; None without rows."""
    if not merge.ingredients:
        return None
    names = list(dict.fromkeys(name for name, _ in merge.ingredients))
    all_bits = sorted({b for _, b in merge.ingredients})
    lines = [markdown_header(["ingredient (changes)", *(f"{b} bits" for b in all_bits)])]
    for name in names:
        cells = [delta_cell(merge.ingredients.get((name, b)), merge.ingredient_nll.get((name, b))) for b in all_bits]
        lines.append(markdown_row([f"{name} ({merge.options[name]})", *cells]))
    return "\n".join(lines)


INGREDIENTS_NOTE = ("E-PMQ at the anchor it chose, with one calibration ingredient changed. Each cell: "
                    "Δtest / ΔNLL, means over seeds: Δtest = the row's test average accuracy − E-PMQ's, in "
                    "points; ΔNLL = the row's selection NLL (mean cross-entropy on the selection samples) − "
                    "that of E-PMQ's chosen (λ, form) in the ablation, lower is better. Selection data, not "
                    "test data, is what decides the defaults.")


def ingredients_summary(merges: dict[str, MergeRuns]) -> str | None:
    """One line: per ingredient, over all (zoo, merge, bits) settings, the mean of the per-setting means of
    Δtest and ΔNLL and in how many settings the selection NLL improves (ΔNLL < 0)."""
    settings = defaultdict(list)  # name -> [(mean Δtest, mean ΔNLL or None)], one per setting
    for merge in merges.values():
        for key, tests in merge.ingredients.items():
            nlls = merge.ingredient_nll.get(key)
            settings[key[0]].append((statistics.mean(tests), statistics.mean(nlls) if nlls else None))
    if not settings:
        return None
    parts = []
    for name, rows in settings.items():
        nlls = [n for _, n in rows if n is not None]
        text = f"{name} {statistics.mean(t for t, _ in rows):+.2f} test"
        if nlls:
            better = sum(n < 0 for n in nlls)
            text += f" / {statistics.mean(nlls):+.4f} NLL, selection NLL better in {better} of {len(nlls)}"
        parts.append(text)
    return ("Over every setting (zoo, merge, bits), mean of the per-setting means over seeds, Δtest in points / "
            "ΔNLL against E-PMQ: " + "; ".join(parts) + ".")


# ----------------------------------------------------------------------------- design rules on held-out halves

HALVES = ("select_a_avg_acc", "select_a_avg_nll", "select_b_avg_acc", "select_b_avg_nll")
DEFAULT_RULE = "default: candidates grid, by NLL"
# (label, grid, criterion): grid "candidates" = the run's anchor.candidates (strength × form), "ablation" = every
# ablation row, else strengths tried with the output form; criterion None = a fixed λ (nothing to choose)
RULES = ((DEFAULT_RULE, "candidates", "nll"),
         ("candidates grid, by accuracy", "candidates", "acc"),
         ("ablation grid, by NLL", "ablation", "nll"),
         ("coarse grid {1, 10, ∞}, by NLL", (1.0, 10.0, math.inf), "nll"),
         ("grid {0.3, 1, 3, 10, ∞}, by NLL", (0.3, 1.0, 3.0, 10.0, math.inf), "nll"),
         ("grid {1, 10}, by NLL", (1.0, 10.0), "nll"),
         ("grid {1, ∞}, by NLL", (1.0, math.inf), "nll"),
         ("grid {3, ∞}, by NLL", (3.0, math.inf), "nll"),
         ("fixed λ = 1", (1.0,), None),
         ("fixed λ = 3", (3.0,), None),
         ("fixed λ = 10", (10.0,), None),
         ("GPTQ (λ = ∞)", (math.inf,), None))


def has_halves(entry: dict) -> bool:
    """Whether an ablation or ingredient entry holds its scores on both selection halves (A, B)."""
    return all(isinstance(entry.get(key), (int, float)) for key in HALVES)


def anchor_grid(strengths, forms: list[str]) -> list[tuple[float, str]]:
    """(λ, form) pairs of a grid, strongest first; λ = 0 and ∞ once (first form), as pipeline.solvers tries them."""
    values = sorted({parse_strength(s) for s in strengths}, reverse=True)
    return [(s, f) for s in values for f in forms if f == forms[0] or 0 < s < math.inf]


def candidate_grid(results: dict) -> list[tuple[float, str]] | None:
    """The main job's anchor candidates (the run's anchor.candidates; form output when not listed), None when
    the run's config does not say or says something unreadable."""
    candidates = ((results.get("config") or {}).get("quant") or {}).get("candidates") or {}
    if not candidates.get("strength"):
        return None
    try:
        return anchor_grid(candidates["strength"], list(candidates.get("form") or ["output"]))
    except (ValueError, TypeError):
        return None


def rule_pool(results: dict, rows: list[dict], bits: int, grid) -> list[dict] | None:
    """The rows (with half scores, at `bits`) a rule chooses among; None when one it needs is missing."""
    if grid == "ablation":
        return [r for r in rows if r["bits"] == bits] or None
    pairs = candidate_grid(results) if grid == "candidates" else anchor_grid(grid, ["output"])
    if pairs is None:
        return None
    pool = [anchor_row(rows, bits, {"strength": s, "form": f}) for s, f in pairs]
    return None if any(r is None for r in pool) else pool


def choose_on_a(pool: list[dict], by: str | None) -> dict:
    """The row a rule picks on half A: lowest A-NLL ("nll"), or highest A-accuracy with ties to the lower
    A-NLL ("acc"); remaining ties keep the stronger anchor (larger λ, then the form's name: the main job's
    order). A fixed λ (by None) has one row."""
    order = sorted(pool, key=lambda r: (-parse_strength(r["strength"]), r["form"]))
    if by is None:
        return order[0]
    if by == "nll":
        return min(order, key=lambda r: r["select_a_avg_nll"])
    return min(order, key=lambda r: (-r["select_a_avg_acc"], r["select_a_avg_nll"]))


def rule_choices(runs: list[dict]) -> list[dict[str, tuple[int, dict]]]:
    """One dict per (run, bits) whose ablation holds half scores: rule label -> (calibrations it costs, the
    ablation row it chose on half A); a rule whose rows are not all there is left out of that setting."""
    settings = []
    for results in runs:
        rows = [e for e in results.get("ablation") or [] if has_halves(e)]
        for bits in sorted({e["bits"] for e in rows}):
            chosen = {}
            for label, grid, by in RULES:
                if (pool := rule_pool(results, rows, bits, grid)) is not None:
                    chosen[label] = (len(pool), choose_on_a(pool, by))
            settings.append(chosen)
    return settings


def rules_table(settings: list[dict[str, tuple[int, dict]]]) -> str:
    """Rule x (calibrations, settings, mean half-B accuracy and NLL, mean test accuracy, B-acc wins vs default)."""
    lines = [markdown_header(["rule", "candidates (calibrations)", "settings", "half-B acc %", "half-B NLL",
                              "test acc % (reported only, not used for choosing)", "B-acc wins vs default"])]
    for label, _, _ in RULES:
        picks = [(s[label], s.get(DEFAULT_RULE)) for s in settings if label in s]
        if not picks:
            continue
        costs = sorted({cost for (cost, _), _ in picks})
        rows = [row for (_, row), _ in picks]
        wins = "-"
        if label != DEFAULT_RULE:
            versus = [(row["select_b_avg_acc"], default[1]["select_b_avg_acc"])
                      for (_, row), default in picks if default is not None]
            wins = f"{sum(b > d for b, d in versus)}/{len(versus)}"
        lines.append(markdown_row([
            label, str(costs[0]) if len(costs) == 1 else f"{costs[0]}–{costs[-1]}", str(len(picks)),
            f"{statistics.mean(100 * r['select_b_avg_acc'] for r in rows):.2f}",
            f"{statistics.mean(r['select_b_avg_nll'] for r in rows):.4f}",
            f"{statistics.mean(100 * r['test']['avg'] for r in rows):.2f}", wins]))
    return "\n".join(lines)


def ingredient_halves(runs: list[dict]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, str]]:
    """(ingredient name -> [(Δ half-B accuracy in points, Δ half-B NLL)] over (run, bits), name -> its changes):
    the ingredient row − the ablation row at E-PMQ's chosen (λ, form), where both hold half scores."""
    deltas, options = defaultdict(list), {}
    for results in runs:
        rows = [e for e in results.get("ablation") or [] if has_halves(e)]
        configured = (results.get("config") or {}).get("quant") or {}
        for entry in results.get("ingredients") or []:
            epmq = method_entry(results, "epmq", entry["bits"])
            base = anchor_row(rows, entry["bits"], epmq.get("anchor") or entry)
            if base is None or not has_halves(entry):
                continue
            options.setdefault(entry["name"], options_text(entry.get("options") or {}, configured))
            deltas[entry["name"]].append((100 * (entry["select_b_avg_acc"] - base["select_b_avg_acc"]),
                                          entry["select_b_avg_nll"] - base["select_b_avg_nll"]))
    return deltas, options


def ingredient_halves_table(deltas: dict[str, list[tuple[float, float]]], options: dict[str, str]) -> str:
    """Ingredient x (settings, mean Δ half-B accuracy, mean Δ half-B NLL, settings where B-NLL improves)."""
    lines = [markdown_header(["ingredient (changes)", "settings", "Δ half-B acc (points)", "Δ half-B NLL",
                              "half-B NLL better"])]
    for name, values in deltas.items():
        lines.append(markdown_row([f"{name} ({options[name]})", str(len(values)),
                                   f"{statistics.mean(a for a, _ in values):+.2f}",
                                   f"{statistics.mean(n for _, n in values):+.4f}",
                                   f"{sum(n < 0 for _, n in values)}/{len(values)}"]))
    return "\n".join(lines)


HALVES_NOTE = ("A and B are the two halves of each task's selection samples (a seeded random draw, cut in two). "
               "Each rule chooses one E-PMQ setting (a row of the anchor ablation) by its scores on half A and is "
               "judged by that row's scores on half B; test data never chooses. Means over the (run, bit width) "
               "settings whose runs hold half scores ({settings} settings from {runs} runs; a rule counts only "
               "where every row it needs was calibrated). Candidates: the calibrations a rule costs (λ = 0 and ∞ "
               "once, they do not depend on the form). Ties on A keep the stronger anchor (larger λ); by "
               "accuracy, ties first go to the lower A-NLL. NLL: mean cross-entropy in nats, lower is better. "
               "The test column reports the chosen row's test accuracy only. B-acc wins vs default: settings "
               "where the rule's half-B accuracy is above the default rule's (equal is no win), of those "
               "where both apply.")

INGREDIENT_HALVES_NOTE = ("Calibration ingredients on half B: each ingredient row − the ablation row at E-PMQ's "
                          "chosen (λ, form), means over (run, bit width) settings, accuracy in points. Both rows "
                          "sit at the anchor E-PMQ chose on the whole selection set (A ∪ B), so half B took part "
                          "in choosing that anchor, though not in the ingredient.")


def held_out_section(runs: list[dict]) -> list[str]:
    """The section's parts (heading, notes, tables); empty when no run holds half scores."""
    settings = [s for s in rule_choices(runs) if s]
    if not settings:
        return []
    with_halves = sum(any(has_halves(e) for e in r.get("ablation") or []) for r in runs)
    parts = ["## Design choices, judged on held-out selection samples",
             HALVES_NOTE.format(settings=len(settings), runs=with_halves), rules_table(settings)]
    deltas, options = ingredient_halves(runs)
    if deltas:
        parts += [INGREDIENT_HALVES_NOTE, ingredient_halves_table(deltas, options)]
    return parts


def weights_sentence(suite: dict) -> str:
    """Which weights the runs used: the zoo's weights hash (epmq.families.offline.zoo.weights_sha256)."""
    sha = suite.get("weights_sha256")
    if not sha:
        return "built before zoos recorded a hash of their weights (the runs cannot say which weights they used)."
    return (f"weights sha256 `{sha}` (a zoo's `weights_sha256` in its zoo.json, checked by "
            f"`epmq.families.offline.zoo.open_zoo(root).verify_weights()`; the build is deterministic, so "
            f"`python train.py` on a fresh machine builds these same weights).")


def zoos_sentence(runs: list[dict]) -> str:
    """Each zoo's fingerprint and weights hash (one zoo: the sentence the document always had)."""
    suite = runs[0].get("suite", {})
    zoos = zoo_labels(runs)
    if len(zoos) == 1:
        return f"fingerprint `{suite.get('fingerprint', '?')}`, " + weights_sentence(suite)
    listing = "; ".join(f"{label}: fingerprint `{fp or '?'}`, weights sha256 `{sha or 'not recorded'}`"
                        for (fp, sha), label in zoos.items())
    return (f"{len(zoos)} zoos ({listing}). A zoo's weights hash is its `weights_sha256` in its zoo.json, "
            f"checked by `epmq.families.offline.zoo.open_zoo(root).verify_weights()`; the build is deterministic, so "
            f"`python train.py` with the same `suite.seed` on a fresh machine builds the same weights.")


def header_section(runs: list[dict], merges: dict[str, MergeRuns], commands: list[str],
                   doc_command: str) -> str:
    """How the document was produced: commands, run and seed counts, zoo fingerprints, date."""
    suite = runs[0].get("suite", {})
    produced = "\n".join(f"    {c}" for c in commands) if commands else "    (not given: pass --command)"
    seeds = "; ".join(f"{label}: {len(m.seeds)} seed{'s' if len(m.seeds) > 1 else ''} "
                      f"({', '.join(map(str, seed_order(m.seeds)))})" for label, m in merges.items())
    return "\n".join([
        "# Results", "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{doc_command}` from "
        f"{len(runs)} results.json file{'s' if len(runs) > 1 else ''}. Runs: {seeds}.", "",
        f"Suite `{suite.get('name', '?')}` (tasks: {', '.join(runs[0]['tasks'])}), "
        + zoos_sentence(runs) + " All numbers below are the "
        "offline suite's (the project's own small CLIP-architecture tower and experts, trained here), "
        "not the paper's models.", "",
        "Runs produced with:", "", produced, "",
        "Accuracy: average over tasks of test accuracy, in %, mean ± sample standard deviation over "
        "seeds; the best quantized mean per bit width in bold. Calibration seconds: mean over seeds "
        "(E-PMQ's include the automatic anchor choice).",
    ])


def document(runs: list[dict], merges: dict[str, MergeRuns], commands: list[str], doc_command: str,
             figures: dict[str, str], notes: str = "") -> str:
    """The whole markdown document; figures: name -> link relative to the document's folder; notes:
    the authors' reading of the numbers (markdown), placed after the automatic comparison."""
    parts = [header_section(runs, merges, commands, doc_command)]
    for label, merge in merges.items():
        parts += [f"## {label}", "### Full-precision references", references_table(merge),
                  "### Quantized", merge_table(merge), "### Per-seed margins", margins_table(merge)]
        if (table := ingredients_table(merge)) is not None:
            parts += ["### E-PMQ's calibration ingredients (one at a time)", INGREDIENTS_NOTE, table]
    parts += ["## Where E-PMQ stands", comparison_section(merges)]
    if (summary := ingredients_summary(merges)) is not None:
        parts += ["## Calibration ingredients over all settings", summary]
    parts += held_out_section(runs)
    if notes.strip():
        parts.append(notes.strip())
    if "avg_acc_vs_bits" in figures:
        parts += ["## Average accuracy against bits", f"![average accuracy against bits]({figures['avg_acc_vs_bits']})"]
    if "ablation" in figures:
        parts += ["## Anchor-strength ablation",
                  "Mean over seeds of test average accuracy against λ (∞ = plain GPTQ, drawn on both forms); "
                  "dotted: GPTQ. The ablation is read on test data for illustration only: E-PMQ chooses "
                  "λ on calibration data.",
                  f"![anchor ablation]({figures['ablation']})"]
        parts += [part for label, merge in merges.items() if merge.ablation
                  for part in (f"### {label}", ablation_table(merge))]
    parts.append(EXTERNAL)
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- figures

def panel_width(n: int) -> float:
    """Inches per panel: narrower when many (zoo, merge) panels share the row."""
    return 5.5 if n <= 3 else 4.0


def plot_avg_vs_bits(merges: dict[str, MergeRuns], path: Path) -> Path:
    """Mean ± std of average accuracy against bits, one panel per (zoo, merge), FP references dashed."""
    fig, axes = panels(len(merges), width=panel_width(len(merges)))
    for ax, (label, merge) in zip(axes, merges.items()):
        lines = {}
        for method in METHODS:
            bits = [b for b in merge.bits if merge.methods.get((b, method))]
            stats = [mean_std(merge.methods[(b, method)]) for b in bits]
            if bits:
                lines[method] = (bits, [m for m, _ in stats], [s or 0.0 for _, s in stats])
        refs = {name: statistics.mean(merge.references[name])
                for name in ("experts", "FP merged") if merge.references.get(name)}
        draw_avg_vs_bits(ax, lines, refs)
        ax.set_title(label)
    axes[0].set_ylabel("average test accuracy (%)")
    axes[-1].legend(fontsize=7)
    return save_figure(fig, path)


def plot_ablation(merges: dict[str, MergeRuns], path: Path) -> Path | None:
    """Mean test accuracy against λ, one panel per (zoo, merge), a line per (form, bits), GPTQ dotted per bits."""
    with_ablation = {label: m for label, m in merges.items() if m.ablation}
    if not with_ablation:
        return None
    fig, axes = panels(len(with_ablation), width=panel_width(len(with_ablation)))
    for ax, (label, merge) in zip(axes, with_ablation.items()):
        all_bits = sorted({b for b, _, _ in merge.ablation})
        colors = dict(zip(all_bits, BITS_COLORS))
        curves, hlines = [], []
        for bits, form in sorted({(b, f) for b, f, _ in merge.ablation}):
            points = sorted((s, statistics.mean(v)) for (b, f, s), v in merge.ablation.items()
                            if (b, f) == (bits, form))
            curves.append((f"{form}, {bits} bits", points,
                           dict(marker="o", markersize=3, color=colors[bits],
                                linestyle=FORM_STYLES.get(form, "-."))))
        for bits in all_bits:
            if merge.methods.get((bits, "gptq")):
                hlines.append((f"GPTQ {bits} bits", statistics.mean(merge.methods[(bits, "gptq")]),
                               dict(color=colors[bits])))
        draw_ablation(ax, curves, hlines)
        ax.set_title(label)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("average test accuracy (%)")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> Path:
    """Parse arguments, write the document and its figures; returns the document's path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or results.json files")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument("--command", action="append", default=[],
                        help="a command that produced the runs (repeat for several)")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file with the reading of the numbers, inserted after the comparison")
    args = parser.parse_args(argv)
    runs = load_runs(find_results(args.paths))
    merges = summarize(runs)
    written = {"avg_acc_vs_bits": plot_avg_vs_bits(merges, args.figures / "avg_acc_vs_bits.png"),
               "ablation": plot_ablation(merges, args.figures / "ablation.png")}
    links = {name: Path(os.path.relpath(p.resolve(), args.out.resolve().parent)).as_posix()
             for name, p in written.items() if p is not None}
    shown = argv if argv is not None else sys.argv[1:]
    doc_command = shlex.join(["python", "scripts/results_doc.py", *map(str, shown)])
    notes = args.notes.read_text(encoding="utf-8") if args.notes else ""
    return write_text_atomic(args.out, document(runs, merges, args.command, doc_command, links, notes))


if __name__ == "__main__":
    main()
