"""Tables and plots of one comparison run (the results.json written by `train.py experiment=compare`).

    from epmq.jobs.compare_report import write_report
    write_report(json.loads(Path("results.json").read_text()), Path("run_dir"))

writes results.md and plots/{per_task_acc,avg_acc_vs_bits,ablation}.png. Accuracies in results.json are
fractions; everything shown here is in percent. The drawing helpers (`draw_ablation`,
`draw_avg_vs_bits`, `write_text_atomic`) are shared with scripts/results_doc.py, which aggregates seeds.
Figures are built on matplotlib `Figure` objects (Agg canvas), never through pyplot, so importing this
module changes no global backend.

results.json (one suite, one merge, one seed; accuracies in [0, 1], times in seconds):

    suite, tasks          the suite's description and its task names (report order)
    merge                 {"name", "label" (for tables, e.g. "task arithmetic (λ=0.3)"), "config"}
    seed, bits, group_size
    references            {"experts" | "merged" | "regmean" | "calibrated": {"test": {task: acc, "avg": acc}}}
                          ("calibrated": the FP calibrated merge, also "strength", "form", "seconds")
    methods               one entry per (method, bits): {"method": rtn | gptq | regmean_gptq | epmq | epmq_layer
                          | epmq_block (also "block_strengths", λ per step, and its select_{a,b}_avg_{acc,nll}),
                          "bits", "test", "seconds", "layer_loss", "rtn_layer_loss", "anchor"}; E-PMQ's
                          seconds cover its whole anchor selection, its anchor is {"strength", "form"};
                          layer_loss is Σ_layers tr((Q − W*) H (Q − W*)ᵀ), rtn_layer_loss the same for
                          round-to-nearest of the same W* under the same H (None for RTN)
    ablation              one entry per (bits, form, strength): {"select_avg_acc", "select_avg_nll",
                          "test", "seconds", ...}; strength ∞ is the JSON string "inf"
    ingredients           (optional) one entry per (ingredient row, bits): E-PMQ at its chosen anchor with
                          the row's changes to the configured calibration options ("options"): {"name",
                          "options", "bits", "strength", "form",
                          "select_avg_acc", "select_avg_nll", "test", "seconds", ...}
    timings, config       wall times of the run's stages; the resolved Hydra config
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from epmq.core.anchor import parse_strength
from epmq.io.files import write_atomic

METHODS = ("rtn", "gptq", "regmean_gptq", "epmq", "epmq_layer", "epmq_block")
DISPLAY = {"rtn": "RTN", "gptq": "GPTQ", "regmean_gptq": "RegMean → GPTQ", "epmq": "E-PMQ",
           "epmq_layer": "E-PMQ, λ per layer (one pass)", "epmq_block": "E-PMQ, λ per block (one pass)"}
REFERENCES = {"experts": "experts", "merged": "FP merged", "regmean": "FP RegMean",
              "calibrated": "FP calibrated merge (E-PMQ, no rounding)"}
COLORS = {"rtn": "tab:gray", "gptq": "tab:blue", "regmean_gptq": "tab:green", "epmq": "tab:red",
          "epmq_layer": "tab:orange", "epmq_block": "tab:brown"}
FORM_COLORS = {"output": "tab:red", "weight": "tab:purple"}
PLOTS = {"per_task_acc": "plots/per_task_acc.png", "avg_acc_vs_bits": "plots/avg_acc_vs_bits.png",
         "ablation": "plots/ablation.png"}


# ----------------------------------------------------------------------------- reading results.json

def validate(results: dict) -> None:
    """Raise ValueError naming the first missing or malformed key of a results.json dict."""
    for key in ("tasks", "bits", "methods", "references", "merge"):
        if key not in results:
            raise ValueError(f"results.json: missing key {key!r}")
    if "label" not in results["merge"]:
        raise ValueError("results.json: missing key 'merge.label'")
    if not results["bits"]:
        raise ValueError("results.json: 'bits' is empty")
    for i, entry in enumerate(results["methods"]):
        if entry.get("method") not in METHODS:
            raise ValueError(f"results.json: methods[{i}].method is {entry.get('method')!r}, "
                             f"expected one of {METHODS}")
        if entry.get("bits") not in results["bits"]:
            raise ValueError(f"results.json: methods[{i}].bits is {entry.get('bits')!r}, "
                             f"not in bits {results['bits']}")
        if "avg" not in entry.get("test", {}):
            raise ValueError(f"results.json: methods[{i}].test has no 'avg'")
    for i, entry in enumerate(results.get("ablation") or []):
        for key in ("bits", "form", "strength", "test"):
            if key not in entry:
                raise ValueError(f"results.json: ablation[{i}] has no {key!r}")
        parse_strength(entry["strength"])


def format_strength(strength) -> str:
    """λ for a label: 0, 1, 0.01, 1e+04, ∞."""
    value = parse_strength(strength)
    return "∞" if math.isinf(value) else f"{value:g}"


def method_entry(results: dict, method: str, bits: int) -> dict | None:
    """The methods[] entry of `method` at `bits`, or None when the run did not evaluate it."""
    for entry in results["methods"]:
        if entry["method"] == method and entry["bits"] == bits:
            return entry
    return None


def methods_present(results: dict) -> list[str]:
    """The quantization methods the run holds, in display order."""
    found = {entry["method"] for entry in results["methods"]}
    return [m for m in METHODS if m in found]


def ablation_curves(entries: Sequence[dict]) -> dict[str, list[tuple[float, float]]]:
    """form -> [(λ, test avg accuracy)] sorted by λ, from ablation entries of one bit width.

    λ = ∞ (plain GPTQ, W* = W_m) and λ = 0 (pure expert guidance, both forms reduce to
    W* = (C + δ W_m)(H + δ I)⁻¹) do not depend on the form, so results.json lists each once; they are
    copied into every form's curve here so both lines start and end at the same points.
    """
    curves: dict[str, dict[float, float]] = {}
    for entry in entries:
        curves.setdefault(entry["form"], {})[parse_strength(entry["strength"])] = entry["test"]["avg"]
    shared = {s: a for points in curves.values() for s, a in points.items() if math.isinf(s) or s == 0}
    for points in curves.values():
        for s, a in shared.items():
            points.setdefault(s, a)
    return {form: sorted(points.items()) for form, points in sorted(curves.items())}


# ----------------------------------------------------------------------------- markdown

def pct(x: float | None) -> str:
    """A fraction in [0, 1] as a percent with 2 decimals ("-" when absent)."""
    return "-" if x is None else f"{100 * x:.2f}"


def markdown_row(cells: Sequence[str]) -> str:
    """One GitHub-markdown table row."""
    return "| " + " | ".join(cells) + " |"


def markdown_header(cells: Sequence[str], numbers: slice = slice(1, None)) -> str:
    """Header row and alignment rule; the columns in `numbers` (default all but the first) right-aligned."""
    right = set(range(len(cells))[numbers])
    rule = ["---:" if i in right else "---" for i in range(len(cells))]
    return markdown_row(cells) + "\n" + markdown_row(rule)


def references_table(results: dict) -> str:
    """Experts, FP merged and FP RegMean: per-task and average test accuracy in percent."""
    tasks = results["tasks"]
    lines = [markdown_header(["model", *tasks, "avg"])]
    for key, name in REFERENCES.items():
        ref = results["references"].get(key)
        if ref and "test" in ref:
            lines.append(markdown_row([name, *(pct(ref["test"].get(t)) for t in [*tasks, "avg"])]))
    return "\n".join(lines)


def bits_table(results: dict, bits: int) -> str:
    """RTN / GPTQ / RegMean → GPTQ / E-PMQ at one bit width; the best average in bold; calibration
    time (for E-PMQ's selection: every candidate's calibration and scoring) also as a multiple of GPTQ's."""
    tasks = results["tasks"]
    entries = [e for m in METHODS if (e := method_entry(results, m, bits)) is not None]
    best = max((e["test"]["avg"] for e in entries), default=None)
    gptq = method_entry(results, "gptq", bits)
    gptq_s = gptq.get("seconds") if gptq else None
    refs = {k: results["references"].get(k, {}).get("test", {}).get("avg") for k in ("experts", "merged")}
    gap = (refs["experts"] - refs["merged"]) if None not in refs.values() else None
    lines = [markdown_header(["method", *tasks, "avg", "gap recovered %", "calib s", "× GPTQ", "anchor (λ, form)"],
                             slice(1, -1))]
    for e in entries:
        avg = pct(e["test"]["avg"])
        if e["test"]["avg"] == best:
            avg = f"**{avg}**"
        anchor = e.get("anchor")
        anchor_text = f"{format_strength(anchor['strength'])}, {anchor['form']}" if anchor else ""
        seconds = "-" if e.get("seconds") is None else f"{e['seconds']:.1f}"
        ratio = "-" if e.get("seconds") is None or not gptq_s else f"{e['seconds'] / gptq_s:.1f}"
        if e["method"] == "epmq_layer":
            anchor_text = "per layer"
        if e["method"] == "epmq_block":
            anchor_text = "per block: " + " / ".join(format_strength(x) for x in e.get("block_strengths", []))
        # the share of the experts' lead over the FP merge that the method closes (negative: it loses ground)
        recovered = "-" if not gap else f"{100 * (e['test']['avg'] - refs['merged']) / gap:.1f}"
        lines.append(markdown_row([DISPLAY[e["method"]], *(pct(e["test"].get(t)) for t in tasks),
                                   avg, recovered, seconds, ratio, anchor_text]))
    return "\n".join(lines)


def ingredients_table(results: dict, bits: int) -> str | None:
    """E-PMQ at its chosen anchor, then with each ingredient row's options: selection and test averages
    and the test change against E-PMQ. None when the run has no ingredient rows at this bit width."""
    rows = [e for e in results.get("ingredients") or [] if e["bits"] == bits]
    epmq = method_entry(results, "epmq", bits)
    if not rows or epmq is None:
        return None
    base = epmq["test"]["avg"]
    lines = [markdown_header(["E-PMQ at its anchor, with", "options", "select avg", "test avg", "Δ test"], slice(2, None))]
    lines.append(markdown_row(["(as configured)", "", "", pct(base), ""]))
    for e in rows:
        options = ", ".join(f"{k}={v}" for k, v in e["options"].items())
        lines.append(markdown_row([e["name"], options, pct(e["select_avg_acc"]), pct(e["test"]["avg"]),
                                   f"{100 * (e['test']['avg'] - base):+.2f}"]))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """One run's tables in GitHub markdown: the FP references, then one table per bit width."""
    validate(results)
    suite = results.get("suite", {})
    head = (f"Suite {suite.get('name', '?')} (fingerprint `{suite.get('fingerprint', '?')}`), "
            f"merge {results['merge']['label']}, seed {results.get('seed', '?')}, "
            f"group size {results.get('group_size', '?')}. Test accuracy in %.")
    parts = [head, "### Full-precision references", references_table(results)]
    for bits in sorted(results["bits"]):
        parts += [f"### {bits} bits", bits_table(results, bits)]
        table = ingredients_table(results, bits)
        if table:
            parts += [f"E-PMQ's calibration ingredients, one at a time ({bits} bits):", table]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- files

def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Save `fig` as a PNG at `path` atomically."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def panels(n: int, width: float = 4.5, height: float = 3.6) -> tuple[Figure, list]:
    """A figure with n side-by-side axes sharing the y axis."""
    fig = Figure(figsize=(width * n, height))
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    return fig, list(axes)


# ----------------------------------------------------------------------------- plots of one run

def plot_per_task(results: dict, path: str | Path) -> Path:
    """Grouped bars of per-task (and average) test accuracy by method, one panel per bit width.

    The experts (black) and the FP merged model (grey, dashed) are short horizontal marks per group.
    """
    validate(results)
    groups = [*results["tasks"], "avg"]
    methods = methods_present(results)
    refs = {k: results["references"].get(k, {}).get("test", {}) for k in ("experts", "merged")}
    all_bits = sorted(results["bits"])
    fig, axes = panels(len(all_bits), width=max(4.5, 1.1 * len(groups)))
    width = 0.8 / max(len(methods), 1)
    lowest = 100.0
    for ax, bits in zip(axes, all_bits):
        for j, method in enumerate(methods):
            entry = method_entry(results, method, bits)
            if entry is None:
                continue
            xs = [g - 0.4 + width * (j + 0.5) for g in range(len(groups))]
            ys = [100 * entry["test"].get(t, math.nan) for t in groups]
            lowest = min([lowest, *(y for y in ys if not math.isnan(y))])
            ax.bar(xs, ys, width, color=COLORS[method], label=DISPLAY[method])
        for key, style in (("experts", dict(colors="black")), ("merged", dict(colors="0.4", linestyles="--"))):
            ys = [100 * refs[key].get(t, math.nan) for t in groups]
            ax.hlines(ys, [g - 0.45 for g in range(len(groups))], [g + 0.45 for g in range(len(groups))],
                      label=REFERENCES[key], linewidth=1.5, **style)
        ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
        ax.set_title(f"{bits} bits")
        ax.grid(axis="y", alpha=0.3)
    # methods differ by a few points: start the axis just below the lowest bar, not at 0
    axes[0].set_ylim(bottom=max(0.0, 10 * math.floor((lowest - 5) / 10)))
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


def draw_avg_vs_bits(ax, lines: dict[str, tuple[list[int], list[float], list[float] | None]],
                     references: dict[str, float]) -> None:
    """Average accuracy (%) against bits on `ax`.

    lines: method -> (bits, mean accuracy %, std % or None); references: name -> accuracy %, drawn as
    dashed horizontal lines.
    """
    for method, (bits, means, stds) in lines.items():
        ax.errorbar(bits, means, yerr=stds, marker="o", capsize=3, color=COLORS.get(method),
                    label=DISPLAY.get(method, method))
    for (name, value), color in zip(references.items(), ("black", "0.45", "tab:olive")):
        ax.axhline(value, linestyle="--", linewidth=1, color=color, label=name)
    all_bits = sorted({b for bits, _, _ in lines.values() for b in bits})
    ax.set_xticks(all_bits)
    ax.set_xlabel("bits")
    ax.grid(alpha=0.3)


def plot_avg_vs_bits(results: dict, path: str | Path) -> Path:
    """Average test accuracy against bits, one line per quantized method, experts and FP merged dashed."""
    validate(results)
    lines = {}
    for method in methods_present(results):
        entries = sorted((e for e in results["methods"] if e["method"] == method), key=lambda e: e["bits"])
        lines[method] = ([e["bits"] for e in entries], [100 * e["test"]["avg"] for e in entries], None)
    references = {name: 100 * results["references"][key]["test"]["avg"]
                  for key, name in REFERENCES.items() if key in ("experts", "merged")
                  and "avg" in results["references"].get(key, {}).get("test", {})}
    fig, (ax,) = panels(1, width=5.5)
    draw_avg_vs_bits(ax, lines, references)
    ax.set_ylabel("average test accuracy (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def lambda_positions(strengths: Sequence[float]) -> dict[float, float]:
    """x position of each λ: log10 λ for finite λ > 0, 0 one decade left of the smallest, ∞ one right
    of the largest (so both ends of the anchor range sit on one axis, labelled by `lambda_label`)."""
    finite = sorted({s for s in strengths if 0 < s < math.inf})
    logs = [math.log10(s) for s in finite] or [0.0]
    place = {s: math.log10(s) for s in finite}
    place[0.0] = min(logs) - 1
    place[math.inf] = max(logs) + 1
    return {s: place[s] for s in strengths}


def lambda_label(strength: float) -> str:
    """Tick label of λ: 0, ∞, $10^{k}$ for powers of ten, else %g."""
    if strength == 0 or math.isinf(strength):
        return format_strength(strength)
    k = math.log10(strength)
    return f"$10^{{{round(k)}}}$" if abs(k - round(k)) < 1e-9 else f"{strength:g}"


def draw_ablation(ax, curves: Sequence[tuple[str, list[tuple[float, float]], dict]],
                  hlines: Sequence[tuple[str, float, dict]] = (),
                  marks: Sequence[tuple[str, float, float, dict]] = ()) -> None:
    """Test accuracy (%) against anchor strength λ on `ax`, λ placed by `lambda_positions`.

    curves: (label, [(λ, accuracy %)], plot style); hlines: (label, accuracy %, style), e.g. GPTQ;
    marks: (label, λ, accuracy %, style), e.g. the setting E-PMQ chose.
    """
    strengths = sorted({s for _, points, _ in curves for s, _ in points} | {s for _, s, _, _ in marks})
    x = lambda_positions(strengths)
    for label, points, style in curves:
        ax.plot([x[s] for s, _ in points], [a for _, a in points], label=label, **style)
    for label, value, style in hlines:
        ax.axhline(value, label=label, **{"linestyle": ":", "linewidth": 1, **style})
    for label, s, value, style in marks:
        ax.plot([x[s]], [value], linestyle="none", label=label,
                **{"marker": "*", "markersize": 13, "markeredgecolor": "black", **style})
    # label 0, ∞ and the decades; other strengths get unlabelled minor ticks (labels would collide)
    major = [s for s in strengths if s == 0 or math.isinf(s) or "10^" in lambda_label(s)]
    ax.set_xticks([x[s] for s in major], [lambda_label(s) for s in major], fontsize=8)
    ax.set_xticks([x[s] for s in strengths if s not in major], minor=True)
    ax.set_xlabel("anchor strength λ")
    ax.grid(alpha=0.3)


def plot_ablation(results: dict, path: str | Path) -> Path | None:
    """Test average accuracy against λ, one panel per bit width, one line per anchor form; GPTQ dotted,
    E-PMQ's chosen setting starred. Returns None (and writes nothing) when the ablation is empty."""
    validate(results)
    ablation = results.get("ablation") or []
    all_bits = sorted({e["bits"] for e in ablation})
    if not all_bits:
        return None
    fig, axes = panels(len(all_bits))
    for ax, bits in zip(axes, all_bits):
        curves = [(f"{form} anchor", [(s, 100 * a) for s, a in points],
                   dict(marker="o", color=FORM_COLORS.get(form)))
                  for form, points in ablation_curves([e for e in ablation if e["bits"] == bits]).items()]
        gptq = method_entry(results, "gptq", bits)
        hlines = [("GPTQ", 100 * gptq["test"]["avg"], dict(color=COLORS["gptq"]))] if gptq else []
        epmq = method_entry(results, "epmq", bits)
        marks = []
        if epmq and epmq.get("anchor"):
            anchor = epmq["anchor"]
            marks = [(f"E-PMQ chose {anchor['form']}, λ={format_strength(anchor['strength'])}",
                      parse_strength(anchor["strength"]), 100 * epmq["test"]["avg"],
                      dict(color=FORM_COLORS.get(anchor["form"], "gold")))]
        draw_ablation(ax, curves, hlines, marks)
        ax.set_title(f"{bits} bits")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("average test accuracy (%)")
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- everything

def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write results.md and plots/*.png into out_dir; returns {name: path} of the files written.

    Names: "markdown", "per_task_acc", "avg_acc_vs_bits" and, when the run has an ablation, "ablation"
    (otherwise a stale plots/ablation.png from an earlier report is removed).
    """
    validate(results)
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {
        "per_task_acc": plot_per_task(results, out_dir / PLOTS["per_task_acc"]),
        "avg_acc_vs_bits": plot_avg_vs_bits(results, out_dir / PLOTS["avg_acc_vs_bits"]),
    }
    ablation = plot_ablation(results, out_dir / PLOTS["ablation"])
    if ablation is None:
        (out_dir / PLOTS["ablation"]).unlink(missing_ok=True)
    else:
        paths["ablation"] = ablation
    figures = "\n\n".join(f"![{name}]({PLOTS[name]})" for name in PLOTS if name in paths)
    text = f"# Comparison: {results['merge']['label']}\n\n{markdown_table(results)}\n## Plots\n\n{figures}\n"
    paths["markdown"] = write_text_atomic(out_dir / "results.md", text)
    return paths
