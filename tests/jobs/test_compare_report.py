"""Tables, plots and the results document built from synthetic results.json dicts (schema in
epmq/jobs/compare_report.py) with known accuracies per seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from epmq.core.anchor import parse_strength
from epmq.jobs.compare_report import ablation_curves, lambda_positions, markdown_table, plot_ablation, write_report

from helpers.config import load_results_doc

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["mnist", "digits"]
LABEL = "task arithmetic (λ=0.3)"
STRENGTHS = [0.0, 0.1, 1.0, 10.0, 1e4]


results_doc = load_results_doc()


def test_accs(avg: float) -> dict:
    """Per-task accuracies spread ±0.02 around `avg`, and their average."""
    return {"mnist": avg + 0.02, "digits": avg - 0.02, "avg": avg}


test_accs.__test__ = False  # a helper, not a test


def make_results(seed: int, avgs: dict[tuple[str, int], float], label: str = LABEL,
                 fingerprint: str = "fp-a", ablation: bool = True) -> dict:
    """A results.json dict; avgs: (method, bits) -> test avg accuracy (fraction)."""
    all_bits = sorted({b for _, b in avgs})
    methods = [{"method": m, "bits": b, "test": test_accs(a), "seconds": 1.0 + b,
                "layer_loss": None, "rtn_layer_loss": None,
                "anchor": {"strength": 1.0, "form": "output"} if m == "epmq" else None}
               for (m, b), a in avgs.items()]
    entries = []
    if ablation:
        for b in all_bits:
            for form in ("output", "weight"):
                entries += [{"bits": b, "form": form, "strength": s, "select_avg_acc": 0.7,
                             "test": test_accs(0.6 + 0.01 * k + (0.005 if form == "weight" else 0)),
                             "seconds": 1.0} for k, s in enumerate(STRENGTHS)]
            entries.append({"bits": b, "form": "output", "strength": "inf", "select_avg_acc": 0.7,
                            "test": test_accs(avgs.get(("gptq", b), 0.6)), "seconds": 1.0})
    return {
        "suite": {"name": "offline", "root": "/tmp/zoo", "tasks": TASKS, "fingerprint": fingerprint},
        "tasks": TASKS, "merge": {"name": "task_arithmetic", "label": label, "config": {}},
        "seed": seed, "bits": all_bits, "group_size": 128,
        "references": {"experts": {"test": test_accs(0.90)}, "merged": {"test": test_accs(0.72)},
                       "regmean": {"test": test_accs(0.80), "seconds": 3.0}},
        "methods": methods, "ablation": entries,
        "timings": {"total_s": 10.0}, "config": {},
    }


def seed_runs(gptq_2: list[float], epmq_2: list[float], label: str = LABEL) -> list[dict]:
    """Three seeds at 2 and 4 bits: given GPTQ / E-PMQ 2-bit accuracies; at 4 bits E-PMQ leads."""
    runs = []
    for seed, (g2, e2) in enumerate(zip(gptq_2, epmq_2)):
        avgs = {("rtn", 2): 0.50, ("gptq", 2): g2, ("regmean_gptq", 2): 0.60, ("epmq", 2): e2,
                ("rtn", 4): 0.70, ("gptq", 4): 0.71, ("regmean_gptq", 4): 0.69, ("epmq", 4): 0.75 + 0.01 * seed}
        runs.append(make_results(seed, avgs, label=label))
    return runs


def mean_std_text(fractions: list[float]) -> str:
    """'mean ± sample std' in percent, computed here from the definitions."""
    xs = [100 * f for f in fractions]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def write_runs(root: Path, runs: list[dict]) -> None:
    for i, results in enumerate(runs):
        folder = root / f"run{i}" / "nested"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, path


# ----------------------------------------------------------------------------- one run

def test_strengths_and_positions():
    assert parse_strength("inf") == math.inf and parse_strength(0) == 0.0
    with pytest.raises(ValueError, match="strength"):
        parse_strength("big")
    x = lambda_positions([math.inf, 1e4, 0.0, 0.1, 1.0])
    order = sorted(x, key=x.get)
    assert order == [0.0, 0.1, 1.0, 1e4, math.inf]
    # ∞ is listed once (form "output") but ends the weight form's curve too
    curves = ablation_curves(make_results(0, {("gptq", 4): 0.71})["ablation"])
    assert curves["weight"][-1] == curves["output"][-1] == (math.inf, 0.71)
    assert [s for s, _ in curves["weight"]] == [*STRENGTHS, math.inf]


def test_markdown_table_one_run():
    avgs = {("rtn", 3): 0.60, ("gptq", 3): 0.70, ("regmean_gptq", 3): 0.66, ("epmq", 3): 0.74,
            ("rtn", 4): 0.70, ("gptq", 4): 0.73, ("regmean_gptq", 4): 0.68, ("epmq", 4): 0.72}
    text = markdown_table(make_results(0, avgs))
    for name in ("RTN", "GPTQ", "RegMean → GPTQ", "E-PMQ", "experts", "FP merged", "FP RegMean"):
        assert f"| {name} |" in text
    assert "**74.00**" in text and "**73.00**" in text  # E-PMQ best at 3 bits, GPTQ at 4
    assert "**72.00**" not in text.split("### 4 bits")[1]
    assert "| 1, output |" in text
    assert "92.00" in text and "88.00" in text  # experts' per-task accuracies
    with pytest.raises(ValueError, match="merge.label"):
        markdown_table({**make_results(0, avgs), "merge": {"name": "x"}})


def test_write_report_full_run(tmp_path):
    avgs = {(m, b): 0.6 + 0.02 * i + 0.01 * b for i, m in enumerate(["rtn", "gptq", "regmean_gptq", "epmq"])
            for b in (2, 3, 4)}
    paths = write_report(make_results(0, avgs), tmp_path)
    assert set(paths) == {"markdown", "per_task_acc", "avg_acc_vs_bits", "ablation"}
    for name in ("per_task_acc", "avg_acc_vs_bits", "ablation"):
        assert_png(paths[name])
    text = paths["markdown"].read_text()
    assert "plots/ablation.png" in text and "### 2 bits" in text
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind
    assert paths["markdown"].stat().st_mode & 0o044 == 0o044  # readable by others, not mkstemp's 0600


def test_missing_method_one_bit_width_empty_ablation(tmp_path):
    results = make_results(0, {("rtn", 4): 0.7, ("gptq", 4): 0.72, ("epmq", 4): 0.71}, ablation=False)
    results["methods"][-1]["anchor"]["strength"] = "inf"
    assert plot_ablation(results, tmp_path / "a.png") is None
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "ablation.png").write_bytes(b"stale")
    paths = write_report(results, tmp_path)
    assert "ablation" not in paths and not (tmp_path / "plots" / "ablation.png").exists()
    assert_png(paths["per_task_acc"])
    text = paths["markdown"].read_text()
    assert "RegMean → GPTQ" not in text and "| ∞, output |" in text and "**72.00**" in text


# ----------------------------------------------------------------------------- the document

def test_document_mean_std_bold_and_below(tmp_path):
    gptq_2, epmq_2 = [0.70, 0.71, 0.73], [0.66, 0.69, 0.70]
    write_runs(tmp_path / "runs", seed_runs(gptq_2, epmq_2))
    out = tmp_path / "docs" / "RESULTS.md"
    notes = tmp_path / "notes.md"
    notes.write_text("## Why\n\nThe reading of the numbers.\n")
    results_doc.main([str(tmp_path / "runs"), "--out", str(out), "--figures", str(tmp_path / "docs" / "figures"),
                      "--command", "python train.py -m experiment=compare seed=0,1,2", "--notes", str(notes)])
    text = out.read_text()
    assert text.index("## Where E-PMQ stands") < text.index("The reading of the numbers.") < \
        text.index("## External reference")
    for name in ("RTN", "GPTQ", "RegMean → GPTQ", "E-PMQ"):
        assert f"| {name} |" in text
    assert f"**{mean_std_text(gptq_2)}**" in text  # GPTQ best at 2 bits
    assert f"| {mean_std_text(epmq_2)} |" in text
    assert f"**{mean_std_text([0.75, 0.76, 0.77])}**" in text  # E-PMQ best at 4 bits
    gap = 100 * (sum(gptq_2) - sum(epmq_2)) / 3
    assert f"E-PMQ is below GPTQ by {gap:.2f} points at 2 bits on {LABEL}." in text
    assert text.count("E-PMQ is below") == 1  # not below RTN or RegMean → GPTQ, nor anything at 4 bits
    assert "python train.py -m experiment=compare seed=0,1,2" in text and "fp-a" in text
    assert "3 seeds" in text and "quoted from the paper" in text and "65.0" in text and "82.4" in text
    assert "](figures/ablation.png)" in text and "](figures/avg_acc_vs_bits.png)" in text
    assert_png(tmp_path / "docs" / "figures" / "ablation.png")
    assert_png(tmp_path / "docs" / "figures" / "avg_acc_vs_bits.png")
    # the ablation table: mean test accuracy at λ = 0 for the weight form (0.605 every seed)
    assert "| 0 | 60.00 | 60.50 | 60.00 | 60.50 |" in text


def test_document_at_or_above_and_two_merges(tmp_path):
    runs = seed_runs([0.70, 0.71, 0.72], [0.73, 0.74, 0.74])
    runs += [make_results(0, {("gptq", 4): 0.6, ("epmq", 4): 0.6}, label="TIES", ablation=False)]
    write_runs(tmp_path, runs)
    out = results_doc.main([str(tmp_path), "--out", str(tmp_path / "R.md"), "--figures", str(tmp_path / "f")])
    text = out.read_text()
    assert "is below" not in text and "at or above every other quantized method" in text
    assert "## TIES" in text and f"## {LABEL}" in text


def test_document_errors(tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        results_doc.main([str(tmp_path), "--out", str(tmp_path / "R.md")])
    a, b = make_results(0, {("gptq", 4): 0.7}), make_results(1, {("gptq", 4): 0.7}, fingerprint="fp-b")
    a["config"] = b["config"] = {"suite": {"seed": 0}}  # two zoos claiming the same suite seed
    write_runs(tmp_path, [a, b])
    with pytest.raises(SystemExit, match=r"suite seed 0.*fp-a.*run0.*fp-b.*run1"):
        results_doc.main([str(tmp_path), "--out", str(tmp_path / "R.md"), "--figures", str(tmp_path / "f")])
    assert not (tmp_path / "R.md").exists()
