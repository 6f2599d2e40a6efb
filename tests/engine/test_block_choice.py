"""The anchor strength chosen per block in one calibration by a held-out loss (BlockChoiceEPMQ, `anchor.select=block`).

The engine's choice is checked against an oracle built from plain calibrations: for block b and every
candidate λ, a fresh calibration with the blocks before b at the λ the oracle already chose, block b at λ,
and block b+1 put back to the merged weights (as it stands when the engine scores block b) is scored by the
same loss; the engine must choose the oracle's λ at every block and end with the oracle's weights bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from epmq.core.anchor_choice import BlockChoiceEPMQ
from epmq.core.solvers import EPMQ, Requirements
from epmq.engine.calibration import BlockwiseCalibration
from epmq.engine.capture import replaying_recorded
from epmq.families.base import adapter_for
from epmq.io.pool import ExpertPool
from epmq.jobs.run import run
from epmq.jobs.steps import evaluate, prepare, selection_loss, solvers

from helpers.config import make_cfg
from helpers.tiny import (ADAPTER, SPEC_ARGS, TASKS, CalibrationData, calibration_set, load_state, tiny_model,
                          trainer_for)

CANDIDATES = [math.inf, 3.0, 0.3, 0.0]
LAYERS_PER_BLOCK = 6  # q, k, v, out, fc1, fc2 of a CLIP block


class PerBlockEPMQ(EPMQ):
    """E-PMQ at strengths[b] for the layers of block b (the engine solves block by block, layers in order)."""

    def __init__(self, strengths):
        super().__init__(strength=0.0, **SPEC_ARGS)
        self.strengths, self.calls = list(strengths), 0

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=True)

    def solve(self, W_m, stats=None, **context):
        self.strength = self.strengths[self.calls // LAYERS_PER_BLOCK]
        self.calls += 1
        return super().solve(W_m, stats, **context)


def held_out_loss(zoo):
    """A loss of the model's pooled features against the experts' on fixed held-out pixels: what the engine
    asks of `selection` (a number of the model as it stands), independent of any suite."""
    x = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        targets = [e(pixel_values=x).pooler_output for e in zoo["experts"].values()]

    def loss(model):
        with torch.no_grad():
            pooled = model(pixel_values=x).pooler_output
        return float(sum(((pooled - t) ** 2).mean() for t in targets))
    return loss


def fit(zoo, solver, selection=None) -> BlockwiseCalibration:
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver, TASKS,
                                  targets=ExpertPool(zoo["root"] / "base", zoo["paths"]), selection=selection)
    trainer_for(module).fit(module, datamodule=CalibrationData(calibration_set()))
    return module


def test_each_blocks_choice_is_the_oracles_and_the_weights_match_bit_for_bit(zoo):
    loss = held_out_loss(zoo)
    model_of = {}

    def selection(device):
        return loss(model_of["model"])

    solver = BlockChoiceEPMQ(CANDIDATES, **SPEC_ARGS)
    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver, TASKS,
                                  targets=ExpertPool(zoo["root"] / "base", zoo["paths"]), selection=selection)
    model_of["model"] = module.model
    trainer_for(module).fit(module, datamodule=CalibrationData(calibration_set()))
    chosen = [strength for _, strength in module.step_strengths]

    oracle, losses = [], {}
    for b in range(2):
        scores = {}
        for lam in CANDIDATES:
            model = fit(zoo, PerBlockEPMQ(oracle + [lam] + [math.inf] * (1 - b))).model
            if b == 0:  # block 1 still the FP merge when block 0 is scored
                adapter = adapter_for(model)
                prefix = adapter.block_prefix(adapter.stages(model)[0], 1)
                block_1 = {k: v for k, v in zoo["merged"].items() if k.startswith(prefix)}
                assert len(block_1) >= 12
                model.load_state_dict(block_1, strict=False)
            scores[lam] = loss(model)
        oracle.append(min(CANDIDATES, key=lambda lam: scores[lam]))  # candidates strongest first: ties keep it
        losses[b] = scores
    assert chosen == oracle
    assert len({round(v, 12) for v in losses[0].values()}) > 1  # the candidates really differ under the loss
    reference = fit(zoo, PerBlockEPMQ(oracle)).model.state_dict()
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    for step in module.finished:  # the chosen candidate's score is what each layer records
        b = step.index
        assert all(m["select_nll"] == pytest.approx(losses[b][chosen[b]], rel=1e-6) for m in step.metrics.values())


def test_one_candidate_is_plain_epmq_at_that_strength(zoo):
    module = fit(zoo, BlockChoiceEPMQ([1.0], **SPEC_ARGS), selection=lambda device: 0.0)
    plain = fit(zoo, EPMQ(1.0, **SPEC_ARGS))
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, plain.model.state_dict()[name]), name


def test_a_neighbourhood_scores_the_previous_choice_and_its_neighbours_only(zoo):
    solver = BlockChoiceEPMQ(CANDIDATES, neighbours=1, **SPEC_ARGS)
    assert solver.step_candidates(None) == CANDIDATES
    assert solver.step_candidates(3.0) == [math.inf, 3.0, 0.3] and solver.step_candidates(0.0) == [0.3, 0.0]
    loss, scored, model_of = held_out_loss(zoo), [], {}

    def selection(device):
        scored.append(len(model_of["module"].finished))  # the step being chosen
        return loss(model_of["module"].model)

    module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver, TASKS,
                                  targets=ExpertPool(zoo["root"] / "base", zoo["paths"]), selection=selection)
    model_of["module"] = module
    trainer_for(module).fit(module, datamodule=CalibrationData(calibration_set()))
    (_, first), (_, second) = module.step_strengths
    assert scored.count(0) == len(CANDIDATES)
    assert scored.count(1) == len(solver.step_candidates(first)) < len(CANDIDATES)
    assert second in solver.step_candidates(first)
    for bad in ({"neighbours": 0}, {"select_share": 0.0}, {"select_share": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BlockChoiceEPMQ(CANDIDATES, **bad, **SPEC_ARGS)


def test_a_block_choice_without_a_selection_is_refused(zoo):
    with pytest.raises(ValueError, match="give BlockwiseCalibration a `selection`"):
        fit(zoo, BlockChoiceEPMQ(CANDIDATES, **SPEC_ARGS))
    with pytest.raises(ValueError, match="takes none of E-PMQ's calibration ingredients"):
        BlockChoiceEPMQ(CANDIDATES, calibrate_bias=True, **SPEC_ARGS)
    chooser = BlockChoiceEPMQ(CANDIDATES, **SPEC_ARGS)  # not a solver: the engine solves its candidates
    assert chooser.requirements.per_step_choice and not hasattr(chooser, "solve")
    assert chooser.at(3.0).strength == 3.0 and chooser.at(3.0).spec == chooser.spec


def test_the_selection_loss_is_the_evaluators_nll_on_the_selection_samples(tmp_path, zoo_cache):
    cfg = make_cfg(tmp_path, zoo_cache, "logger=none")
    prepared = prepare(cfg)
    model = prepared.suite.model(prepared.merged_state)
    expected = evaluate(cfg, prepared, model, prepared.data.select_dataloader(), "select/check").nll["avg"]
    assert selection_loss(prepared, model)(torch.device("cpu")) == pytest.approx(expected, rel=1e-5)
    half = evaluate(cfg, prepared, model, prepared.data.select_dataloader(0.5), "select/half").nll["avg"]
    assert selection_loss(prepared, model, 0.5)(torch.device("cpu")) == pytest.approx(half, rel=1e-5)
    assert half != pytest.approx(expected, rel=1e-5)  # the share is the first half of each task's samples
    with torch.no_grad():  # and it follows the model as it stands
        next(model.parameters()).mul_(3.0)
    assert selection_loss(prepared, model)(torch.device("cpu")) != pytest.approx(expected, rel=1e-5)


def test_select_block_runs_one_calibration_and_reports_each_blocks_strength(tmp_path, zoo_cache, capsys):
    cfg = make_cfg(tmp_path, zoo_cache, "anchor.select=block", "quant.form=output",
                   "anchor.candidates.strength=[0.0,1.0,.inf]", "evaluate_references=false", "save_model=false")
    assert [type(s).__name__ for s in solvers(cfg.quant, cfg.anchor)] == ["BlockChoiceEPMQ"]
    report = run(cfg)
    assert report["selection"] == [] and report["quant"]["select"] == "block"
    strengths = report["quant"]["layer_strengths"]
    assert len(strengths) >= 12 and set(strengths.values()) <= {0.0, 1.0, math.inf}
    blocks = {}
    for name, lam in strengths.items():  # one strength per block
        blocks.setdefault(name.split(".mlp.")[0].split(".self_attn.")[0], set()).add(lam)
    assert all(len(v) == 1 for v in blocks.values())
    assert "strength chosen per block on held-out calibration samples" in capsys.readouterr().out
    with pytest.raises(ValueError, match="anchor.select=block chooses the strength only"):
        bad = make_cfg(tmp_path / "bad", zoo_cache, "anchor.select=block")
        solvers(bad.quant, bad.anchor)


def test_replayed_blocks_refuse_forwards_other_than_the_recorded_ones():
    model = tiny_model()
    adapter = adapter_for(model)
    stage = adapter.stages(model)[0]
    blocks = adapter.blocks(model, stage)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    outputs = []
    handle = blocks[0].register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        expected = [model(pixel_values=x[:k]).pooler_output for k in (1, 2)]  # two forwards recorded
    handle.remove()
    with torch.no_grad(), replaying_recorded(blocks, 1, outputs), adapter.stem_skipped(model, stage):
        replayed = [model(pixel_values=x[:k]).pooler_output for k in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(replayed, expected))
    with pytest.raises(RuntimeError, match="2 forwards were recorded but 1 replayed"):
        with torch.no_grad(), replaying_recorded(blocks, 1, outputs):
            model(pixel_values=x[:1])
    with pytest.raises(RuntimeError, match="past the 2 recorded"):
        with torch.no_grad(), replaying_recorded(blocks, 1, outputs):
            for k in (1, 2, 3):
                model(pixel_values=x[:k])
    assert not any(type(b).__name__ == "_ReplayNext" for b in blocks)  # the real blocks are back
