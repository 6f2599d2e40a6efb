"""The experts' side of E-PMQ: each layer's target Y_t, one block of one expert at a time.

For the calibration samples of task t the provider keeps X^e, the inputs of the current block inside expert
t (and no other expert), propagated through expert t's own full-precision blocks from its own stem (expert
t has its own embeddings, norms and, for T5, its own position bias). It gives the calibration
Y_t = W_t X^e + b_t for every layer of the current step, rows aligned with the merged batch. Per step of
block i (the hooks of callbacks.expert_cache.ExpertActivationCache call these):

    batch_start     for every task t in the batch whose expert block is not loaded yet: read expert t's
                    weights of block i only (pool.expert_subset, safetensors) into a scratch copy of the
                    block (nothing is registered on the model); the copy is dropped after the step's last
                    batch holding task t. On the block's first step, X^e of task t's samples from the
                    stage's own forward (epmq.engine.capture, earlier blocks replayed from their recorded
                    outputs; at a stage's block 0 and its end, with expert t's own stem weights); run expert
                    t's block on X^e: hooks on the step's layers give the targets; after the block's last
                    step its output is what the next block replays

Expert work is one extra block forward per sample and step (expert t only sees task t's samples).
Batches that hold one task each, in task order (as epmq.families.tasks makes them), need one expert's
block at a time, so memory does not grow with the number of experts; a batch that mixes tasks holds
the blocks of its tasks. A block calibrated in several steps (true-sequential) reads each expert's
block once per step.

The targets depend only on the experts and the calibration batches, never on the merged model, the bit
width or the anchor. With keep=True they are recorded in the first fit and replayed by later fits on the
same batches (anchor candidates, bit widths, merges) without reading the pool. That costs memory, Σ over
steps and layers of samples x tokens x out values (for a 7B LM on 384 windows of 2048 tokens, terabytes;
for CLIP ViT-B/32 with 8 tasks x 16 images, 2.1 GB, which took peak memory from 1.2 to 3.7 GB), and
saves only the experts' block forwards of later fits. So the recording is dropped, and later fits
compute the targets again, once it exceeds `keep_budget_gb`, or as soon as its first step, times the
number of steps, projects past it (the peak then holds about one step's targets, not the budget).

The provider sees the calibration through a StepView (the schedule, the step, this rank's batches, the
placement, the forward precision), never the LightningModule itself.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage
from epmq.engine.capture import BlockInputs, Trace, hookless_copy, run_block, walk_to
from epmq.engine.placement import Placement
from epmq.engine.schedule import Step
from epmq.io.fingerprint import loader_fingerprint
from epmq.io.pool import ExpertPool
from epmq.io.weights import match_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepView:
    """What the targets provider sees of a calibration (BlockwiseCalibration.view()).

    step: the step being calibrated (None once every step is done); needs_targets: whether the solver asks
    for targets at all (a pool may serve only the base model's layers); batch_tasks: per calibration batch, the
    (batch,) task index of each sample; target_names(step): the step's layers (and norms) that need targets;
    loader(): the calibration loader (its fingerprint ties a recording to the batches)."""

    model: nn.Module
    adapter: ModelAdapter
    stages: list[Stage]
    schedule: list[Step]
    task_names: list[str]
    batch_tasks: list[torch.Tensor]
    step: Step | None
    needs_targets: bool
    placement: Placement
    precision: Callable[[], AbstractContextManager]
    target_names: Callable[[Step], tuple[str, ...]]
    loader: Callable[[], Iterable]


class ExpertTargets:
    """The experts' targets (and single layers, for anchors and mixed targets) from an expert pool.

    Args:
        pool: epmq.io.pool.ExpertPool holding an expert for every task of the calibration.
        keep: record every step's targets and replay them in later fits on the same batches.
        keep_budget_gb: the most the recording may hold (GiB); beyond it nothing is kept.
        keep_device: where the recording lives ("cpu" keeps it off the accelerator; each batch's
            targets are moved to the device when replayed); None: where hidden states wait.
    """

    def __init__(self, pool: ExpertPool, keep: bool = False, keep_budget_gb: float = 0.5,
                 keep_device: str | torch.device | None = None):
        if not isinstance(pool, ExpertPool):
            raise ValueError(f"pool must be an epmq.io.pool.ExpertPool, got {type(pool).__name__}")
        if not keep_budget_gb >= 0:
            raise ValueError(f"keep_budget_gb must be >= 0, got {keep_budget_gb!r}")
        self.pool = pool
        self.keep = bool(keep)
        self.keep_budget = keep_budget_gb * 2**30  # bytes
        self.keep_device = None if keep_device is None else torch.device(keep_device)
        self.attached = False  # a fit's hooks reach this provider (ExpertActivationCache)
        self._recording = False
        self._recorded_bytes = 0
        self.recorded: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # step -> batch -> layer -> Y
        self._layout = None     # what the recording depends on (tasks, batches, this rank's share, steps)
        self._replaying = False
        self._traces: dict[tuple[int, int], Trace] = {}        # (batch, task) -> where it stands
        self._inputs: dict[tuple[int, int], BlockInputs] = {}  # (batch, task) -> X^e of the current block
        self._blocks: dict[int, nn.Module] = {}                # task -> expert block of the current step
        self._last_batch: dict[int, int] = {}                  # task -> the step's last batch holding it
        self._targets: dict[int, dict[str, torch.Tensor]] = {}  # batch -> layer -> Y (current batch)
        self._skeleton: nn.Module | None = None               # the model's stem, for expert stems
        self._stem_task: int | None = None
        self._key_map = ("", "")  # (strip, add): pool keys -> model keys
        self._task_names: list[str] = []
        self._layers: dict[tuple, tuple] = {}  # (source, layer key) -> (W, b) read by `layer`
        self._layer_source: int | None = None

    # -- fit start ----------------------------------------------------------------------------
    def attach(self, task_names: list[str], model: nn.Module) -> None:
        """A fit starts: every task needs an expert; pool keys are matched to the model's."""
        missing = [t for t in task_names if t not in self.pool.tasks]
        if missing:
            raise ValueError(f"the expert pool has no expert for task(s) {missing}; pool tasks: {self.pool.tasks}")
        self._key_map = match_prefix(self.pool.keys(), model.state_dict().keys())
        self._task_names = list(task_names)
        self.attached = True

    def fit_start(self, view: StepView) -> None:
        layout = None
        if self.keep:
            layout = (tuple(view.task_names), tuple(tuple(t.tolist()) for t in view.batch_tasks),
                      tuple(b for b in range(len(view.batch_tasks)) if view.placement.owns(b)),
                      tuple((s.label, view.target_names(s)) for s in view.schedule),
                      loader_fingerprint(view.loader()))
        start = len(view.schedule) if view.step is None else view.step.index
        self._replaying = (self.keep and layout == self._layout
                           and all(s in self.recorded for s in range(start, len(view.schedule))))
        if self._replaying:
            return
        self.recorded, self._layout = {}, layout
        self._recording, self._recorded_bytes = self.keep, 0
        self._traces, self._inputs, self._blocks, self._stem_task = {}, {}, {}, None
        # A copy of the model whose blocks share the model's tensors: only its stem is ever run (the
        # capture replays or stops at blocks), and it takes each expert's stem weights in turn.
        shared = {id(t): t for s in view.stages for b in [view.adapter.blocks(view.model, s)]
                  for t in [*b.parameters(), *b.buffers()]}
        self._skeleton = hookless_copy(view.model, memo=shared).eval()

    def _model_keys(self, sd: dict) -> dict:
        strip, add = self._key_map
        return {add + k[len(strip):]: v for k, v in sd.items()}

    def _pool_filter(self, keep):
        strip, add = self._key_map
        return lambda k: keep(add + k[len(strip):])

    def _load_stem(self, view: StepView, t: int) -> None:
        """Expert t's weights outside the blocks into the skeleton (embeddings, norms)."""
        if self._stem_task == t:
            return
        prefixes = tuple(f"{s.blocks}." for s in view.stages)
        stem = self._model_keys(self.pool.expert_subset(view.task_names[t],
                                                        self._pool_filter(lambda k: not k.startswith(prefixes))))
        result = self._skeleton.load_state_dict(stem, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"expert '{view.task_names[t]}': keys {result.unexpected_keys[:3]} do not fit the model")
        self._stem_task = t

    def _expert_block(self, view: StepView, stage: Stage, i: int, t: int) -> nn.Module:
        """A scratch copy of block i of `stage` holding expert t's weights (read from its file).

        The copy's modules are new, its tensors at first the merged block's own (not copied); the
        expert's tensors are then assigned in their place, so the merged block is never written."""
        prefix = f"{stage.blocks}.{i}."
        merged = view.adapter.blocks(view.model, stage)[i]
        block = hookless_copy(merged, memo={id(x): x for x in [*merged.parameters(), *merged.buffers()]}).eval()
        weights = self._model_keys(self.pool.expert_subset(view.task_names[t],
                                                           self._pool_filter(lambda k: k.startswith(prefix))))
        block.load_state_dict({k[len(prefix):]: v for k, v in weights.items()}, strict=True, assign=True)
        return block.to(view.placement.device)

    # -- one step ---------------------------------------------------------------------------------
    def step_start(self, view: StepView) -> None:
        if self._replaying or view.step is None:
            return
        self._blocks, self._last_batch = {}, {}
        for b, tasks in enumerate(view.batch_tasks):
            if view.placement.owns(b):
                self._last_batch.update({t: b for t in tasks.unique().tolist()})

    @torch.no_grad()
    def batch_start(self, view: StepView, batch, batch_idx: int) -> None:
        """Compute (or replay) the targets of the step's layers for batch `batch_idx`."""
        self._targets = {}
        if view.step is None or not view.needs_targets or not view.placement.owns(batch_idx):
            return
        step, device = view.step, view.placement.device
        if self._replaying:
            self._targets[batch_idx] = {k: Y.to(device) for k, Y in self.recorded[step.index][batch_idx].items()}
            return
        tasks = view.batch_tasks[batch_idx]
        present = tasks.unique().tolist()
        for t in present:
            if t not in self._blocks:
                self._blocks[t] = self._expert_block(view, step.stage, step.block, t)
        outputs: dict[str, torch.Tensor] = {}
        hooks = [self._blocks[t].get_submodule(name).register_forward_hook(
                     lambda m, a, out, name=name: outputs.__setitem__(name, out))
                 for t in present for name in view.target_names(step)]
        targets: dict[str, torch.Tensor] = {}
        try:
            for t in present:
                idx = (tasks == t).nonzero().flatten()
                key = (batch_idx, t)
                with view.precision():
                    if key not in self._inputs:  # the block's first step (or the first after resuming)
                        self._inputs[key] = self._walk(view, key, _rows(batch, idx))
                    out = run_block(self._blocks[t], self._inputs[key].to(device))
                for name, Y in outputs.items():  # (n_t, tokens, out) = W_t X^e + b_t
                    if len(present) == 1:
                        targets[name] = Y  # the whole batch is task t's
                        continue
                    if name not in targets:
                        targets[name] = Y.new_zeros((tasks.numel(),) + tuple(Y.shape[1:]))
                    targets[name][idx.to(device)] = Y  # rows of task t's samples, aligned with the batch
                outputs.clear()
                if step.last:  # the block is done: its output is what the next block replays
                    self._traces[key].advance(out, view.placement.to_cache)
                    del self._inputs[key]
        finally:
            for h in hooks:
                h.remove()
        for t in present:  # no later batch of this step needs expert t's block
            if self._last_batch.get(t) == batch_idx:
                del self._blocks[t]
        self._targets[batch_idx] = targets
        if self._recording:
            self._record(view, step, batch_idx, targets)

    def _record(self, view: StepView, step: Step, batch_idx: int, targets: dict[str, torch.Tensor]) -> None:
        self._recorded_bytes += sum(Y.numel() * Y.element_size() for Y in targets.values())
        if self._recorded_bytes > self.keep_budget:  # too big to keep: compute them again next time
            self._stop_recording(f"{self._recorded_bytes / 2**30:.2f} GiB recorded")
            return
        keep = view.placement.to_cache if self.keep_device is None else (lambda Y: Y.to(self.keep_device))
        self.recorded.setdefault(step.index, {})[batch_idx] = {k: keep(Y) for k, Y in targets.items()}

    def _walk(self, view: StepView, key: tuple[int, int], batch) -> BlockInputs:
        """X^e of the step's block for task key[1]'s samples of batch key[0]."""
        step, t = view.step, key[1]
        trace = self._traces.setdefault(key, Trace())
        n_blocks = len(view.adapter.blocks(view.model, step.stage))
        # The stem's own output only matters where a stage starts or ends (and when a resumed run
        # walks from the start); between, every block before the target is replayed.
        if trace.block == 0 or (trace.stage, trace.block) != (step.stage_index, step.block) or trace.block == n_blocks:
            self._load_stem(view, t)

        def run(stage, i, inputs):  # a resumed run: expert t's own earlier blocks, one at a time
            return run_block(self._expert_block(view, stage, i, t), inputs)

        placement = view.placement
        inputs = walk_to(view.adapter, self._skeleton, view.stages, trace, batch, (step.stage_index, step.block),
                         placement.device, run, placement.to_cache)
        return placement.inputs_to_cache(inputs)

    def layer(self, source: int | str, key: str, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of one linear layer (or (γ, β) of a norm), read from the pool: source is a task index into the
        calibration's task_names (that expert) or "base"; key is the layer's name in the model ('<block
        prefix><name>'). The last source's layers are kept until another expert is asked for (tasks come in turn)."""
        if source != self._layer_source and source != "base":
            self._layers = {k: v for k, v in self._layers.items() if k[0] == "base"}
            self._layer_source = source
        found = self._layers.get((source, key))
        if found is None:
            strip, add = self._key_map
            pool_key = lambda suffix: strip + f"{key}.{suffix}"[len(add):]  # noqa: E731
            lazy = self.pool.lazy_base() if source == "base" else self.pool.lazy_expert(self._task_names[source])
            bias = pool_key("bias")
            found = (lazy[pool_key("weight")], lazy[bias] if bias in lazy else None)
            self._layers[(source, key)] = found
        return tuple(None if t is None else t.to(device) for t in found)

    def targets(self, batch_idx: int) -> dict[str, torch.Tensor]:
        """layer -> (batch, tokens, out) expert outputs Y_t for the current step, batch `batch_idx`."""
        if batch_idx not in self._targets:
            raise RuntimeError(f"no expert targets for batch {batch_idx}: the trainer's callbacks must include "
                               f"callbacks.expert_cache.ExpertActivationCache(module.targets)")
        return self._targets[batch_idx]

    def step_end(self, view: StepView) -> None:
        self._targets, self._blocks, self._layers, self._layer_source = {}, {}, {}, None
        if self._recording and len(self.recorded) == 1:  # steps of a model hold alike amounts of targets
            projected = self._recorded_bytes * len(view.schedule)
            if projected > self.keep_budget:
                self._stop_recording(f"{projected / 2**30:.2f} GiB projected from the first step")

    def _stop_recording(self, why: str) -> None:
        self.recorded, self._layout, self._recording, self.keep = {}, None, False, False
        log.info("expert targets not kept for later fits (%s, keep_budget_gb=%g): each computes them again",
                 why, self.keep_budget / 2**30)

    def fit_end(self, view: StepView) -> None:
        self._traces, self._inputs, self._blocks, self._targets = {}, {}, {}, {}
        self._skeleton, self._stem_task, self.attached = None, None, False
        if self.keep and not all(s in self.recorded for s in range(len(view.schedule))):
            self.recorded, self._layout = {}, None  # an interrupted or resumed fit: never replay it


def provider(targets, for_solver) -> ExpertTargets | None:
    """The ExpertTargets a solver's calibration reads: `targets` itself (a provider, shared between fits), one
    made from a pool, or None when the solver needs neither the experts' targets nor the base's layers."""
    needs = for_solver.requirements
    if not (needs.targets or needs.base):
        return None
    if isinstance(targets, ExpertTargets):
        return targets
    if isinstance(targets, ExpertPool):
        return ExpertTargets(targets)
    if targets is None:
        raise ValueError(f"{for_solver!r} needs expert targets (or the base model's layers): pass "
                         f"targets=ExpertPool(...) or an ExpertTargets")
    raise ValueError(f"targets must be an ExpertPool or an ExpertTargets, got {type(targets).__name__}")


def _rows(batch: dict, idx: torch.Tensor) -> dict:
    """The samples `idx` of a batch (every tensor whose first dim is the batch)."""
    n = len(batch["task"])
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v)
            for k, v in batch.items()}
