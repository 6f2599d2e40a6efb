"""`experiment=compare` on the micro zoo: every method in one run, orderings that hold whatever the seed."""

from __future__ import annotations

import json
import math

import pytest

from epmq.jobs.compare import compare_plan
from epmq.jobs.run import run

from helpers.config import make_cfg
from helpers.wandb_files import wandb_finished, wandb_history

OPTIONS = ("experiment=compare", "compare.bits=[2,4]", "compare.methods=[rtn,gptq,regmean_gptq,epmq,epmq_layer,epmq_block]",
           "data.test_samples=null", "data.calib_samples=16", "compare.ablation.strength=[0,1,10000,inf]",
           "anchor.candidates.strength=[0,1,inf]", "seed=1", "~compare.ingredients",
           "+compare.ingredients={bias:{calibrate_bias:true}}")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, zoo_cache):
    out = tmp_path_factory.mktemp("compare")
    cfg = make_cfg(out, zoo_cache, *OPTIONS, "logger=wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        return out, run(cfg)


def test_compare_writes_results_table_and_plots(compared):
    out, results = compared
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["objective"] == pytest.approx(results["objective"])
    methods = {(e["method"], e["bits"]) for e in on_disk["methods"]}
    assert methods == {(m, b) for m in ("rtn", "gptq", "regmean_gptq", "epmq", "epmq_layer", "epmq_block")
                       for b in (2, 4)}
    table = (out / "results.md").read_text()
    for name in ("RTN", "GPTQ", "RegMean → GPTQ", "E-PMQ", "E-PMQ, λ per layer (one pass)",
                 "E-PMQ, λ per block (one pass)", "× GPTQ", "FP merged", "FP RegMean"):
        assert name in table
    for block in (e for e in on_disk["methods"] if e["method"] == "epmq_block"):  # a λ per block of the tower
        assert len(block["block_strengths"]) == 2 and {float(s) for s in block["block_strengths"]} <= {0, 1, math.inf}
        assert "per block: " in table and 0 <= block["select_b_avg_acc"] <= 1
    assert "FP calibrated merge (E-PMQ, no rounding)" in table and "gap recovered %" in table
    epmq4 = next(e for e in on_disk["methods"] if e["method"] == "epmq" and e["bits"] == 4)
    calibrated = on_disk["references"]["calibrated"]  # at the anchor E-PMQ chose at the widest bit width
    assert (calibrated["strength"], calibrated["form"]) == (epmq4["anchor"]["strength"], epmq4["anchor"]["form"])
    assert set(calibrated["test"]) == {*on_disk["tasks"], "avg"}
    for bits in (2, 4):  # the ingredient's row: E-PMQ at the anchor it chose, with the bias calibrated
        epmq = next(e for e in on_disk["methods"] if e["method"] == "epmq" and e["bits"] == bits)
        row = next(e for e in on_disk["ingredients"] if e["bits"] == bits)
        assert row["name"] == "bias" and row["options"]["calibrate_bias"] is True
        assert (row["strength"], row["form"]) == (epmq["anchor"]["strength"], epmq["anchor"]["form"])
        assert set(row["test"]) == {*on_disk["tasks"], "avg"} and 0 <= row["select_avg_acc"] <= 1
    assert table.count("E-PMQ's calibration ingredients, one at a time") == 2
    for row in on_disk["ablation"] + on_disk["ingredients"]:  # the two halves of the selection samples
        assert row["select_a_avg_acc"] != row["select_b_avg_acc"] or row["select_a_avg_nll"] != row["select_b_avg_nll"]
        # equal halves (an even number of selection samples per task): the whole set's mean is the halves' mean
        assert (row["select_a_avg_acc"] + row["select_b_avg_acc"]) / 2 == pytest.approx(row["select_avg_acc"], abs=1e-6)
    for plot in ("per_task_acc", "avg_acc_vs_bits", "ablation"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_gets_the_table_the_plots_and_the_metrics(compared):
    out, results = compared
    runs = list(out.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    assert wandb_finished(runs[0])  # complete when the job returns
    history = wandb_history(runs[0])
    assert history["compare/results/_type"] == "table-file"
    assert history["compare/results/nrows"] == len(results["methods"])  # one row per method and bit width
    assert history["compare/plots/_type"] == "images/separated"
    assert history["compare/plots/count"] == 3  # per-task, average against bits, ablation
    gptq4 = next(e for e in results["methods"] if e["method"] == "gptq" and e["bits"] == 4)
    assert history["compare/gptq/bits_4/test/avg_acc"] == pytest.approx(gptq4["test"]["avg"])
    media = [p.suffix for p in runs[0].parent.rglob("media/**/*") if p.is_file()]
    assert media.count(".png") == 3 and ".json" in media


def test_orderings_that_hold_whatever_the_seed(compared):
    _, results = compared
    refs = results["references"]
    for task in results["tasks"]:  # each expert beats the merge on its own task
        assert refs["experts"]["test"][task] > refs["merged"]["test"][task], task
    for e in results["methods"]:  # GPTQ never loses to rounding the same weights under the same H
        if e["method"] != "rtn":
            assert 0 < e["layer_loss"] <= e["rtn_layer_loss"], (e["method"], e["bits"])
    # fewer bits cost more: GPTQ's summed layer loss grows from 4 to 2 bits
    loss = {e["bits"]: e["layer_loss"] for e in results["methods"] if e["method"] == "gptq"}
    assert loss[2] > loss[4]


def test_shared_statistics_reproduce_the_separate_methods(compared):
    _, results = compared
    for bits in (2, 4):
        gptq = next(e for e in results["methods"] if e["method"] == "gptq" and e["bits"] == bits)
        inf_row = next(r for r in results["ablation"] if r["bits"] == bits and math.isinf(r["strength"]))
        assert inf_row["test"] == gptq["test"]  # λ = inf through the shared caches is GPTQ exactly
        # E-PMQ is the selection candidates' best on the selection samples (lowest cross-entropy)
        epmq = next(e for e in results["methods"] if e["method"] == "epmq" and e["bits"] == bits)
        pool = [r for r in results["ablation"] if r["bits"] == bits and r["strength"] in (0, 1, math.inf)]
        best = min(pool, key=lambda r: r["select_avg_nll"])
        assert epmq["anchor"] == {"strength": best["strength"], "form": best["form"]}
        assert epmq["test"] == best["test"]
        # 1 and 10000 in both forms; 0 and inf, the same model whatever the form, once each
        assert len([r for r in results["ablation"] if r["bits"] == bits]) == 6


def test_compare_rejects_bad_options_before_work(tmp_path, zoo_cache):
    for override, message in (("compare.methods=[gptq,awq]", "compare.methods"),
                              ("compare.bits=[1,4]", "bits"),
                              ("compare.ablation.form=[diagonal]", "form"),
                              ("compare.ablation.strength=[-1]", "strength")):
        cfg = make_cfg(tmp_path, zoo_cache, "experiment=compare", override)
        with pytest.raises(ValueError, match=message):
            compare_plan(cfg)


def test_a_resumed_comparison_redoes_no_finished_unit(compared, zoo_cache, monkeypatch):
    """resume=<run folder> of a finished comparison: every unit comes from units/, none is calibrated."""
    import epmq.jobs.compare

    out, results = compared
    monkeypatch.setattr(epmq.jobs.compare, "calibrate", lambda *a, **k: pytest.fail("a finished unit was redone"))
    again = run(make_cfg(out, zoo_cache, *OPTIONS, "logger=none", f"resume={out}"))
    assert [(e["method"], e["bits"], e["test"]) for e in again["methods"]] == \
        [(e["method"], e["bits"], e["test"]) for e in results["methods"]]
    assert len(again["ablation"]) == len(results["ablation"])


def test_every_optional_group_can_be_switched_off(tmp_path, zoo_cache):
    """compare.ablation=null compare.ingredients=null compare.fp_calibrated=false: E-PMQ's own candidates only,
    no ingredient rows, no FP calibrated merge."""
    results = run(make_cfg(tmp_path, zoo_cache, "experiment=compare", "compare.bits=[3]", "compare.methods=[gptq,epmq]",
                           "compare.ablation=null", "compare.ingredients=null", "compare.fp_calibrated=false",
                           "anchor.candidates.strength=[1,inf]", "compare.select_halves=false"))
    assert [e["method"] for e in results["methods"]] == ["gptq", "epmq"]
    assert sorted(float(r["strength"]) for r in results["ablation"]) == [1.0, math.inf]  # the candidates, no more
    assert results["ingredients"] == [] and "calibrated" not in results["references"]
    assert (tmp_path / "results.md").is_file()
