"""The calibration schedule: stages, their blocks, and each block's steps (one fit epoch each).

A step is a group of a block's linear layers solved together from the same statistics. Without
true-sequential calibration a block is one step (all its layers see the block's float inputs);
with it, each adapter group is a step whose inputs are recomputed once the groups before it are
quantized (GPTQ's `--true-sequential` for LMs: q/k/v, then o, then gate/up, then down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage


@dataclass(frozen=True)
class Step:
    """One fit epoch: the layers `layers` of block `block` of stage `stage` (index `stage_index`).

    index: position in the whole schedule; first/last: whether it opens/closes its block;
    label: "block_<i>" for single-stage models, "<stage>/block_<i>" otherwise (metric keys).
    """

    index: int
    stage: Stage
    stage_index: int
    block: int
    layers: tuple[str, ...]
    first: bool
    last: bool
    label: str

    @property
    def prefix(self) -> str:
        """State-dict prefix of the step's block, e.g. 'encoder.block.3.'."""
        return self.stage.prefix(self.block)


def layer_names(adapter: ModelAdapter, model: nn.Module, stages: list[Stage]) -> list[str]:
    """The full name of every linear layer the stages place (every layer a solver may quantize), in model order."""
    return [stage.prefix(i) + name for stage in stages for i, block in enumerate(adapter.blocks(model, stage))
            for name in adapter.linear_layers(block, stage)]


def build_schedule(adapter: ModelAdapter, model: nn.Module, true_sequential: bool, stages: list[Stage] | None = None,
                   quantized: Callable[[str], bool] = lambda name: True) -> list[Step]:
    """Every step of `model`, in calibration order: stages (None: the adapter's), then blocks, then groups.
    quantized(full layer name): False leaves the layer out (it stays in float; a block left with no layer has no
    step, and its forward simply runs when a later block's inputs are captured)."""
    stages = adapter.stages(model) if stages is None else stages
    multi = len(stages) > 1
    steps: list[Step] = []
    for s, stage in enumerate(stages):
        for i, block in enumerate(adapter.blocks(model, stage)):
            groups = [tuple(n for n in group if quantized(stage.prefix(i) + n))
                      for group in adapter.groups(block, stage)]
            groups = [g for g in groups if g]  # a group whose layers all stay in float is no step
            if not true_sequential and groups:
                groups = [tuple(name for group in groups for name in group)]
            label = f"{stage.name}/block_{i}" if multi else f"block_{i}"
            for k, layers in enumerate(groups):
                steps.append(Step(len(steps), stage, s, i, layers, k == 0, k == len(groups) - 1, label))
    return steps


def describe_step(step: Step, blocks: int, multi_stage: bool, true_sequential: bool, label: str = "",
                  task_names: Sequence[str] = (), tasks: torch.Tensor | None = None) -> str:
    """Progress text of a step: '<label> · encoder block 2/4 · q_proj · task mnist'. blocks: the stage's block
    count; multi_stage: name the stage; true_sequential: name the step's first layer; tasks: a batch's task ids."""
    text = f"{step.stage.name} " if multi_stage else ""
    text += f"block {step.block + 1}/{blocks}"
    if true_sequential:
        text += f" · {step.layers[0].rsplit('.', 1)[-1]}"
    if label:
        text = f"{label} · {text}"
    if tasks is not None:
        names = [task_names[t] if 0 <= t < len(task_names) else str(t) for t in tasks.unique().tolist()]
        text += f" · {'task' if len(names) == 1 else 'tasks'} {','.join(names)}"
    return text
