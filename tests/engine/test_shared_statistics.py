"""Layers that read one input tensor (q/k/v, gate/up, T5's cross-attention k/v) share one H.

Sharing must change nothing but the work: for CLIP, T5 and Llama (tiny models of the real classes,
two experts on disk), GPTQ and E-PMQ give the same codes and grids with and without it, and in the
shared run the declared layers really hold one buffer, all-reduced once. A wrong declaration (two
layers that read different tensors) is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from epmq.core.merge import task_arithmetic
from epmq.core.solvers import EPMQ, GPTQ
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.io.pool import ExpertPool

from helpers.families import FAMILIES, TASKS, loader
from helpers.tiny import SPEC_ARGS, trainer_for


class Watching:
    """Wraps a solver; records, per solved layer, where its H lives and whether it owns it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []
        self.name, self.spec = inner.name, inner.spec
        self.requirements = inner.requirements

    def solve(self, W, stats):
        self.seen.append((stats.H.data_ptr(), stats.owns_H, len(stats.buffers())))
        return self.inner.solve(W, stats)


def calibrate(name, tmp_path, solver, share: bool, true_sequential: bool):
    family = FAMILIES[name]
    if not (tmp_path / "base").exists():
        family.save_zoo(tmp_path)
    base = family.base()
    experts = {t: type(base).from_pretrained(tmp_path / t) for t in TASKS}
    merged = family.base()
    merged.load_state_dict(task_arithmetic(base.state_dict(), {t: e.state_dict() for t, e in experts.items()}, 0.5))
    pool = ExpertPool(tmp_path / "base", {t: tmp_path / t for t in TASKS})
    watching = Watching(solver)
    module = BlockwiseCalibration(merged, family.adapter, watching, TASKS, targets=pool, true_sequential=true_sequential,
                                  share_statistics=share)
    trainer_for(module).fit(module, train_dataloaders=loader(family.batches(torch.Generator().manual_seed(1))))
    return module, watching.seen


@pytest.mark.parametrize("name", ["clip", "t5", "llama"])
@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_shared_H_gives_the_same_codes_and_is_one_buffer(name, method, tmp_path):
    make = (lambda: GPTQ(**SPEC_ARGS)) if method == "gptq" else (lambda: EPMQ(strength=1.0, **SPEC_ARGS))
    true_sequential = name == "llama"  # Llama's default; the others calibrate a block in one step
    shared, seen = calibrate(name, tmp_path, make(), True, true_sequential)
    alone, seen_alone = calibrate(name, tmp_path, make(), False, true_sequential)

    results, reference = shared.quant_results, alone.quant_results
    assert set(results) == set(reference) and len(results) >= 12
    for layer in reference:
        for field in ("codes", "weight"):
            assert torch.equal(getattr(results[layer], field)(), getattr(reference[layer], field)()), (layer, field)

    # which layers shared: one H per declared group of a step, the others borrow it
    layers = [shared.schedule[s.index].prefix + n for s in shared.finished for n in s.layers]
    by_layer = dict(zip(layers, seen))
    groups = {}
    for step in shared.schedule:
        for group in step.stage.shared_inputs:
            members = [step.prefix + n for n in group if n in step.layers]
            if len(members) > 1:
                groups[tuple(members)] = None
    assert groups, "the family declares layers that share an input"
    for members in groups:
        pointers = {by_layer[m][0] for m in members}
        owners = [m for m in members if by_layer[m][1]]
        assert len(pointers) == 1 and owners == [members[0]], members
        # a borrower's buffers for the all-reduce leave H out
        assert all(by_layer[m][2] == by_layer[members[0]][2] - 1 for m in members[1:])
    assert all(owns for _, owns, _ in seen_alone)  # without sharing every layer has its own


def test_a_wrong_declaration_is_refused_naming_the_layers(tmp_path):
    class Wrong(CLIPVisionAdapter):  # q_proj and fc1 read different tensors
        def stages(self, model):
            return [dataclasses.replace(s, groups=(tuple(n for g in s.groups for n in g),),
                                        shared_inputs=(("self_attn.q_proj", "mlp.fc1"),))
                    for s in super().stages(model)]

    family = FAMILIES["clip"]
    model = family.base()
    module = BlockwiseCalibration(copy.deepcopy(model), Wrong(), GPTQ(**SPEC_ARGS), TASKS)
    with pytest.raises(ValueError, match=r"'self_attn.q_proj' and 'mlp.fc1' are declared to read the same input"):
        trainer_for(module).fit(module, train_dataloaders=loader(family.batches(torch.Generator().manual_seed(1))))
