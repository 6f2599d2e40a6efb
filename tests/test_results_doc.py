"""scripts/results_doc.py on runs from two zoos with calibration-ingredient rows: sections per (zoo, merge),
per-seed margins, the ingredient tables and their summary, each number recomputed here from the inputs."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def load_script():
    """scripts/results_doc.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


results_doc = load_script()


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
