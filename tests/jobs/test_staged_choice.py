"""The staged anchor choice (anchor.select=staged, epmq.jobs.staged_choice) and its shared pass (OpenLoopEPMQ).

What is checked: the shared pass rounds every candidate as its own GPTQ call would, bit for bit (rows stacked),
and its targets are E-PMQ's exactly at λ = 0 and inf; at a pivot it writes plain E-PMQ's layer. On the micro
suite: whatever the rounds keep, the model the choice returns is plain E-PMQ at the chosen strength bit for bit
(a pivot's pass reused, or a fresh calibration); the job reports every round and candidate; a resumed run does
not run a finished round again; bad rounds are refused by name before any work.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from epmq.core.anchor_choice import OpenLoopEPMQ
from epmq.core.gptq import gptq
from epmq.core.solvers import EPMQ
from epmq.core.stats import LayerStatistics
from epmq.jobs import staged_choice
from epmq.jobs.run import run

from helpers.config import make_cfg
from helpers.staged import choice_is_plain_epmq

SPEC = dict(bits=3, group_size=16)


def layer_statistics(seed: int, out: int = 24, inn: int = 48) -> tuple[torch.Tensor, LayerStatistics]:
    """W_m (out, in) and statistics of inputs whose targets come from a nearby weight (an expert's)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, inn, generator=g) @ torch.randn(inn, inn, generator=g) / inn ** 0.5  # correlated inputs
    W = 0.1 * torch.randn(out, inn, generator=g)
    stats = LayerStatistics(inn, out)
    stats.add(X, X @ (W + 0.03 * torch.randn(out, inn, generator=g)).T)
    return W, stats


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_candidates_round_as_their_own_gptq_calls(act_order):
    W, stats = layer_statistics(1)
    solver = OpenLoopEPMQ([0.0, 0.5, 3.0, "inf"], act_order=act_order, **SPEC)
    solver.solve(W, stats)
    for lam, (W_star, H) in zip(solver.candidates, solver.targets(W, stats)):
        assert torch.equal(solver.solutions[-1][lam].weight, gptq(W_star, H, solver.spec).weight)
    for lam in (0.0, math.inf):  # the shortcut W*(λ) = W_m + (W*(0) − W_m)/(1+λ) is exact at both ends
        exact = EPMQ(lam, act_order=act_order, **SPEC).solve(W, stats).result.weight
        assert torch.equal(solver.solutions[-1][lam].weight, exact)
    # in between it is an approximation of E-PMQ's target, close to it
    approx = solver.targets(W, stats)[solver.candidates.index(0.5)][0]
    exact = EPMQ(0.5, **SPEC).target(W, stats)[0]
    assert (approx - exact).norm() < 0.05 * (exact - W).norm()


def test_the_open_loop_writes_the_merged_weight_and_a_pivot_plain_epmq():
    W, stats = layer_statistics(2)
    assert torch.equal(OpenLoopEPMQ([1.0, "inf"], **SPEC).solve(W, stats).result.weight, W)
    pivot = OpenLoopEPMQ([0.0, 1.0, "inf"], pivot=1.0, **SPEC)
    assert pivot.requirements.codes and not OpenLoopEPMQ([1.0], **SPEC).requirements.codes
    written = pivot.solve(W, stats).result
    assert torch.equal(written.weight, EPMQ(1.0, **SPEC).solve(W, stats).result.weight)
    assert pivot.solutions[-1][1.0] is written
    with pytest.raises(ValueError, match="pivot"):
        OpenLoopEPMQ([0.0, "inf"], pivot=1.0, **SPEC)


def staged_cfg(tmp_path, zoo_cache, rounds: str, strengths: str = "[0.0,1.0,.inf]", *extra):
    return make_cfg(tmp_path, zoo_cache, "anchor.select=staged", f"anchor.candidates.strength={strengths}",
                    f"anchor.rounds={rounds}", "evaluate_references=false", "save_model=false", *extra)


@pytest.mark.parametrize("rounds, strengths", [
    ("[{fidelity: open_loop, pivot: 1.0, select_share: 0.5, keep: 1}]", "[1.0]"),          # the pass is kept
    ("[{fidelity: open_loop, select_share: 0.5, keep: 2}]", "[0.0,1.0,.inf]"),              # calibrated after
    ("[{fidelity: sequential, calib_share: 0.5, keep: 2}, {fidelity: open_loop, pivot: null, keep: 1}]",
     "[0.0,1.0,.inf]"),
])
def test_the_kept_model_is_plain_epmq_at_the_chosen_strength(tmp_path, zoo_cache, rounds, strengths):
    strength, records = choice_is_plain_epmq(staged_cfg(tmp_path, zoo_cache, rounds, strengths), tmp_path)
    assert [r["round"] for r in records] == list(range(1, len(records) + 1))
    # rounds score by the NLL alone (anchor.select_by=nll), without a Trainer
    assert all(set(s) == {"select_avg_nll"} and s["select_avg_nll"] > 0 for r in records for s in r["scores"].values())
    assert f"epmq/output/strength_{strength:g}" in records[-1]["kept"]


def test_the_job_reports_its_rounds_and_a_resumed_run_skips_them(tmp_path, zoo_cache, monkeypatch, capsys):
    rounds = "[{fidelity: open_loop, select_share: 0.5, keep: 2}]"
    report = run(staged_cfg(tmp_path, zoo_cache, rounds))
    (record,) = report["anchor_rounds"]
    assert record["fidelity"] == "open_loop" and len(record["scores"]) == 3 and len(record["kept"]) == 2
    # the kept ones are the best two by the round's scores (ties: the stronger anchor)
    nll = {k: v["select_avg_nll"] for k, v in record["scores"].items()}
    assert sorted(record["kept"], key=nll.get) == sorted(nll, key=nll.get)[:2]
    assert record["seconds"] > 0 and report["timings"]["rounds_s"] == pytest.approx(record["seconds"])
    assert [s["strength"] for s in report["selection"]] == [float(k.rsplit("_", 1)[1]) for k in record["kept"]]
    assert "chosen on held-out calibration samples" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "calibration" / "rounds.json").read_text())
    assert on_disk == report["anchor_rounds"]

    def refuse(*args, **kwargs):
        raise AssertionError("a finished round ran again")

    monkeypatch.setattr(staged_choice, "_open_loop_scores", refuse)
    (tmp_path / "report.json").unlink()
    resumed = run(staged_cfg(tmp_path, zoo_cache, rounds, "[0.0,1.0,.inf]", f"+resume={tmp_path}"))
    assert resumed["anchor_rounds"] == report["anchor_rounds"]
    assert resumed["metrics"]["quantized"] == report["metrics"]["quantized"]


@pytest.mark.parametrize("rounds, match", [
    ("[]", "anchor.select=staged needs anchor.rounds"),
    ("[{fidelity: closed, keep: 1}]", r"anchor.rounds\[0\].fidelity"),
    ("[{fidelity: open_loop, select_share: 0, keep: 1}]", r"anchor.rounds\[0\].select_share"),
    ("[{fidelity: open_loop, keep: 0}]", r"anchor.rounds\[0\].keep"),
    ("[{fidelity: open_loop, keep: 2}, {fidelity: open_loop, pivot: 1.0, keep: 1}]", r"anchor.rounds\[1\].pivot"),
    ("[{fidelity: sequential, keep: 1}]", "full-fidelity sequential round"),
    ("[{fidelity: open_loop, keep: 1, shares: 2}]", r"anchor.rounds\[0\] must be a mapping"),
])
def test_bad_rounds_are_refused_by_name(tmp_path, zoo_cache, rounds, match):
    with pytest.raises(ValueError, match=match):
        run(staged_cfg(tmp_path, zoo_cache, rounds))


def test_the_shared_pass_refuses_the_calibration_ingredients_before_the_merge(tmp_path, zoo_cache, monkeypatch):
    monkeypatch.setattr("epmq.jobs.quantize.prepare", lambda cfg: pytest.fail("the merge started"))
    with pytest.raises(ValueError, match="calibration ingredients"):
        run(staged_cfg(tmp_path, zoo_cache, "[{fidelity: open_loop, keep: 1}]", "[0.0,1.0,.inf]",
                       "quant.calibrate_bias=true"))
