"""The anchor strength chosen per step, in one calibration, by the task heads' loss on the selection samples.

At the end of a step whose solver declares `per_step_choice` (epmq.core.anchor_choice.BlockChoiceEPMQ), the
engine solves the step's layers at every candidate λ from the same statistics, writes each candidate in turn
into the model (the steps before it at their chosen λ, the layers after it still the FP merge) and scores the
model as it then stands with `selection(device)`, the mean loss (nats) of the task heads on the held-out
selection samples; the least loss wins, ties keep the stronger anchor (candidates come strongest first).

The blocks before the step's block are fixed while its candidates are scored: the first scoring records
what the last of them returns on every forward, the others replay it (epmq.engine.capture.replaying_recorded)
with the stem skipped, so those blocks run once per step instead of once per candidate.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter
from epmq.engine.capture import replaying_recorded
from epmq.engine.placement import Placement
from epmq.engine.schedule import Step

Selection = Callable[[torch.device], float]  # the model's mean loss on the selection samples (nats)


class StepChoice:
    """Scores and keeps one candidate per step.

    Args:
        chooser: the solver declaring the choice: `step_candidates(previous choice)` -> the λ a step scores
            (strongest first) and `at(λ)` -> a plain solver.
        selection: selection(device) -> the mean loss of the model as it stands on the selection samples.
        adapter, model: where the blocks before the step's block are found (to record and replay them).
        placement: the device and the sum over ranks (every rank must keep the same candidate).
    """

    def __init__(self, chooser, selection: Selection, adapter: ModelAdapter, model: nn.Module, placement: Placement):
        self.chooser, self.selection = chooser, selection
        self.adapter, self.model, self.placement = adapter, model, placement
        self._replay: tuple = (None, [])  # ((stage, block), recorded outputs of the block before it)
        self.previous: float | None = None  # the last step's choice (a neighbourhood search starts there)

    def choose(self, step: Step, block: nn.Module, solve: Callable, precision: Callable[[], AbstractContextManager],
               progress: Callable[[str], None] = lambda text: None) -> tuple[dict, dict]:
        """solve(solver) writes the step's layers solved by `solver` into `block` and returns (results, metrics);
        each candidate is solved from the merged weights, scored, and the best one written back. Each layer's
        metrics gain anchor_strength and select_nll (the chosen model's loss)."""
        merged = {name: block.get_submodule(name).weight.detach().clone() for name in step.layers}
        candidates = self.chooser.step_candidates(self.previous)
        best = None
        for k, strength in enumerate(candidates):
            progress(f"scoring λ = {strength:g} ({k + 1}/{len(candidates)})")
            for name, W_m in merged.items():  # every candidate starts from the merged weights
                block.get_submodule(name).weight.copy_(W_m)
            results, metrics = solve(self.chooser.at(strength))
            with precision():
                loss = torch.tensor([self.score(step)], dtype=torch.float64)
            # every rank scores the same model on the same samples; averaging makes the choice identical on all
            # of them even where nondeterministic kernels differ in the last bits
            self.placement.all_reduce_(loss)
            loss = float(loss) / self.placement.world_size
            if best is None or loss < best[0]:
                best = (loss, strength, results, metrics)
        loss, strength, results, metrics = best
        self.previous = strength
        for name in step.layers:
            block.get_submodule(name).weight.copy_(results[step.prefix + name].weight().to(merged[name]))
        return results, {k: {**m, "anchor_strength": strength, "select_nll": loss} for k, m in metrics.items()}

    def score(self, step: Step) -> float:
        """`selection` on the model as it stands, the blocks before the step's block run once per step."""
        device = self.placement.device
        if step.block == 0:
            return float(self.selection(device))
        blocks = self.adapter.blocks(self.model, step.stage)
        key = (step.stage_index, step.block)
        if self._replay[0] != key:
            outputs = []
            handle = blocks[step.block - 1].register_forward_hook(lambda module, args, output: outputs.append(output))
            try:
                loss = float(self.selection(device))
            finally:
                handle.remove()
            self._replay = (key, outputs)
            return loss
        with replaying_recorded(blocks, step.block, self._replay[1]), self.adapter.stem_skipped(self.model, step.stage):
            return float(self.selection(device))

    def block_done(self) -> None:
        """Forget the recorded outputs (the next block's candidates replay the block just finished)."""
        self._replay = (None, [])
