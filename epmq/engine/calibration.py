"""Step-wise calibration of a merged model as a LightningModule: one fit epoch = one schedule step.

The schedule (epmq.engine.schedule) lists stages, their blocks and each block's steps; a step is a group
of linear layers solved together. For step k of block i of stage s:

    setup("fit")        one pass over the calibration loader: each batch's task ids, the tokens n_t
                        of every task (per stage, masks applied, summed over ranks), DDP checks;
                        steps finished by an earlier run (resume) are written into the model
    epoch start         statistics for the step's layers (H, and C when the solver needs targets)
    training_step(b)    on a block's first step, capture block i's inputs X̂ for batch b from the
                        stage's own forward (epmq.engine.capture: earlier blocks replayed, never block 0's
                        arguments reused); run the block: hooks add H += w X̂ᵀX̂ and
                        C += w ỸᵀX̂ (Ỹ = Y_t − b_m, the experts' outputs from ExpertActivationCache),
                        w = w_t / n_t per real token, 0 on padding
    last batch          all-reduce H, C over ranks; the solver turns (H, C, W_m) into Q; Q is
                        written into the block; per-layer metrics are logged; after the block's
                        last step, the quantized block runs once more to give the next block its
                        inputs

The module never holds experts: the solver decides whether expert targets are needed, and the
ExpertActivationCache callback (registered through configure_callbacks) computes them from each
expert's weights of the current block only.

DDP: every rank iterates the whole (unshuffled, unsharded) calibration loader and owns the batches
with batch_idx % world_size == rank, so samples are split exactly (DistributedSampler's padding
repeats samples and biases H) and every rank runs the same number of steps (Lightning runs a
collective every step under DDP: uneven counts hang). Build the Trainer with
use_distributed_sampler=False. All ranks solve the same summed statistics.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from contextlib import ExitStack, contextmanager
from typing import Callable, Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from callbacks.expert_cache import ExpertActivationCache
from epmq.engine.adapters import ModelAdapter
from epmq.engine.capture import BlockInputs, Trace, replaying_recorded, run_block, walk_to
from epmq.io.fingerprint import loader_fingerprint
from epmq.core.norm_affine import NormStatistics
from epmq.io.pool import ExpertPool
from epmq.core.precision import tf32
from epmq.io.quantized_layer import QuantizedLayer
from epmq.engine.schedule import Step, build_schedule
from epmq.core.solvers import Requirements
from epmq.core.stats import FoldedStatistics, LayerStatistics


@dataclasses.dataclass
class FinishedStep:
    """A solved step, as the module keeps it and a resumed run reloads it.

    results: full layer name -> QuantizedLayer (packed codes and grids, on CPU; .weight() is the
    solver's weight, bit for bit); metrics: full layer name -> logged numbers; norms: full norm name ->
    {"weight": γ, "bias": β} (float32, CPU) for the LayerNorms the step calibrated (calibrate_norms).
    """

    index: int
    label: str
    layers: tuple[str, ...]
    results: dict[str, QuantizedLayer]
    metrics: dict[str, dict[str, float]]
    norms: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


class BlockwiseCalibration(L.LightningModule):
    """Quantize a merged model step by step with a solver (epmq.core.solvers: RTN, GPTQ, EPMQ).

    Args:
        model: the merged model (e.g. a transformers CLIPVisionModel); quantized in place.
        adapter: the family's ModelAdapter (epmq.families.base.adapter_for(model) finds it by class).
        solver: an epmq.core.solvers object (chosen by `_target_` in conf/quant).
        task_names: the tasks; a batch's "task" entry indexes into this list.
        experts: an epmq.io.pool.ExpertPool, or an ExpertActivationCache to share between fits
            (keep=True); needed when the solver needs expert targets.
        task_weights: w_t per task (mapping name -> w, or a sequence in task order); default 1 each.
            Each real token of task t weighs w_t / n_t, so a task counts by w_t whatever its size.
        true_sequential: one step per layer group (GPTQ's true-sequential); None: the family's default.
        offload_blocks: keep the blocks on the CPU and move each to the device only for its steps
            (the rest of the model stays on the device). "auto": only on a GPU whose free memory is
            less than twice the model's size (the other half is for statistics and hidden states).
        cache_device: where hidden states wait between steps (None: the device).
        shard_batches: True: every rank's loader yields the full calibration set and this module
            keeps batch b on rank b % world_size; False: the loader is already sharded by rank.
        share_statistics: layers that read the same input tensor (the adapter's shared_inputs:
            q/k/v, gate/up) share one H, accumulated once; False gives each layer its own (the same
            numbers, computed again; for comparisons).
        tf32: allow TF32 products in block forwards (CUDA). Mixed precision is the trainer's
            (Trainer(precision="bf16-mixed")): it covers the merged and the experts' forwards alike.
            Statistics are multiplied in float32 without either (epmq.core.precision).
        resume: steps finished by an interrupted run (epmq.io.step_store), in schedule order.
        selection: for a solver that chooses each step's anchor on held-out samples (BlockChoiceEPMQ):
            selection(device) -> the task heads' mean loss on the selection samples (nats) of this model as
            it stands, its forwards on `device`.

    Batches: dicts with the family's input keys and "task" (batch,) ints. After fit: `finished`
    (FinishedStep per step), `quant_results` (full layer name -> QuantizedLayer) and `layer_metrics`.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, solver, task_names: Sequence[str], experts=None,
                 task_weights: Mapping[str, float] | Sequence[float] | None = None,
                 true_sequential: bool | None = None, offload_blocks: bool | str = False,
                 cache_device: str | torch.device | None = None, shard_batches: bool = True,
                 share_statistics: bool = True, tf32: bool = False,
                 resume: Sequence[FinishedStep] = (), selection: Callable[[torch.device], float] | None = None):
        super().__init__()
        if not isinstance(solver.requirements if hasattr(solver, "requirements") else None, Requirements):
            raise ValueError(f"solver must be an epmq.core.solvers object (RTN, GPTQ, EPMQ), got {type(solver).__name__}")
        task_names = list(task_names)
        if not task_names or len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be a non-empty list of distinct names, got {task_names}")
        # Not a registered submodule: Lightning would move the whole model to the device before
        # setup, and this module places it itself (a block at a time with offload_blocks). DDP wraps
        # only a module with a trainable parameter: a placeholder that nothing ever trains.
        self.__dict__["model"] = model
        self._ddp_placeholder = nn.Parameter(torch.zeros(1))
        self.solver = solver
        self.requirements: Requirements = solver.requirements  # what the engine gathers and passes for it
        if not isinstance(adapter, ModelAdapter):
            raise ValueError(f"adapter must be an epmq.engine.adapters.ModelAdapter (the family's: "
                             f"epmq.families.base.adapter_for(model)), got {type(adapter).__name__}")
        self.adapter = adapter
        self.task_names = task_names
        self.task_weights = _task_weights(task_weights, task_names)  # (T,) float64
        self.true_sequential = self.adapter.true_sequential if true_sequential is None else bool(true_sequential)
        if offload_blocks not in (True, False, "auto"):
            raise ValueError(f"offload_blocks must be true, false or auto, got {offload_blocks!r}")
        self.offload_blocks = offload_blocks  # "auto" is decided in setup, once the device is known
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.shard_batches = bool(shard_batches)
        self.share_statistics = bool(share_statistics)
        self.tf32 = bool(tf32)
        self.automatic_optimization = False
        self.label = ""  # shown before the step in the progress bar, e.g. which anchor candidate
        self.stages = self.adapter.stages(model)
        self.schedule: list[Step] = build_schedule(self.adapter, model, self.true_sequential)
        needs_pool = self.requirements.targets or self.requirements.base
        self.experts = _expert_cache(experts) if needs_pool else None
        if needs_pool and self.experts is None:
            raise ValueError(f"{solver!r} needs expert targets (or the base model's layers): pass "
                             f"experts=ExpertPool(...) or an ExpertActivationCache")
        self._resume = list(resume)
        self.selection = selection
        self._selection_replay: tuple = (None, [])  # ((stage, block), recorded outputs of the block before it)

        # calibration state: plain attributes, never part of the state dict
        self.step_index = 0
        self.finished: list[FinishedStep] = []
        self.batch_tasks: list[torch.Tensor] = []          # per batch: (batch,) task index of each sample
        self.task_tokens: dict[tuple[int, str], torch.Tensor] = {}  # (stage, source) -> (T,) n_t, all ranks
        self.statistics: dict[str, LayerStatistics] = {}
        self._traces: dict[int, Trace] = {}               # batch -> where it stands in the model
        self._inputs: dict[int, BlockInputs] = {}         # batch -> current block's inputs X̂
        self._weights: dict[str, torch.Tensor] = {}       # source -> (batch, tokens) w_t / n_t, 0 on padding
        self._targets: dict[str, torch.Tensor] = {}       # layer -> (batch, tokens, out) expert outputs Y_t
        self._input_group: dict[str, str] = {}            # layer -> first layer of the step reading its input
        self._seen: dict[str, tuple[str, torch.Tensor]] = {}  # input group -> (layer, X̂) added to H this batch
        self._fold_ids: torch.Tensor | None = None        # (batch,) fold of each sample (cross-validating solvers)
        self._task_statistics: dict[str, LayerStatistics] = {}  # normalize: the current task's own sums
        self.norm_statistics: dict[str, NormStatistics] = {}   # calibrate_norms: per LayerNorm of the block
        self._batch_idx = -1                              # the batch the hooks are adding
        self._hooks: list = []
        self._num_batches = 0

    # -- Lightning plumbing ---------------------------------------------------------------
    def configure_optimizers(self):
        return None  # nothing is trained: manual optimization, no optimizer

    def configure_callbacks(self):
        return [self.experts] if self.experts is not None else []

    def forward(self, **inputs):
        return self.model(**inputs)

    def train(self, mode: bool = True):
        """Lightning switches to train mode for fit; the transformer stays in eval (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def current_step(self) -> Step:
        return self.schedule[min(self.step_index, len(self.schedule) - 1)]

    @property
    def remaining_steps(self) -> int:
        return len(self.schedule) - len(self._resume)

    @property
    def quant_results(self) -> dict[str, QuantizedLayer]:
        return {k: r for s in self.finished for k, r in s.results.items()}

    @property
    def step_strengths(self) -> list[tuple[str, float]]:
        """(step label, anchor strength chosen for it) per finished step of a per-block choice (BlockChoiceEPMQ)."""
        return [(s.label, next(iter(s.metrics.values()))["anchor_strength"]) for s in self.finished if s.metrics]

    @property
    def layer_metrics(self) -> dict[str, dict[str, float]]:
        return {k: m for s in self.finished for k, m in s.metrics.items()}

    @property
    def device_(self) -> torch.device:
        """Where calibration computes: the trainer's device (the model's when no trainer runs it)."""
        if self._trainer is None:
            return next(self.model.parameters()).device
        return self.trainer.strategy.root_device

    @contextmanager
    def forward_precision(self):
        """Context for block forwards: the trainer's precision (e.g. bf16-mixed autocast, which
        Lightning applies to training_step only, so the expert cache's forwards need it too) and
        TF32 when allowed."""
        with ExitStack() as stack:
            if self._trainer is not None:
                stack.enter_context(self.trainer.precision_plugin.forward_context())
            if self.tf32:
                stack.enter_context(tf32(True))
            yield

    def owns(self, batch_idx: int) -> bool:
        """Whether this rank calibrates on batch `batch_idx` (exact round-robin split)."""
        return not self.shard_batches or batch_idx % self.trainer.world_size == self.trainer.global_rank

    def block(self, step: Step) -> nn.Module:
        return self.adapter.blocks(self.model, step.stage)[step.block]

    def calibration_loader(self):
        """The train loader as the datamodule (or fit's train_dataloaders) defines it."""
        if self.trainer.datamodule is not None:
            return self.trainer.datamodule.train_dataloader()
        source = self.trainer.fit_loop._data_source  # fit(model, train_dataloaders=...)
        if not source.is_defined():
            raise ValueError("BlockwiseCalibration needs calibration batches: pass a datamodule or "
                             "train_dataloaders to trainer.fit")
        return source.dataloader()

    # -- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.remaining_steps:
            raise ValueError(f"Trainer(max_epochs={max_epochs}) is less than the {self.remaining_steps} steps "
                             f"left in the schedule: one epoch calibrates one step")
        # Both are by design here: no optimizer, and a transformer kept in eval mode.
        warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        self.model.eval()
        self._place_model()
        self.apply_finished(self._resume)
        self.step_index = len(self.finished)
        self._traces, self._inputs = {}, {}
        self.check_loaders_across_ranks()  # even for rtn: uneven step counts would hang DDP
        self.count_tokens()

    def _place_model(self) -> None:
        """The model on the device; with offload_blocks, its blocks stay on the CPU until their turn.

        Spawned DDP processes receive the model's CPU tensors in shared memory: each rank writes its
        quantized weights, so each takes a private copy first (else one rank's Q would become another
        rank's W_m).
        """
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.device.type == "cpu" and t.is_shared():
                t.data = t.data.clone()
        device = self.device_
        if self.offload_blocks == "auto":
            self.offload_blocks = device.type == "cuda" and 2 * _bytes(self.model) > torch.cuda.mem_get_info(device)[0]
        if self.offload_blocks and self.requirements.per_step_choice:
            raise ValueError("anchor.select=block scores the whole model for every candidate, so the model must stay "
                             "on the device: set calibration.offload_blocks=false (or use anchor.select=run)")
        if not self.offload_blocks:
            self.model.to(device)
            return
        blocks = [self.adapter.blocks(self.model, s) for s in self.stages]
        held = [list(b) for b in blocks]
        for b in blocks:  # detach the blocks, move the rest, put them back on the CPU
            for j in range(len(b)):
                b[j] = nn.Identity()
        self.model.to(device)
        for b, mods in zip(blocks, held):
            for j, mod in enumerate(mods):
                b[j] = mod.to("cpu")

    def apply_finished(self, steps: Sequence[FinishedStep]) -> None:
        """Write the quantized weights of already solved steps into the model (resume)."""
        for k, done in enumerate(steps):
            step = self.schedule[k] if k < len(self.schedule) else None
            if step is None or (done.index, done.label, tuple(done.layers)) != (step.index, step.label, step.layers):
                raise ValueError(f"resumed step {k} ({done.label}: {list(done.layers)}) does not match this "
                                 f"schedule ({step.label + ': ' + str(list(step.layers)) if step else 'none'})")
            block = self.block(step)
            for name in step.layers:
                record = done.results[step.prefix + name]
                linear = block.get_submodule(name)
                with torch.no_grad():
                    linear.weight.copy_(record.weight().to(linear.weight))  # the solver's weight, bit for bit
                    if record.bias is not None:
                        linear.bias.copy_(record.bias.to(linear.bias))
            for name, params in done.norms.items():  # LayerNorms the step calibrated
                norm = self.model.get_submodule(name)
                with torch.no_grad():
                    norm.weight.copy_(params["weight"].to(norm.weight))
                    norm.bias.copy_(params["bias"].to(norm.bias))
            self.finished.append(done)

    def count_tokens(self) -> None:
        """One pass over the loader: task ids per batch, n_t per (stage, token source), batch count."""
        self.batch_tasks = []
        counts: dict[tuple[int, str], torch.Tensor] = {}
        T = len(self.task_names)
        for b, batch in enumerate(self.calibration_loader()):
            tasks = self.check_tasks(batch, b)
            self.batch_tasks.append(tasks)
            if not self.owns(b):
                continue
            for s, stage in enumerate(self.stages):
                for source in ("self", "context") if stage.context_layers else ("self",):
                    n = self._token_mask(stage, batch, source).sum(1).to(torch.float64)
                    counts.setdefault((s, source), torch.zeros(T, dtype=torch.float64)).index_add_(0, tasks, n)
        self._num_batches = len(self.batch_tasks)
        if self._num_batches == 0:
            raise ValueError("the calibration loader yielded no batches")
        for s, stage in enumerate(self.stages):  # every rank reduces the same keys, in the same order
            for source in ("self", "context") if stage.context_layers else ("self",):
                counts.setdefault((s, source), torch.zeros(T, dtype=torch.float64))
        for key in sorted(counts):
            self.all_reduce_(counts[key])
        self.task_tokens = counts
        if self.requirements.statistics:
            empty = [t for t, n, w in zip(self.task_names, counts[(0, "self")], self.task_weights) if n == 0 and w > 0]
            if empty:
                raise ValueError(f"task(s) {empty} have no calibration samples (task_names={self.task_names})")
        if self.normalize:
            self.check_task_order()

    def check_task_order(self) -> None:
        """normalize folds each task's statistics when its batches end: every batch must hold one
        task and each task's batches must come together (as epmq.families.tasks makes them)."""
        if not self.shard_batches and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("normalize=true needs shard_batches=True under DDP (every rank folds each task at "
                             "the same batch)")
        seen, last = set(), None
        for b, tasks in enumerate(self.batch_tasks):
            ids = tasks.unique().tolist()
            if len(ids) != 1:
                raise ValueError(f"normalize=true needs batches that hold one task each; calibration batch {b} "
                                 f"holds tasks {[self.task_names[t] for t in ids]}")
            if ids[0] != last and ids[0] in seen:
                raise ValueError(f"normalize=true needs each task's batches together; task "
                                 f"'{self.task_names[ids[0]]}' comes back at calibration batch {b}")
            seen.add(ids[0])
            last = ids[0]

    def _token_mask(self, stage, batch, source: str) -> torch.Tensor:
        """(batch, tokens) float64 mask of the tokens that count (epmq.engine.adapters)."""
        return self.adapter.token_mask(self.model, stage, batch, source).to("cpu", torch.float64)

    def check_loaders_across_ranks(self) -> None:
        """Under DDP: equal batch counts on all ranks, and identical loaders when shard_batches."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count, fingerprint = loader_fingerprint(self.calibration_loader())
        mine = torch.tensor([count, fingerprint], dtype=torch.float64, device=self.device_)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        counts = [int(x[0]) for x in every]
        if len(set(counts)) > 1:
            raise ValueError(f"ranks see different numbers of calibration batches {counts}: Lightning runs "
                             f"a collective every step, so uneven loaders hang; give every rank the full "
                             f"unsharded loader and BlockwiseCalibration(shard_batches=True)")
        if self.shard_batches and any(not torch.equal(x, every[0]) for x in every):
            raise ValueError("the train loader differs between ranks (already sharded?) but shard_batches=True "
                             "would shard it again: give every rank the full calibration loader, or pass "
                             "shard_batches=False (with equal batch counts per rank)")

    def check_tasks(self, batch, batch_idx: int) -> torch.Tensor:
        """(batch,) int64 task indices of a batch; ValueError when missing or out of range."""
        if not isinstance(batch, Mapping) or "task" not in batch:
            raise ValueError(f"calibration batch {batch_idx} must be a dict with a 'task' entry")
        tasks = torch.as_tensor(batch["task"]).reshape(-1).to("cpu", torch.int64)
        if tasks.numel() and (tasks.min() < 0 or tasks.max() >= len(self.task_names)):
            raise ValueError(f"calibration batch {batch_idx}: task index {tasks.max().item()} out of range "
                             f"for task_names={self.task_names}")
        return tasks

    # -- one step: statistics -------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.model.eval()
        if self.step_index >= len(self.schedule):
            return
        step = self.current_step
        block = self.block(step)
        if self.offload_blocks and step.first:
            block.to(self.device_)
        if not self.requirements.statistics:
            return
        with_C = self.requirements.targets
        self.statistics, self._input_group, self._task_statistics = {}, {}, {}
        shared = step.stage.shared_inputs if self.share_statistics else ()
        means = {"means": True} if self.requirements.bias else {}
        for name in step.layers:
            lin = block.get_submodule(name)
            group = next((g for g in shared if name in g), (name,))
            owner = next(n for n in group if n in step.layers)  # the group's first layer in this step
            self._input_group[name] = owner
            for sums in (self.statistics, self._task_statistics) if self.normalize else (self.statistics,):
                sums[name] = self._statistics(lin.in_features, lin.out_features if with_C else None,
                                              device=self.device_, residual=with_C,
                                              share_H_with=sums.get(owner), **means)
            self._hooks.append(lin.register_forward_hook(self._statistics_hook(name, step.stage.source(name))))
        self.norm_statistics = {}
        norms = step.stage.norms if self.requirements.norms and step.first else ()
        for name in norms:  # the block's LayerNorms; at λ = inf no targets: they go to the anchor
            norm = block.get_submodule(name)
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                raise ValueError(f"calibrate_norms: '{step.prefix}{name}' is {type(norm).__name__}, not an nn.LayerNorm "
                                 f"with weight and bias")
            self.norm_statistics[name] = NormStatistics(norm.normalized_shape[-1], norm.eps, device=self.device_)
            if name in self.target_names(step):
                self._hooks.append(norm.register_forward_hook(self._norm_hook(name)))

    def target_names(self, step: Step) -> tuple[str, ...]:
        """What the experts' targets are needed for in `step`: its linear layers, and on a block's first step
        the block's LayerNorms when the solver calibrates them (with expert targets)."""
        norms = self.requirements.norms and self.requirements.targets and step.first
        return step.layers + (step.stage.norms if norms else ())

    def _norm_hook(self, name: str):
        def hook(norm: nn.LayerNorm, args, output):
            self.norm_statistics[name].add(args[0], self._targets[name], self._weights["self"])
        return hook

    @property
    def normalize(self) -> bool:
        """Whether each task's statistics join the total divided by the norm of its Gram (EPMQ.normalize)."""
        return self.requirements.normalize and self.requirements.statistics

    def _statistics(self, *args, **kwargs):
        """LayerStatistics, or FoldedStatistics when the solver chooses by cross-validation (`folds`)."""
        folds = self.requirements.folds
        return FoldedStatistics(*args, folds=folds, **kwargs) if folds else LayerStatistics(*args, **kwargs)

    def _statistics_hook(self, name: str, source: str):
        def hook(linear: nn.Linear, args, output):
            X = args[0]  # (batch, tokens, in): the merged layer's inputs X̂
            Y = None
            if self.requirements.targets:
                # Y_t = W_t X^e + b_t (batch, tokens, out); the merged layer keeps b_m, so the target
                # is Ỹ = Y_t − b_m and its residual against the layer's own output Ỹ − X̂W_mᵀ = Y_t − output
                Y = self._targets[name]
                dtype = torch.promote_types(torch.promote_types(Y.dtype, output.dtype), torch.float32)
                Y = self.mixed_targets(name, X, Y.to(dtype)) - output.to(dtype)  # float32 also after 16-bit forwards
            group = self._input_group[name]
            first = group not in self._seen
            if first:
                self._seen[group] = (name, X)  # held until the block's forward ends: no address reuse
            elif not _same_tensor(X, self._seen[group][1]):
                raise ValueError(f"layers '{self._seen[group][0]}' and '{name}' are declared to read the same "
                                 f"input (the adapter's shared_inputs) but received different tensors: fix "
                                 f"the adapter, or calibrate with share_statistics=False")
            folds = {"folds": self._fold_ids} if self._fold_ids is not None else {}
            sums = self._task_statistics if self.normalize else self.statistics
            sums[name].add(X, Y, weight=self._weights[source], with_H=first, **folds)
        return hook

    def mixed_targets(self, name: str, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """The targets at inputs α X^e + (1−α) X̂ (EPMQ.interp = α): expert t's layer is linear, so they
        are α Y_t + (1−α) (X̂ W_tᵀ + b_t), per task's rows. X: (batch, tokens, in), Y: (batch, tokens, out)."""
        alpha = self.requirements.interp
        if alpha == 1.0:
            return Y
        tasks = self.batch_tasks[self._batch_idx].to(Y.device)
        key = self.current_step.prefix + name
        mixed = alpha * Y
        for t in tasks.unique().tolist():
            W_t, b_t = self.experts.layer(t, key, Y.device)
            rows = (tasks == t).nonzero().flatten()
            own = nn.functional.linear(X[rows].to(Y.dtype), W_t.to(Y.dtype), None if b_t is None else b_t.to(Y.dtype))
            mixed[rows] += (1 - alpha) * own
        return mixed

    def fold_task(self, t: int) -> None:
        """Add task t's statistics (just gathered) to the step's totals, scaled by w_t / ‖H_t‖_F so that
        each task counts by its weight w_t whatever the size of its features there (EPMQ.normalize).
        Layers that share an H share its scale. Under DDP the norm is of H_t summed over ranks."""
        scales = {}
        for name, sums in self._task_statistics.items():
            owner = self._input_group[name]
            if owner not in scales:
                H_t = self._task_statistics[owner].H
                if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    H_t = H_t.clone()
                    self.all_reduce_(H_t)
                norm = float(torch.linalg.matrix_norm(H_t))
                scales[owner] = float(self.task_weights[t]) / norm if norm > 0 else 0.0
            self.statistics[name].add_scaled(sums, scales[owner])
        for sums in self._task_statistics.values():
            sums.reset()

    @torch.no_grad()
    def training_step(self, batch, batch_idx: int):
        step = self.current_step
        if self.requirements.statistics and self.owns(batch_idx) and self.step_index < len(self.schedule):
            if batch_idx >= len(self.batch_tasks) or not torch.equal(self.check_tasks(batch, batch_idx),
                                                                     self.batch_tasks[batch_idx]):
                raise ValueError(f"calibration batch {batch_idx} differs from the one seen in setup: the "
                                 f"train loader must be deterministic (shuffle=False) and keep its samples "
                                 f"(Trainer(use_distributed_sampler=False))")
            device = self.device_
            if batch_idx not in self._inputs:  # a block's first step (or the first after resuming)
                with self.forward_precision():
                    self._inputs[batch_idx] = self.inputs_to_cache(self.walk(batch_idx, batch, step))
            tasks = self.batch_tasks[batch_idx]
            self._weights = {}
            for (s, source), n_t in self.task_tokens.items():
                if s == step.stage_index:
                    per_sample = (self.task_weights / n_t.clamp_min(1))[tasks]  # w_t / n_t, (batch,)
                    mask = self._token_mask(step.stage, batch, source)
                    self._weights[source] = (per_sample[:, None] * mask).to(device)
            if self.requirements.targets:
                self._targets = self.experts.targets(batch_idx)
            folds = self.requirements.folds
            if folds:  # consecutive samples alternate between folds: each task's samples split evenly
                n = len(self.batch_tasks[batch_idx])
                self._fold_ids = (batch_idx + torch.arange(n)) % folds
            self._batch_idx = batch_idx
            with self.forward_precision():
                run_block(self.block(step), self._inputs[batch_idx].to(device))
            self._targets, self._seen = {}, {}
        if self.normalize and self.step_index < len(self.schedule):
            t = int(self.batch_tasks[batch_idx][0])  # setup checked: one task per batch, tasks in turn
            if batch_idx == self._num_batches - 1 or int(self.batch_tasks[batch_idx + 1][0]) != t:
                self.fold_task(t)  # on every rank at the same batch (the loader is the same everywhere)
        if batch_idx == self._num_batches - 1:
            self.finish_step()
        return None

    def walk(self, batch_idx: int, batch, step: Step) -> BlockInputs:
        """Block inputs X̂ of `step`'s block for one batch (epmq.engine.capture.walk_to over this model)."""
        trace = self._traces.setdefault(batch_idx, Trace())

        def run(stage, i, inputs):  # only a resumed run walks through earlier (quantized) blocks
            block = self.adapter.blocks(self.model, stage)[i]
            if self.offload_blocks:
                block.to(self.device_)
            out = run_block(block, inputs)
            if self.offload_blocks:
                block.to("cpu")
            return out

        return walk_to(self.adapter, self.model, self.stages, trace, batch, (step.stage_index, step.block),
                       self.device_, run, self.to_cache)

    def to_cache(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor kept between steps, on cache_device when one is set."""
        return t if self.cache_device is None else t.to(self.cache_device)

    def inputs_to_cache(self, inputs: BlockInputs) -> BlockInputs:
        return inputs if self.cache_device is None else inputs.to(self.cache_device)

    # -- one step: solve ------------------------------------------------------------------------
    def all_reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum tensors in place over all ranks (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).to(self.device_)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t))
            offset += t.numel()

    @torch.no_grad()
    def finish_step(self) -> None:
        """Solve the current step's layers, write Q, log, and move the batches past a finished block."""
        step = self.current_step
        for h in self._hooks:
            h.remove()
        self._hooks = []
        buffers = [buf for stats in [*self.statistics.values(), *self.norm_statistics.values()] for buf in stats.buffers()]
        if buffers:
            self.all_reduce_(*buffers)
        block = self.block(step)
        if self.requirements.per_step_choice:
            results, metrics = self.choose_step(step, block)
        else:
            results, metrics = self.solve_layers(step, block, self.solver)
        for name, layer_metrics in metrics.items():
            for key, value in layer_metrics.items():
                self.log(f"calib/{step.label}/{name[len(step.prefix):]}/{key}", value, on_step=False, on_epoch=True,
                         batch_size=1, sync_dist=True)
        norms = {}
        for name, stats in self.norm_statistics.items():  # the LayerNorms feeding this block's layers
            norm = block.get_submodule(name)
            base = None
            if self.requirements.base:
                base = self.experts.layer("base", step.prefix + name, norm.weight.device)
            gamma, beta = self.solver.norm_affine(stats, norm.weight.detach(), norm.bias.detach(), base)
            norm.weight.copy_(gamma.to(norm.weight))
            norm.bias.copy_(beta.to(norm.bias))
            norms[step.prefix + name] = {"weight": gamma.cpu(), "bias": beta.cpu()}
        self.statistics, self.norm_statistics = {}, {}
        self.finished.append(FinishedStep(step.index, step.label, step.layers, results, metrics, norms))
        if step.last:
            with self.forward_precision():
                for b, inputs in self._inputs.items():  # the quantized block's output feeds the next block
                    self._traces[b].advance(run_block(block, inputs.to(self.device_)), self.to_cache)
            self._inputs, self._selection_replay = {}, (None, [])
            if self.offload_blocks:
                block.to("cpu")
        self.step_index += 1
        if self.step_index == len(self.schedule):
            self._traces = {}
            self.trainer.should_stop = True

    def solve_layers(self, step: Step, block: nn.Module, solver) -> tuple[dict, dict]:
        """Solve the step's layers with `solver` from the gathered statistics and write Q (and a calibrated
        bias) into the block. Returns (full layer name -> QuantizedLayer, full layer name -> metrics)."""
        results, metrics = {}, {}
        for name in step.layers:
            linear = block.get_submodule(name)
            solution = solver.solve(linear.weight.detach(), self.statistics.get(name),
                                    **self.layer_context(step, name, linear))
            linear.weight.copy_(solution.result.weight.to(linear.weight.dtype))
            if solution.bias is not None:
                linear.bias.copy_(solution.bias.to(linear.bias))
            if solver.requirements.codes:  # an FP solver (RelaxedEPMQ) leaves no codes
                results[step.prefix + name] = QuantizedLayer.from_result(solution.result, solver.spec.bits,
                                                                         bias=solution.bias)
            metrics[step.prefix + name] = solution.metrics
        return results, metrics

    def choose_step(self, step: Step, block: nn.Module) -> tuple[dict, dict]:
        """The step's layers at each of the solver's candidate strengths in turn, scored by `selection` on the
        model as it then stands; the candidate with the least loss is written back (ties: the stronger anchor,
        listed first). Each layer's metrics gain anchor_strength and select_nll (the chosen model's loss)."""
        if self.selection is None:
            raise ValueError(f"{self.solver!r} chooses each step's anchor on the selection samples: give "
                             f"BlockwiseCalibration a `selection` function (epmq.jobs.steps.calibrate does)")
        merged = {name: block.get_submodule(name).weight.detach().clone() for name in step.layers}
        best = None
        for k, strength in enumerate(self.solver.candidates):
            self.show_progress(f"{self.progress_description()} · scoring λ = {strength:g} "
                               f"({k + 1}/{len(self.solver.candidates)})")
            for name, W_m in merged.items():  # every candidate starts from the merged weights
                block.get_submodule(name).weight.copy_(W_m)
            results, metrics = self.solve_layers(step, block, self.solver.at(strength))
            with self.forward_precision():
                loss = torch.tensor([self.score_candidate(step)], dtype=torch.float64)
            # every rank scores the same model on the same samples; averaging makes the choice identical on all
            # of them even where nondeterministic kernels differ in the last bits
            self.all_reduce_(loss)
            loss = float(loss) / self.trainer.world_size
            if best is None or loss < best[0]:
                best = (loss, strength, results, metrics)
        loss, strength, results, metrics = best
        for name in step.layers:
            block.get_submodule(name).weight.copy_(results[step.prefix + name].weight().to(merged[name]))
        return results, {k: {**m, "anchor_strength": strength, "select_nll": loss} for k, m in metrics.items()}

    def layer_context(self, step: Step, name: str, linear: nn.Linear) -> dict:
        """What the solver needs of a layer besides W_m and its statistics: its bias (calibrate_bias)
        and the base model's layer (an extrapolated anchor), as keyword arguments of solve."""
        context = {}
        if self.requirements.bias and linear.bias is not None:
            context["bias"] = linear.bias.detach()
        if self.requirements.base:  # the constructor made sure there is a pool
            context["base"] = self.experts.layer("base", step.prefix + name, linear.weight.device)
        return context

    def score_candidate(self, step: Step) -> float:
        """`selection` on the model as it stands. The blocks before the step's block are fixed while its
        candidates are scored: the first scoring records what the last of them returns on every forward, the
        others replay it (epmq.engine.capture.replaying_recorded) with the stem skipped, so those blocks run once per
        step instead of once per candidate."""
        if step.block == 0:
            return float(self.selection(self.device_))
        blocks = self.adapter.blocks(self.model, step.stage)
        key = (step.stage_index, step.block)
        if self._selection_replay[0] != key:
            outputs = []
            handle = blocks[step.block - 1].register_forward_hook(lambda module, args, output: outputs.append(output))
            try:
                loss = float(self.selection(self.device_))
            finally:
                handle.remove()
            self._selection_replay = (key, outputs)
            return loss
        with replaying_recorded(blocks, step.block, self._selection_replay[1]), \
                self.adapter.stem_skipped(self.model, step.stage):
            return float(self.selection(self.device_))

    def show_progress(self, text: str) -> None:
        """Put `text` on the progress bar now (for long work inside a step, where no batch starts)."""
        bar = getattr(getattr(self._trainer, "progress_bar_callback", None), "_train_progress_bar", None)
        if bar is not None:  # a TQDM bar that is showing
            bar.set_description(text)

    def progress_description(self, batch=None) -> str:
        """'block 2/4 · task mnist' (with the step's first layer when true-sequential)."""
        step = self.current_step
        blocks = len(self.adapter.blocks(self.model, step.stage))
        where = f"{step.stage.name} " if len(self.stages) > 1 else ""
        text = f"{where}block {step.block + 1}/{blocks}"
        if self.true_sequential:
            text += f" · {step.layers[0].rsplit('.', 1)[-1]}"
        if self.label:
            text = f"{self.label} · {text}"
        if isinstance(batch, Mapping) and "task" in batch:
            ids = torch.as_tensor(batch["task"]).reshape(-1).unique().tolist()
            names = [self.task_names[t] if 0 <= t < len(self.task_names) else str(t) for t in ids]
            text += f" · {'task' if len(names) == 1 else 'tasks'} {','.join(names)}"
        return text


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b view the same memory the same way (b is alive, so its address is not reused)."""
    return (a.data_ptr(), a.shape, a.stride(), a.dtype, a.device) == (b.data_ptr(), b.shape, b.stride(), b.dtype,
                                                                      b.device)


def _task_weights(task_weights, task_names) -> torch.Tensor:
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


def _expert_cache(experts):
    """An ExpertActivationCache for `experts` (a pool, or a cache to share between fits)."""
    if experts is None or isinstance(experts, ExpertActivationCache):
        return experts
    if isinstance(experts, ExpertPool):
        return ExpertActivationCache(experts)
    raise ValueError(f"experts must be an ExpertPool or an ExpertActivationCache, got {type(experts).__name__}")


def _bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
