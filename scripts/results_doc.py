"""Results document from comparison runs: mean ± std over seeds, figures, and the paper's numbers quoted.

    python scripts/results_doc.py logs/compare/multiruns/<date> [more folders or results.json ...] \
        --command "python train.py -m experiment=compare seed=0,1,2" [--command ...] \
        [--out docs/RESULTS.md] [--figures docs/figures] [--notes docs/results_notes.md]

Reads every results.json below the given folders (written by `train.py experiment=compare`), groups the
runs by (merge label, bits, method) and writes the markdown document plus figures/ablation.png and
figures/avg_acc_vs_bits.png. Every run must come from the same suite (same fingerprint) and each
(merge, seed) may appear once; otherwise it stops and names the files at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from epmq.compare_report import (DISPLAY, METHODS, REFERENCES, ablation_curves, draw_ablation,
                                 draw_avg_vs_bits, format_strength, markdown_header, markdown_row,
                                 panels, save_figure, validate, write_text_atomic)

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
    """Per-seed numbers of one merge, in percent (accuracy) and seconds.

    references: reference name -> [avg acc]; methods: (bits, method) -> [avg acc]; seconds likewise;
    anchors: bits -> ["form/λ" chosen by E-PMQ]; ablation: (bits, form, λ) -> [test avg acc].
    """

    seeds: list = field(default_factory=list)
    references: dict = field(default_factory=lambda: defaultdict(list))
    methods: dict = field(default_factory=lambda: defaultdict(list))
    seconds: dict = field(default_factory=lambda: defaultdict(list))
    anchors: dict = field(default_factory=lambda: defaultdict(list))
    ablation: dict = field(default_factory=lambda: defaultdict(list))

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


def load_runs(files: list[Path]) -> list[dict]:
    """Read and check every file: valid schema, one suite fingerprint, each (merge, seed) once."""
    runs, by_fingerprint, by_seed = [], defaultdict(list), defaultdict(list)
    for path in files:
        try:
            results = json.loads(path.read_text())
            validate(results)
        except (ValueError, KeyError) as err:
            raise SystemExit(f"results_doc: {path}: {err}") from None
        runs.append(results)
        suite = results.get("suite", {})
        by_fingerprint[(suite.get("fingerprint"), suite.get("weights_sha256"))].append(path)
        by_seed[(results["merge"]["label"], results.get("seed"))].append(path)
    if len(by_fingerprint) > 1:
        listing = "; ".join(f"{fp}: {', '.join(map(str, ps))}" for fp, ps in by_fingerprint.items())
        raise SystemExit(f"results_doc: the files disagree on the suite (fingerprint, weights) ({listing})")
    for (label, seed), paths in by_seed.items():
        if len(paths) > 1:
            raise SystemExit(f"results_doc: merge {label!r} seed {seed} appears {len(paths)} times: "
                             f"{', '.join(map(str, paths))}; pass only one run per seed")
    return runs


def summarize(runs: list[dict]) -> dict[str, MergeRuns]:
    """merge label -> its per-seed numbers (labels sorted)."""
    merges: dict[str, MergeRuns] = defaultdict(MergeRuns)
    for results in runs:
        merge = merges[results["merge"]["label"]]
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
    return dict(sorted(merges.items()))


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


def weights_sentence(suite: dict) -> str:
    """Which weights the runs used: the zoo's weights hash (epmq.offline.zoo.weights_sha256)."""
    sha = suite.get("weights_sha256")
    if not sha:
        return "built before zoos recorded a hash of their weights (the runs cannot say which weights they used)."
    return (f"weights sha256 `{sha}` (a zoo's `weights_sha256` in its zoo.json, checked by "
            f"`epmq.offline.zoo.open_zoo(root).verify_weights()`; the build is deterministic, so "
            f"`python train.py` on a fresh machine builds these same weights).")


def header_section(runs: list[dict], merges: dict[str, MergeRuns], commands: list[str],
                   doc_command: str) -> str:
    """How the document was produced: commands, run and seed counts, suite fingerprint, date."""
    suite = runs[0].get("suite", {})
    produced = "\n".join(f"    {c}" for c in commands) if commands else "    (not given: pass --command)"
    seeds = "; ".join(f"{label}: {len(m.seeds)} seed{'s' if len(m.seeds) > 1 else ''} ({', '.join(map(str, sorted(m.seeds, key=str)))})"
                      for label, m in merges.items())
    return "\n".join([
        "# Results", "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `{doc_command}` from "
        f"{len(runs)} results.json file{'s' if len(runs) > 1 else ''}. Runs: {seeds}.", "",
        f"Suite `{suite.get('name', '?')}` (tasks: {', '.join(runs[0]['tasks'])}), fingerprint "
        f"`{suite.get('fingerprint', '?')}`, " + weights_sentence(suite) + " All numbers below are the "
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
                  "### Quantized", merge_table(merge)]
    parts += ["## Where E-PMQ stands", comparison_section(merges)]
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

def plot_avg_vs_bits(merges: dict[str, MergeRuns], path: Path) -> Path:
    """Mean ± std of average accuracy against bits, one panel per merge, FP references dashed."""
    fig, axes = panels(len(merges), width=5.5)
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
    """Mean test accuracy against λ, one panel per merge, a line per (form, bits), GPTQ dotted per bits."""
    with_ablation = {label: m for label, m in merges.items() if m.ablation}
    if not with_ablation:
        return None
    fig, axes = panels(len(with_ablation), width=5.5)
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
