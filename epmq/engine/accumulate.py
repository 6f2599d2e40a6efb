"""One step's statistics: forward hooks on the merged block's layers add each batch's share to H and C.

For a layer with inputs X̂ (batch, tokens, in), the experts' outputs Y_t there (batch, tokens, out) and the
merged layer's own output X̂W_mᵀ + b_m, a batch adds

    H += Σ_tokens w X̂ᵀX̂        C += Σ_tokens w (Y_t − (X̂W_mᵀ + b_m))ᵀ X̂     (residual targets: C holds C − W_m H)

with w = w_t / n_t for a real token of task t (n_t: task t's tokens in the whole calibration set, summed over
ranks) and 0 on padding, so that each task counts by its weight w_t whatever its size. Layers that read one
tensor (the adapter's shared_inputs: q/k/v, gate/up) share one H, added once. What else is gathered follows
the solver's Requirements: K folds of samples (cross-validation), each task's sums apart until its batches
end (normalize), input means (a calibrated bias), the LayerNorms' statistics (calibrated norms), targets
taken at mixed inputs (interp).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from epmq.core.norm_affine import NormStatistics
from epmq.core.solvers import Requirements
from epmq.core.stats import FoldedStatistics, LayerStatistics
from epmq.engine.adapters import ModelAdapter, Stage
from epmq.engine.placement import Placement, distributed
from epmq.engine.schedule import Step

TokenCounts = dict[tuple[int, str], torch.Tensor]  # (stage index, token source) -> (T,) n_t, all ranks


class StepGathered(Exception):
    """Raised by StepStatistics' hooks once every hooked module has run in a block forward: the statistics
    of that forward are complete and the rest of the block need not run (the caller discards its output)."""


def check_tasks(batch, batch_idx: int, task_names: Sequence[str]) -> torch.Tensor:
    """(batch,) int64 task indices of a batch; ValueError when missing or out of range."""
    if not isinstance(batch, Mapping) or "task" not in batch:
        raise ValueError(f"calibration batch {batch_idx} must be a dict with a 'task' entry")
    tasks = torch.as_tensor(batch["task"]).reshape(-1).to("cpu", torch.int64)
    if tasks.numel() and (tasks.min() < 0 or tasks.max() >= len(task_names)):
        raise ValueError(f"calibration batch {batch_idx}: task index {tasks.max().item()} out of range "
                         f"for task_names={list(task_names)}")
    return tasks


def token_mask(adapter: ModelAdapter, model: nn.Module, stage: Stage, batch, source: str) -> torch.Tensor:
    """(batch, tokens) float64 mask of the tokens that count (epmq.engine.adapters)."""
    return adapter.token_mask(model, stage, batch, source).to("cpu", torch.float64)


def sources(stage: Stage) -> tuple[str, ...]:
    """The token sources a stage's layers read: its own tokens, and an earlier stage's (T5's cross-attention)."""
    return ("self", "context") if stage.context_layers else ("self",)


def count_tokens(loader, adapter: ModelAdapter, model: nn.Module, stages: list[Stage], task_names: Sequence[str],
                 placement: Placement) -> tuple[list[torch.Tensor], TokenCounts]:
    """One pass over the calibration loader: each batch's (batch,) task ids, and n_t per (stage, token source)
    over this rank's batches, summed over ranks."""
    batch_tasks, counts = [], {}
    T = len(task_names)
    for b, batch in enumerate(loader):
        tasks = check_tasks(batch, b, task_names)
        batch_tasks.append(tasks)
        if not placement.owns(b):
            continue
        for s, stage in enumerate(stages):
            for source in sources(stage):
                n = token_mask(adapter, model, stage, batch, source).sum(1).to(torch.float64)
                counts.setdefault((s, source), torch.zeros(T, dtype=torch.float64)).index_add_(0, tasks, n)
    if not batch_tasks:
        raise ValueError("the calibration loader yielded no batches")
    for s, stage in enumerate(stages):  # every rank reduces the same keys, in the same order
        for source in sources(stage):
            counts.setdefault((s, source), torch.zeros(T, dtype=torch.float64))
    for key in sorted(counts):
        placement.all_reduce_(counts[key])
    return batch_tasks, counts


def check_every_task(counts: TokenCounts, task_names: Sequence[str], task_weights: torch.Tensor) -> None:
    """ValueError naming the tasks of positive weight that have no calibration token in the first stage."""
    empty = [t for t, n, w in zip(task_names, counts[(0, "self")], task_weights) if n == 0 and w > 0]
    if empty:
        raise ValueError(f"task(s) {empty} have no calibration samples (task_names={list(task_names)})")


def check_task_order(batch_tasks: list[torch.Tensor], task_names: Sequence[str], placement: Placement) -> None:
    """normalize folds each task's statistics when its batches end: every batch must hold one task and each
    task's batches must come together (as epmq.families.tasks makes them)."""
    if not placement.shard_batches and distributed():
        raise ValueError("normalize=true needs shard_batches=True under DDP (every rank folds each task at "
                         "the same batch)")
    seen, last = set(), None
    for b, tasks in enumerate(batch_tasks):
        ids = tasks.unique().tolist()
        if len(ids) != 1:
            raise ValueError(f"normalize=true needs batches that hold one task each; calibration batch {b} "
                             f"holds tasks {[task_names[t] for t in ids]}")
        if ids[0] != last and ids[0] in seen:
            raise ValueError(f"normalize=true needs each task's batches together; task "
                             f"'{task_names[ids[0]]}' comes back at calibration batch {b}")
        seen.add(ids[0])
        last = ids[0]


def task_weights(task_weights, task_names: Sequence[str]) -> torch.Tensor:
    """(T,) float64 w_t per task from a mapping name -> w (missing: 1), a sequence in task order, or None (all 1)."""
    if task_weights is None:
        w = [1.0] * len(task_names)
    elif isinstance(task_weights, Mapping):
        unknown = sorted(set(task_weights) - set(task_names))
        if unknown:
            raise ValueError(f"task_weights names unknown task(s) {unknown}; tasks: {task_names}")
        w = [float(task_weights.get(t, 1.0)) for t in task_names]
    else:
        w = [float(x) for x in task_weights]
        if len(w) != len(task_names):
            raise ValueError(f"task_weights has {len(w)} entries for {len(task_names)} tasks")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) == 0:
        raise ValueError(f"task_weights must be finite, >= 0 and not all 0, got {w}")
    return torch.tensor(w, dtype=torch.float64)


def token_weights(counts: TokenCounts, step: Step, task_weights: torch.Tensor, tasks: torch.Tensor,
                  masks: Callable[[str], torch.Tensor], device) -> dict[str, torch.Tensor]:
    """source -> (batch, tokens) w_t / n_t of each real token of one batch, 0 on padding."""
    weights = {}
    for (s, source), n_t in counts.items():
        if s == step.stage_index:
            per_sample = (task_weights / n_t.clamp_min(1))[tasks]  # w_t / n_t, (batch,)
            weights[source] = (per_sample[:, None] * masks(source)).to(device)
    return weights


class StepStatistics:
    """The statistics of one step's layers (and its block's LayerNorms), filled by hooks during block forwards.

    Args:
        step, block: the step and its block in the merged model.
        requirements: the solver's (what to gather).
        device: where the sums live.
        share_statistics: layers that read the same input share one H (False: each its own; same numbers).
        norm_targets: whether the block's LayerNorms get hooks (their statistics need the experts' targets).
        layer: layer(task, key, device) -> (W_t, b_t) of expert t's layer (mixed targets, `interp` < 1).

    `sums` maps each layer (name inside the block) to its LayerStatistics (FoldedStatistics with folds),
    `norms` each calibrated LayerNorm to its NormStatistics. Each block forward runs inside `feeding(...)`, which
    hands the hooks the batch's token weights, targets, tasks and fold ids; after the step's last batch,
    `buffers()` are summed over ranks and `sums` go to the solver. The last hooked module to run in a forward
    raises StepGathered, so that the block's later layers do not run for nothing (GPTQ's first step of a
    block needs only its first layers: true-sequential steps then cost a fraction of a block forward each).
    """

    def __init__(self, step: Step, block: nn.Module, requirements: Requirements, device: torch.device,
                 share_statistics: bool = True, norm_targets: bool = False,
                 layer: Callable | None = None):
        self.step, self.requirements, self.layer = step, requirements, layer
        self.sums: dict[str, LayerStatistics] = {}
        self.task_sums: dict[str, LayerStatistics] = {}  # normalize: the current task's own sums
        self.norms: dict[str, NormStatistics] = {}
        self.input_group: dict[str, str] = {}  # layer -> first layer of the step reading its input
        self.hooks: list = []
        self._batch: dict = {}                 # what the hooks need of the batch in flight
        self._seen: dict[str, tuple[str, torch.Tensor]] = {}  # input group -> (layer, X̂) added to H this batch
        self._ran: set[str] = set()            # hooked modules that have run in the forward in flight
        with_C = requirements.targets
        shared = step.stage.shared_inputs if share_statistics else ()
        means = {"means": True} if requirements.bias else {}
        for name in step.layers:
            lin = block.get_submodule(name)
            group = next((g for g in shared if name in g), (name,))
            owner = next(n for n in group if n in step.layers)  # the group's first layer in this step
            self.input_group[name] = owner
            for sums in (self.sums, self.task_sums) if requirements.normalize else (self.sums,):
                sums[name] = self._statistics(lin.in_features, lin.out_features if with_C else None, device=device,
                                              residual=with_C, share_H_with=sums.get(owner), **means)
            self.hooks.append(lin.register_forward_hook(self._linear_hook(name, step.stage.source(name))))
        for name in step.stage.norms if requirements.norms and step.first else ():
            norm = block.get_submodule(name)  # at λ = inf no targets: the norms go to the anchor
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                raise ValueError(f"calibrate_norms: '{step.prefix}{name}' is {type(norm).__name__}, not an nn.LayerNorm "
                                 f"with weight and bias")
            self.norms[name] = NormStatistics(norm.normalized_shape[-1], norm.eps, device=device)
            if norm_targets:
                self.hooks.append(norm.register_forward_hook(self._norm_hook(name)))

    def _statistics(self, *args, **kwargs):
        """LayerStatistics, or FoldedStatistics when the solver cross-validates (requirements.folds)."""
        folds = self.requirements.folds
        return FoldedStatistics(*args, folds=folds, **kwargs) if folds else LayerStatistics(*args, **kwargs)

    @contextmanager
    def feeding(self, weights: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: torch.Tensor,
                folds: torch.Tensor | None = None):
        """Context for one block forward of one batch: what its hooks add. weights: source -> (batch, tokens)
        token weights; targets: layer -> (batch, tokens, out) expert outputs Y_t; tasks: (batch,) task ids;
        folds: (batch,) fold ids (cross-validation) or None."""
        self._batch = {"weights": weights, "targets": targets, "tasks": tasks, "folds": folds}
        self._ran = set()
        try:
            yield
        finally:
            self._batch, self._seen, self._ran = {}, {}, set()  # nothing of the batch is held past its forward

    def _gathered(self, name: str) -> None:
        """Module `name` has added its share of the forward in flight; StepGathered once every hooked module has.
        (A module that ran twice in one forward would find its input group seen: the linear hook refuses that.)"""
        self._ran.add(name)
        if len(self._ran) == len(self.hooks):
            raise StepGathered

    @property
    def batch_targets(self) -> dict[str, torch.Tensor]:
        """The experts' outputs (layer -> (batch, tokens, out)) of the forward in flight; {} between forwards."""
        return self._batch.get("targets", {})

    def _linear_hook(self, name: str, source: str):
        def hook(linear: nn.Linear, args, output):
            X = args[0]  # (batch, tokens, in): the merged layer's inputs X̂
            Y = None
            if self.requirements.targets:
                # Y_t = W_t X^e + b_t (batch, tokens, out); the merged layer keeps b_m, so the target
                # is Ỹ = Y_t − b_m and its residual against the layer's own output Ỹ − X̂W_mᵀ = Y_t − output
                Y = self._batch["targets"][name]
                dtype = torch.promote_types(torch.promote_types(Y.dtype, output.dtype), torch.float32)
                Y = self.mixed_targets(name, X, Y.to(dtype)) - output.to(dtype)  # float32 also after 16-bit forwards
            group = self.input_group[name]
            first = group not in self._seen
            if first:
                self._seen[group] = (name, X)  # held until the block's forward ends: no address reuse
            elif not _same_tensor(X, self._seen[group][1]):
                raise ValueError(f"layers '{self._seen[group][0]}' and '{name}' are declared to read the same "
                                 f"input (the adapter's shared_inputs) but received different tensors: fix "
                                 f"the adapter, or calibrate with share_statistics=False")
            folds = {"folds": self._batch["folds"]} if self._batch["folds"] is not None else {}
            sums = self.task_sums if self.requirements.normalize else self.sums
            sums[name].add(X, Y, weight=self._batch["weights"][source], with_H=first, **folds)
            self._gathered(name)
        return hook

    def _norm_hook(self, name: str):
        def hook(norm: nn.LayerNorm, args, output):
            self.norms[name].add(args[0], self._batch["targets"][name], self._batch["weights"]["self"])
            self._gathered("norm:" + name)
        return hook

    def mixed_targets(self, name: str, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The targets at inputs α X^e + (1−α) X̂ (α = requirements.interp): expert t's layer is linear, so they
        are α Y_t + (1−α) (X̂ W_tᵀ + b_t), per task's rows. X: (batch, tokens, in), Y: (batch, tokens, out)."""
        alpha = self.requirements.interp
        if alpha == 1.0:
            return Y
        tasks = self._batch["tasks"].to(Y.device)
        mixed = alpha * Y
        for t in tasks.unique().tolist():
            W_t, b_t = self.layer(t, self.step.prefix + name, Y.device)
            rows = (tasks == t).nonzero().flatten()
            own = nn.functional.linear(X[rows].to(Y.dtype), W_t.to(Y.dtype), None if b_t is None else b_t.to(Y.dtype))
            mixed[rows] += (1 - alpha) * own
        return mixed

    def fold_task(self, w_t: float, placement: Placement) -> None:
        """Add the task just gathered to the step's totals, scaled by w_t / ‖H_t‖_F so that each task counts by
        its weight whatever the size of its features there (normalize). Layers that share an H share its
        scale. Under DDP the norm is of H_t summed over ranks."""
        scales = {}
        for name, sums in self.task_sums.items():
            owner = self.input_group[name]
            if owner not in scales:
                H_t = self.task_sums[owner].H
                if distributed():
                    H_t = H_t.clone()
                    placement.all_reduce_(H_t)
                norm = float(torch.linalg.matrix_norm(H_t))
                scales[owner] = w_t / norm if norm > 0 else 0.0
            self.sums[name].add_scaled(sums, scales[owner])
        for sums in self.task_sums.values():
            sums.reset()

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the sums hold (to sum over ranks before the solve)."""
        return [buf for stats in [*self.sums.values(), *self.norms.values()] for buf in stats.buffers()]

    def close(self) -> None:
        """Remove the hooks (the step's forwards are done)."""
        for h in self.hooks:
            h.remove()
        self.hooks, self._batch, self._seen, self._ran = [], {}, {}, set()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b view the same memory the same way (b is alive, so its address is not reused)."""
    return (a.data_ptr(), a.shape, a.stride(), a.dtype, a.device) == (b.data_ptr(), b.shape, b.stride(), b.dtype,
                                                                      b.device)
