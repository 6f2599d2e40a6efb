"""scripts/results_doc.py on runs from two zoos with calibration-ingredient rows: sections per (zoo, merge),
per-seed margins, the ingredient tables and their summary, each number recomputed here from the inputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from helpers.config import load_results_doc

ROOT = Path(__file__).resolve().parents[2]
LABEL = "task arithmetic (λ=0.3)"
CONFIGURED = {"normalize": False, "interp": 1.0, "extrapolate": 1.0, "calibrate_bias": False}
ZOOS = {0: ("f0" * 32, "a0" * 32), 1: ("f1" * 32, "a1" * 32)}  # suite seed -> (fingerprint, weights)
# E-PMQ's anchor per bit width; at 4 bits λ = 0 with the weight form, listed in the ablation only once
# (form output), as λ = 0 does not depend on the form
ANCHORS = {2: (10.0, "output"), 4: (0.0, "weight")}
# ingredient name -> (changed options, test change in fraction, selection NLL change), per bits below
# (values chosen so that no mean lands on a rounding tie)
INGREDIENTS = {"calibrate_bias": ({"calibrate_bias": True}, 0.012345, -0.003137),
               "interp": ({"interp": 0.25}, -0.007531, 0.004213)}


results_doc = load_results_doc()


def gptq_avg(zoo: int, seed: int, bits: int) -> float:
    return 0.60 + 0.05 * bits + 0.01 * seed - 0.02 * zoo


def epmq_avg(zoo: int, seed: int, bits: int) -> float:
    return gptq_avg(zoo, seed, bits) + 0.0125 * (1 + seed + bits + zoo)


def anchor_nll(zoo: int, seed: int, bits: int) -> float:
    return 0.50 + 0.01 * bits + 0.001 * seed + 0.1 * zoo


def ingredient_scale(zoo: int, seed: int, bits: int) -> float:
    """Makes the ingredients' changes differ per (zoo, seed, bits), so means are over distinct numbers."""
    return 1 + 0.5 * seed + 0.25 * bits + zoo


def run(zoo: int | None, seed: int, calibrated: float | None = None, ingredients: bool = True,
        zoo_id: int = 0) -> dict:
    """A results.json dict on zoo `zoo_id` (its config records suite seed `zoo`, or none when None)."""
    z = zoo_id if zoo is None else zoo
    methods, ablation, rows = [], [], []
    for bits, (strength, form) in ANCHORS.items():
        methods += [{"method": "gptq", "bits": bits, "test": {"avg": gptq_avg(z, seed, bits)}, "seconds": 1.0,
                     "anchor": None},
                    {"method": "epmq", "bits": bits, "test": {"avg": epmq_avg(z, seed, bits)}, "seconds": 9.0,
                     "anchor": {"strength": strength, "form": form}}]
        # distractors at other (strength, form) with other NLLs, then the anchor's row
        for s, f, nll in ((strength, "weight", 9.0), (1.0, "output", 7.0), ("inf", "output", 8.0),
                          (strength, "output", anchor_nll(z, seed, bits))):
            if (s, f) != (0.0, "weight"):
                ablation.append({"bits": bits, "form": f, "strength": s, "select_avg_acc": 0.7,
                                 "select_avg_nll": nll, "test": {"avg": 0.5}})
        for name, (change, dtest, dnll) in INGREDIENTS.items():
            k = ingredient_scale(z, seed, bits)
            rows.append({"name": name, "options": {**CONFIGURED, **change}, "bits": bits, "strength": strength,
                         "form": form, "select_avg_acc": 0.7, "select_avg_nll": anchor_nll(z, seed, bits) + k * dnll,
                         "test": {"avg": epmq_avg(z, seed, bits) + k * dtest}})
    references = {"experts": {"test": {"avg": 0.90}}, "merged": {"test": {"avg": 0.70}}}
    if calibrated is not None:
        references["calibrated"] = {"test": {"avg": calibrated}, "strength": 10.0, "form": "output"}
    fingerprint, weights = ZOOS[z]
    results = {"suite": {"name": "offline", "fingerprint": fingerprint, "weights_sha256": weights},
               "tasks": ["a", "b"], "merge": {"name": "task_arithmetic", "label": LABEL, "config": {}},
               "seed": seed, "bits": sorted(ANCHORS), "group_size": 128, "references": references,
               "methods": methods, "ablation": ablation,
               "config": {"suite": {"seed": zoo}, "quant": dict(CONFIGURED)}}
    if ingredients:
        results["ingredients"] = rows
    return results


def write(root: Path, runs: list[dict]) -> None:
    for i, results in enumerate(runs):
        (root / f"run{i}").mkdir(parents=True)
        (root / f"run{i}" / "results.json").write_text(json.dumps(results))


def document(tmp_path: Path, runs: list[dict]) -> str:
    write(tmp_path / "runs", runs)
    out = results_doc.main([str(tmp_path / "runs"), "--out", str(tmp_path / "R.md"), "--figures",
                            str(tmp_path / "figures")])
    return out.read_text()


def section(text: str, heading: str) -> str:
    """The text from `heading` up to the next section of the same or a higher level."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    ends = [i for i in (text.find("\n## ", start + 1), text.find(f"\n{level} ", start + 1)) if i > 0]
    return text[start:min(ends)] if ends else text[start:]


SEEDS = (0, 1, 2)
CALIBRATED = {0: 0.85, 1: 0.80, 2: 0.83}  # zoo 1's FP calibrated merge per seed (zoo 0's runs have none)


@pytest.fixture
def two_zoos(tmp_path) -> str:
    # zoo seed 1's runs come first on disk: the sections still follow the suite seed
    runs = [run(1, s, calibrated=CALIBRATED[s]) for s in SEEDS] + [run(0, s) for s in SEEDS]
    return document(tmp_path, runs)


def test_two_zoos_sections_header_and_figures(two_zoos, tmp_path):
    text = two_zoos
    zoo0, zoo1 = f"## {LABEL} · zoo seed 0", f"## {LABEL} · zoo seed 1"
    assert text.index(zoo0) < text.index(zoo1) < text.index("## Where E-PMQ stands")
    for fingerprint, weights in ZOOS.values():
        assert f"`{fingerprint}`" in text.split("## ")[0] and f"`{weights}`" in text.split("## ")[0]
    assert f"{LABEL} · zoo seed 0: 3 seeds (0, 1, 2)" in text
    # each zoo's own numbers: zoo 1's GPTQ at 2 bits is 2 points below zoo 0's
    for zoo in (0, 1):
        gptq = [100 * gptq_avg(zoo, s, 2) for s in SEEDS]
        quantized = section(text, f"## {LABEL} · zoo seed {zoo}")
        assert f"| 2 | GPTQ | {statistics.mean(gptq):.2f} ± {statistics.stdev(gptq):.2f} |" in quantized
    for name in ("avg_acc_vs_bits", "ablation"):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_per_seed_margins_and_gap_recovered(two_zoos):
    for zoo in (0, 1):
        margins = section(section(two_zoos, f"## {LABEL} · zoo seed {zoo}"), "### Per-seed margins")
        assert "per seed (0, 1, 2)" in margins
        for bits in ANCHORS:
            diffs = [100 * (epmq_avg(zoo, s, bits) - gptq_avg(zoo, s, bits)) for s in SEEDS]
            cells = ", ".join(f"{d:+.2f}" for d in diffs)
            assert f"| E-PMQ − GPTQ, {bits} bits (points) | {cells} | {statistics.mean(diffs):+.2f} |" in margins
        recovered = [100 * (CALIBRATED[s] - 0.70) / (0.90 - 0.70) for s in SEEDS]
        expected = (f"{', '.join(f'{r:.1f}' for r in recovered)} | {statistics.mean(recovered):.1f}" if zoo == 1
                    else "-, -, - | -")  # zoo 0's runs hold no calibrated merge, as old files
        assert f"| FP calibrated merge: gap recovered (%) | {expected} |" in margins
    # by hand, zoo 0 at 2 bits: 1.25 × (1 + seed + 2) points
    assert "| E-PMQ − GPTQ, 2 bits (points) | +3.75, +5.00, +6.25 | +5.00 |" in two_zoos
    assert "| FP calibrated merge: gap recovered (%) | 75.0, 50.0, 65.0 | 63.3 |" in two_zoos


def ingredient_means(zoo: int, name: str, bits: int) -> tuple[float, float]:
    """Mean over seeds of (row − E-PMQ) test avg in points and of (row − anchor's ablation row) NLL."""
    _, dtest, dnll = INGREDIENTS[name]
    scales = [ingredient_scale(zoo, s, bits) for s in SEEDS]
    return statistics.mean(100 * k * dtest for k in scales), statistics.mean(k * dnll for k in scales)


def test_ingredient_tables(two_zoos):
    for zoo in (0, 1):
        table = section(section(two_zoos, f"## {LABEL} · zoo seed {zoo}"),
                        "### E-PMQ's calibration ingredients (one at a time)")
        assert "| ingredient (changes) | 2 bits | 4 bits |" in table
        for name, (change, _, _) in INGREDIENTS.items():
            options = ", ".join(f"{k}={json.dumps(v)}" for k, v in change.items())  # only what the row changes
            cells = " | ".join("{:+.2f} / {:+.4f}".format(*ingredient_means(zoo, name, b)) for b in ANCHORS)
            assert f"| {name} ({options}) | {cells} |" in table
    # by hand, zoo 0 at 2 bits: mean scale 2.0, so +1.2345 × 2 points and -0.003137 × 2
    assert "| calibrate_bias (calibrate_bias=true) | +2.47 / -0.0063 |" in two_zoos


def test_ingredient_summary_over_settings(two_zoos):
    summary = section(two_zoos, "## Calibration ingredients over all settings")
    for name in INGREDIENTS:
        settings = [ingredient_means(zoo, name, b) for zoo in (0, 1) for b in ANCHORS]
        better = sum(n < 0 for _, n in settings)
        assert (f"{name} {statistics.mean(t for t, _ in settings):+.2f} test / "
                f"{statistics.mean(n for _, n in settings):+.4f} NLL, selection NLL better in {better} of 4") in summary
    assert "better in 4 of 4" in summary and "better in 0 of 4" in summary


def test_one_zoo_reads_as_before_and_old_files(tmp_path):
    text = document(tmp_path, [run(0, s, ingredients=False) for s in SEEDS])
    assert f"## {LABEL}\n" in text and "zoo seed" not in text
    assert f"fingerprint `{ZOOS[0][0]}`, weights sha256 `{ZOOS[0][1]}`" in text
    assert "calibration ingredients" not in text.lower()
    assert "| FP calibrated merge: gap recovered (%) | -, -, - | - |" in text


def test_zoos_without_a_recorded_seed_are_named_by_fingerprint(tmp_path):
    text = document(tmp_path, [run(None, 0, zoo_id=0), run(None, 0, zoo_id=1)])
    assert f"## {LABEL} · zoo {ZOOS[0][0][:8]}" in text and f"## {LABEL} · zoo {ZOOS[1][0][:8]}" in text


def test_refusals(tmp_path):
    elsewhere = ["--out", str(tmp_path / "R.md"), "--figures", str(tmp_path / "f")]  # never docs/ on a regression
    write(tmp_path / "twice", [run(0, 1), run(1, 1), run(0, 1)])
    with pytest.raises(SystemExit, match=r"seed 1 on zoo f0f0.* appears 2 times.*run0.*run2"):
        results_doc.main([str(tmp_path / "twice"), *elsewhere])
    claimed = run(0, 1)
    claimed["config"]["suite"]["seed"] = 1  # zoo 0's fingerprint, but claiming suite seed 1
    write(tmp_path / "claims", [run(1, 0), claimed])
    with pytest.raises(SystemExit, match=r"2 different zoos claim suite seed 1.*f1f1.*run0.*f0f0.*run1"):
        results_doc.main([str(tmp_path / "claims"), *elsewhere])
    bad = run(0, 0)
    bad["ingredients"][0]["bits"] = 3  # no E-PMQ entry at 3 bits to compare with
    write(tmp_path / "bad", [bad])
    with pytest.raises(SystemExit, match=r"ingredients\[0\].*3 bits.*no E-PMQ"):
        results_doc.main([str(tmp_path / "bad"), *elsewhere])
    assert not (tmp_path / "R.md").exists()


# ----------------------------------------------------------------------------- design rules on held-out halves

HALVES_HEADING = "## Design choices, judged on held-out selection samples"
CANDIDATES = [0.0, 1.0, 3.0, 10.0, "inf"]  # the runs' anchor.candidates.strength (form: output)
# half-A scores per ablation row (λ, form): (A-NLL, A-acc). λ = 0 and ∞ are listed once (form output).
A_SCORES = {(0.0, "output"): (0.60, 0.50), (0.3, "output"): (0.55, 0.50), (1.0, "output"): (0.66, 0.80),
            (3.0, "output"): (0.60, 0.70), (10.0, "output"): (0.70, 0.80), (100.0, "output"): (0.95, 0.50),
            ("inf", "output"): (0.62, 0.60), (0.3, "weight"): (0.99, 0.50), (1.0, "weight"): (0.40, 0.50),
            (3.0, "weight"): (0.99, 0.50), (10.0, "weight"): (0.99, 0.50), (100.0, "weight"): (0.99, 0.50)}
# which row each rule picks on A, by hand:
#   candidates {0, 1, 3, 10, ∞} by NLL: 0 and 3 tie at 0.60 -> the stronger, 3
#   candidates by accuracy: 1 and 10 tie at 0.80 -> the lower A-NLL, 1 (not the stronger, 10)
#   every row, both forms: weight/1 (0.40); coarse {1, 10, ∞}: ∞ (0.62); {0.3, 1, 3, 10, ∞}: 0.3 (0.55)
#   {1, 10}: 1 (0.66); {1, ∞}: ∞ (0.62); {3, ∞}: 3 (0.60)
DEFAULT = "default: candidates grid, by NLL"
PICKS = {DEFAULT: (5, 3.0, "output"),  # rule -> (calibrations it costs, λ, form it picks)
         "candidates grid, by accuracy": (5, 1.0, "output"),
         "ablation grid, by NLL": (12, 1.0, "weight"),
         "coarse grid {1, 10, ∞}, by NLL": (3, "inf", "output"),
         "grid {0.3, 1, 3, 10, ∞}, by NLL": (5, 0.3, "output"),
         "grid {1, 10}, by NLL": (2, 1.0, "output"), "grid {1, ∞}, by NLL": (2, "inf", "output"),
         "grid {3, ∞}, by NLL": (2, 3.0, "output"),
         "fixed λ = 1": (1, 1.0, "output"), "fixed λ = 3": (1, 3.0, "output"), "fixed λ = 10": (1, 10.0, "output"),
         "GPTQ (λ = ∞)": (1, "inf", "output")}
HALF_SEEDS, HALF_BITS = (0, 1), (2, 4)
E_ANCHOR = (3.0, "output")  # E-PMQ's anchor (chosen on A ∪ B in the main job; set here)
# ingredient -> (its change, Δ B-acc and Δ B-NLL per unit of the setting's scale 1 + seed + bits)
HALF_INGREDIENTS = {"calibrate_bias": ({"calibrate_bias": True}, 0.004, -0.002),
                    "interp": ({"interp": 0.25}, -0.003, 0.001)}


def b_scores(strength, form: str, seed: int, bits: int) -> tuple[float, float, float]:
    """(half-B accuracy, half-B NLL, test accuracy) of a row: each row its own level, shifted per setting; the
    {0.3, ...} grid's pick (0.3) beats the default's pick (3) on B-accuracy only at seed 0."""
    level = list(A_SCORES).index((strength, form))
    acc = 0.60 + 0.011 * level + 0.013 * seed + 0.007 * bits
    if (strength, form) == (0.3, "output"):
        acc = b_scores(3.0, "output", seed, bits)[0] + (0.005 if seed == 0 else -0.005)
    return acc, 0.90 - 0.017 * level + 0.003 * seed + 0.002 * bits, 0.55 + 0.009 * level + 0.004 * bits


def halves_run(seed: int, halves: bool = True, drop: tuple | None = None) -> dict:
    """A results.json dict whose ablation rows hold half scores (none when not `halves`; the row `drop` =
    (bits, λ, form) left out), with ingredient rows at E-PMQ's anchor."""
    methods, ablation, ingredients = [], [], []
    for bits in HALF_BITS:
        methods += [{"method": "gptq", "bits": bits, "test": {"avg": 0.6}},
                    {"method": "epmq", "bits": bits, "test": {"avg": 0.7},
                     "anchor": {"strength": E_ANCHOR[0], "form": E_ANCHOR[1]}}]
        for (strength, form), (a_nll, a_acc) in A_SCORES.items():
            if drop == (bits, strength, form):
                continue
            b_acc, b_nll, test = b_scores(strength, form, seed, bits)
            row = {"bits": bits, "form": form, "strength": strength, "select_avg_acc": 0.5, "select_avg_nll": 1.0,
                   "test": {"avg": test}}
            if halves:
                row.update(select_a_avg_acc=a_acc, select_a_avg_nll=a_nll, select_b_avg_acc=b_acc,
                           select_b_avg_nll=b_nll)
            ablation.append(row)
        b_acc, b_nll, _ = b_scores(*E_ANCHOR, seed, bits)
        for name, (change, dacc, dnll) in HALF_INGREDIENTS.items():
            k = 1 + seed + bits
            row = {"name": name, "options": {**CONFIGURED, **change}, "bits": bits, "strength": E_ANCHOR[0],
                   "form": E_ANCHOR[1], "select_avg_acc": 0.5, "select_avg_nll": 1.0, "test": {"avg": 0.7}}
            if halves:
                row.update(select_a_avg_acc=0.5, select_a_avg_nll=1.0, select_b_avg_acc=b_acc + k * dacc,
                           select_b_avg_nll=b_nll + k * dnll)
            ingredients.append(row)
    return {"suite": {"name": "offline", "fingerprint": ZOOS[0][0], "weights_sha256": ZOOS[0][1]},
            "tasks": ["a", "b"], "merge": {"name": "task_arithmetic", "label": LABEL, "config": {}}, "seed": seed,
            "bits": list(HALF_BITS), "group_size": 128, "references": {"merged": {"test": {"avg": 0.5}}},
            "methods": methods, "ablation": ablation, "ingredients": ingredients,
            "config": {"suite": {"seed": 0},
                       "quant": {**CONFIGURED, "candidates": {"strength": CANDIDATES, "form": ["output"]}}}}


def rule_line(label: str, settings: list[tuple[int, int]], judged: list[tuple[int, int]] | None = None) -> str:
    """The table row expected for `label` over (seed, bits) settings, from the hand-stated picks; its B-acc wins
    against the default count over the settings also in `judged` (where the default applies; default: all)."""
    cost, strength, form = PICKS[label]
    scores = [b_scores(strength, form, s, b) for s, b in settings]
    versus = [(b_scores(strength, form, s, b)[0], b_scores(*PICKS[DEFAULT][1:], s, b)[0])
              for s, b in settings if (s, b) in (settings if judged is None else judged)]
    wins = "-" if label == DEFAULT else f"{sum(x > d for x, d in versus)}/{len(versus)}"
    return (f"| {label} | {cost} | {len(settings)} | {statistics.mean(100 * x[0] for x in scores):.2f} | "
            f"{statistics.mean(x[1] for x in scores):.4f} | {statistics.mean(100 * x[2] for x in scores):.2f} | "
            f"{wins} |")


def test_design_rules_on_held_out_halves(tmp_path):
    # an old run (no half scores) among them is left out of the section, not of the document
    text = document(tmp_path, [halves_run(0), halves_run(1), halves_run(2, halves=False)])
    part = section(text, HALVES_HEADING)
    assert "(4 settings from 2 runs;" in part and "not used for choosing" in part
    settings = [(s, b) for s in HALF_SEEDS for b in HALF_BITS]
    for label in PICKS:
        assert rule_line(label, settings) in part, label
    # by hand: the default picks λ = 3 (level 3): B accuracy 0.60 + 0.033 + mean(0.013 seed) + mean(0.007 bits);
    # the {0.3, ...} grid's pick beats it on B at seed 0 only (2 of 4), the same row (fixed λ = 3) never does
    assert f"| {DEFAULT} | 5 | 4 | {100 * (0.60 + 0.033 + 0.0065 + 0.021):.2f} | 0.8565 | 58.90 | - |" in part
    assert "| grid {0.3, 1, 3, 10, ∞}, by NLL | 5 | 4 | 66.05 | 0.8905 | 57.10 | 2/4 |" in part
    assert "| fixed λ = 3 | 1 | 4 | 66.05 | 0.8565 | 58.90 | 0/4 |" in part
    for name, (change, dacc, dnll) in HALF_INGREDIENTS.items():
        scales = [1 + s + b for s, b in settings]
        better = sum(k * dnll < 0 for k in scales)
        options = ", ".join(f"{k}={json.dumps(v)}" for k, v in change.items())
        assert (f"| {name} ({options}) | 4 | {statistics.mean(100 * k * dacc for k in scales):+.2f} | "
                f"{statistics.mean(k * dnll for k in scales):+.4f} | {better}/4 |") in part
    assert "| calibrate_bias (calibrate_bias=true) | 4 | +1.80 | -0.0090 | 4/4 |" in part  # scales 3, 5, 4, 6
    assert "(A ∪ B)" in part
    assert text.index("## Where E-PMQ stands") < text.index(HALVES_HEADING) < text.index("## External reference")


def test_design_rules_skip_where_a_row_is_missing(tmp_path):
    # seed 1 at 4 bits has no λ = 3 output row: the default (λ = 3 is a candidate), the accuracy rule on the
    # same candidates, the {0.3, ...} grid and fixed λ = 3 leave that setting out; the ablation grid chooses
    # among the 11 rows there are; every other rule's wins count over the 3 settings the default has
    text = document(tmp_path, [halves_run(0), halves_run(1, drop=(4, 3.0, "output"))])
    part = section(text, HALVES_HEADING)
    four, three = [(0, 2), (0, 4), (1, 2), (1, 4)], [(0, 2), (0, 4), (1, 2)]
    short = {DEFAULT, "candidates grid, by accuracy", "grid {0.3, 1, 3, 10, ∞}, by NLL", "fixed λ = 3",
             "grid {3, ∞}, by NLL"}
    for label in PICKS:
        expected = rule_line(label, three if label in short else four, judged=three)
        if label == "ablation grid, by NLL":
            expected = expected.replace("| 12 |", "| 11–12 |")
        assert expected in part, label


def test_old_files_render_without_the_held_out_section(tmp_path):
    text = document(tmp_path, [halves_run(s, halves=False) for s in HALF_SEEDS])
    assert HALVES_HEADING not in text and "half-B" not in text
    assert "## Where E-PMQ stands" in text and "### E-PMQ's calibration ingredients (one at a time)" in text
