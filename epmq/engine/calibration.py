"""Step-wise calibration of a merged model as a LightningModule: one fit epoch = one schedule step.

The loop reads like the GPTQ reference's `llama_sequential` (IST-DASLab/gptq); each line is one hook here:

    count n_t; place the model; write resumed steps     setup("fit")
    for each step (block i, or a layer group of it):    one fit epoch (epmq.engine.schedule)
        hooks on the step's layers                      on_train_epoch_start: accumulate.StepStatistics
        for each batch b:                               training_step(b)
            X̂_b = the block's inputs                        on the block's first step, from the stage's own
                                                            forward, earlier blocks replayed (capture.walk_to)
            Y_t = the experts' outputs                      targets.ExpertTargets, through the callback
                                                            callbacks.expert_cache.ExpertActivationCache
            block(X̂_b): H += w X̂ᵀX̂, C += w ỸᵀX̂              the hooks; w = w_t / n_t per real token, 0 on padding
                                                            (the forward stops once the step's layers have run)
        H, C summed over ranks; Q = solve(W_m, H, C)    finish_step (the epoch's last batch): the solver, or
        write Q; log                                    block_choice.StepChoice for a per-step anchor choice
        X̂ = block(X̂) after the block's last step        finish_step: the quantized block feeds the next one

The module holds no expert (the targets provider reads one block of one expert at a time) and no method name:
the solver's Requirements say what to gather. Devices, offloading and DDP shards are placement.Placement's.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, contextmanager
from typing import Mapping, Sequence

import lightning as L
import torch
from torch import nn

from epmq.core.precision import tf32
from epmq.core.solvers import Requirements, module_solver
from epmq.engine.accumulate import (StepGathered, StepStatistics, check_every_task, check_task_order, check_tasks,
                                    count_tokens)
from epmq.engine.accumulate import task_weights as task_weights_of
from epmq.engine.accumulate import token_mask, token_weights
from epmq.engine.adapters import ModelAdapter
from epmq.engine.block_choice import Selection, StepChoice
from epmq.engine.capture import BlockInputs, Trace, run_block, walk_to
from epmq.engine.placement import Placement
from epmq.engine.schedule import Step, build_schedule, describe_step, layer_names
from epmq.engine.solve import solve_layers, solve_norms
from epmq.engine.targets import ExpertTargets, StepView, provider
from epmq.io.pool import ExpertPool
from epmq.io.quantized_layer import QuantizedLayer
from epmq.io.step_store import FinishedStep


class BlockwiseCalibration(L.LightningModule):
    """Quantize a merged model step by step with a solver (epmq.core.solvers: RTN, GPTQ, EPMQ).

    Args:
        model: the merged model (e.g. a transformers CLIPVisionModel); quantized in place.
        adapter: the family's ModelAdapter (epmq.families.base.adapter_for(model) finds it by class).
        solver: what turns a layer's statistics into Q; its `requirements` say what the engine gathers.
        task_names: the tasks; a batch's "task" entry indexes into this list.
        targets: an ExpertTargets (shared between fits, it replays recorded targets) or an ExpertPool to make one
            from, when the solver needs the experts' targets or the base model's layers. The Trainer's
            callbacks must then include callbacks.expert_cache.ExpertActivationCache(module.targets).
        task_weights: w_t per task (name -> w, or a sequence in task order; default 1 each): a real token of
            task t weighs w_t / n_t, so a task counts by w_t whatever its size.
        true_sequential: one step per layer group (GPTQ's true-sequential); None: the family's default.
        offload_blocks, cache_device, shard_batches: epmq.engine.placement.Placement's.
        share_statistics: layers that read one input (the adapter's shared_inputs) share one H (False: each its own).
        tf32: TF32 products in block forwards (CUDA); mixed precision is the trainer's. Statistics are multiplied
            in float32 either way (epmq.core.precision).
        resume: steps finished by an interrupted run (epmq.io.step_store), in schedule order.
        selection: selection(device) -> the task heads' mean loss (nats) on the selection samples of the model
            as it stands, for a solver whose anchor is chosen per step (requirements.per_step_choice).

    Batches: dicts with the family's input keys and "task" (batch,) ints. After fit: `finished`
    (FinishedStep per step), `quant_results` (full layer name -> QuantizedLayer) and `layer_metrics`.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, solver, task_names: Sequence[str],
                 targets: ExpertTargets | ExpertPool | None = None,
                 task_weights: Mapping[str, float] | Sequence[float] | None = None,
                 true_sequential: bool | None = None, offload_blocks: bool | str = "auto",
                 cache_device: str | torch.device | None = None, shard_batches: bool = True,
                 share_statistics: bool = True, tf32: bool = False,
                 resume: Sequence[FinishedStep] = (), selection: Selection | None = None):
        super().__init__()
        if not isinstance(adapter, ModelAdapter):
            raise ValueError(f"adapter must be an epmq.engine.adapters.ModelAdapter (the family's: "
                             f"epmq.families.base.adapter_for(model)), got {type(adapter).__name__}")
        if not isinstance(solver.requirements if hasattr(solver, "requirements") else None, Requirements):
            raise ValueError(f"solver must be an epmq.core.solvers object (RTN, GPTQ, EPMQ), got {type(solver).__name__}")
        task_names = list(task_names)
        if not task_names or len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be a non-empty list of distinct names, got {task_names}")
        # Not a registered submodule: Lightning would move the whole model to the device before
        # setup, and the placement puts it there itself (a block at a time with offload_blocks). DDP wraps
        # only a module with a trainable parameter: a placeholder that nothing ever trains.
        self.__dict__["model"] = model
        self._ddp_placeholder = nn.Parameter(torch.zeros(1))
        self.adapter, self.solver, self.task_names = adapter, solver, task_names
        self.requirements: Requirements = solver.requirements  # what the engine gathers and passes for it
        self.task_weights = task_weights_of(task_weights, task_names)  # (T,) float64
        self.true_sequential = self.adapter.true_sequential if true_sequential is None else bool(true_sequential)
        self.placement = Placement(offload_blocks, cache_device, shard_batches)
        self.share_statistics, self.tf32 = bool(share_statistics), bool(tf32)
        self.automatic_optimization = False
        self.label = ""  # shown before the step in the progress bar, e.g. which anchor candidate
        self.stages = self.adapter.stages(model) + (self.head_stages(model) if self.requirements.head else [])
        self.layer_names = layer_names(self.adapter, model, self.stages)  # every layer a solver may quantize
        if hasattr(solver, "check_modules"):
            solver.check_modules(self.layer_names)  # an override that matches no layer is refused now
        self.schedule: list[Step] = build_schedule(self.adapter, model, self.true_sequential, self.stages,
                                                   quantized=lambda name: module_solver(solver, name) is not None)
        self.targets = provider(targets, for_solver=solver)
        self.choice = None
        if self.requirements.per_step_choice:
            if selection is None:
                raise ValueError(f"{solver!r} chooses each step's anchor on the selection samples: give "
                                 f"BlockwiseCalibration a `selection` function (epmq.jobs.steps.calibrate does)")
            self.choice = StepChoice(solver, selection, adapter, model, self.placement)
        self._resume = list(resume)
        self.step_index = 0  # the calibration's state: plain attributes, never in the state dict
        self.finished: list[FinishedStep] = []
        self.batch_tasks: list[torch.Tensor] = []   # per batch: (batch,) task index of each sample
        self.task_tokens: dict[tuple[int, str], torch.Tensor] = {}  # (stage, source) -> (T,) n_t, all ranks
        self.statistics: StepStatistics | None = None
        self._traces: dict[int, Trace] = {}          # batch -> where it stands in the model
        self._inputs: dict[int, BlockInputs] = {}    # batch -> current block's inputs X̂

    # -- Lightning plumbing and what others see of the calibration -------------------------------------
    def configure_optimizers(self):
        return None  # nothing is trained: manual optimization, no optimizer

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
    def float_layers(self) -> list[str]:
        """The layers a per-module override leaves in float (full names, in model order)."""
        scheduled = {step.prefix + name for step in self.schedule for name in step.layers}
        return [name for name in self.layer_names if name not in scheduled]

    def head_stages(self, model: nn.Module) -> list:
        """The adapter's head stages, for a solver that quantizes the head; a head whose weight is shared (tied
        embeddings) first gets its own copy, and the config says so, so that quantizing it leaves the embeddings
        in float and a saved model is not tied again on loading."""
        heads = self.adapter.head_stages(model)
        if not heads:
            raise ValueError(f"lm_head=true: {type(self.adapter).__name__} declares no head for "
                             f"{type(model).__name__} (ModelAdapter.head_stages)")
        for stage in heads:
            head = model.get_submodule(stage.blocks)
            shared = {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                      if not n.startswith(f"{stage.blocks}.")}
            for name, p in list(head.named_parameters(recurse=False)):
                if id(p) in shared:  # tied: the head's copy is quantized, the other stays as it is
                    setattr(head, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                    config = getattr(model, "config", None)
                    for c in (config, getattr(config, "get_text_config", lambda: None)()):
                        if c is not None:
                            c.tie_word_embeddings = False
        return heads

    @property
    def step_strengths(self) -> list[tuple[str, float]]:
        """(step label, anchor strength chosen for it) per finished step of a per-step choice."""
        return [(s.label, next(iter(s.metrics.values()))["anchor_strength"]) for s in self.finished if s.metrics]

    @property
    def layer_metrics(self) -> dict[str, dict[str, float]]:
        return {k: m for s in self.finished for k, m in s.metrics.items()}

    @contextmanager
    def forward_precision(self):
        """Context for block forwards: the trainer's precision (e.g. bf16-mixed autocast, which Lightning applies
        to training_step only, so the experts' forwards need it too) and TF32 when allowed."""
        with ExitStack() as stack:
            if self._trainer is not None:
                stack.enter_context(self.trainer.precision_plugin.forward_context())
            if self.tf32:
                stack.enter_context(tf32(True))
            yield

    def view(self) -> StepView:
        """What the targets provider sees of this calibration."""
        return StepView(self.model, self.adapter, self.stages, self.schedule, self.task_names, self.batch_tasks,
                        self.schedule[self.step_index] if self.step_index < len(self.schedule) else None,
                        self.requirements.targets, self.placement, self.forward_precision, self.target_names,
                        self.calibration_loader)

    def target_names(self, step: Step) -> tuple[str, ...]:
        """What the experts' targets are needed for in `step`: its linear layers, and on a block's first step
        the block's LayerNorms when the solver calibrates them (with expert targets)."""
        norms = self.requirements.norms and self.requirements.targets and step.first
        return step.layers + (step.stage.norms if norms else ())

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
        if self.requirements.targets and not self.targets.attached:
            raise ValueError("E-PMQ needs the experts' targets: add callbacks.expert_cache.ExpertActivationCache"
                             "(module.targets) to the Trainer's callbacks")
        # Both are by design here: no optimizer, and a transformer kept in eval mode.
        warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        self.model.eval()
        self.placement.bind(self.trainer.strategy.root_device, self.trainer.world_size, self.trainer.global_rank)
        self.placement.place(self.model, self.adapter, self.stages, whole_model_why=(
            "anchor.select=block scores the whole model for every candidate, so the model must stay on the device "
            "(or use anchor.select=run)") if self.choice else "")
        self.apply_finished(self._resume)
        self.step_index = len(self.finished)
        self._traces, self._inputs = {}, {}
        self.placement.check_loaders(self.calibration_loader())  # even for rtn: uneven step counts would hang DDP
        self.batch_tasks, self.task_tokens = count_tokens(self.calibration_loader(), self.adapter, self.model,
                                                          self.stages, self.task_names, self.placement)
        if self.requirements.statistics:
            check_every_task(self.task_tokens, self.task_names, self.task_weights)
        if self.requirements.normalize and self.requirements.statistics:
            check_task_order(self.batch_tasks, self.task_names, self.placement)

    def apply_finished(self, steps: Sequence[FinishedStep]) -> None:
        """Write the quantized weights (and calibrated norms) of already solved steps into the model (resume)."""
        for k, done in enumerate(steps):
            step = self.schedule[k] if k < len(self.schedule) else None
            if step is None or (done.index, done.label, tuple(done.layers)) != (step.index, step.label, step.layers):
                raise ValueError(f"resumed step {k} ({done.label}: {list(done.layers)}) does not match this "
                                 f"schedule ({step.label + ': ' + str(list(step.layers)) if step else 'none'})")
            done.apply(self.model)
            self.finished.append(done)

    # -- one step ---------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.model.eval()
        if self.step_index >= len(self.schedule):
            return
        step = self.current_step
        if step.first:
            self.placement.fetch(self.block(step))
        if self.requirements.statistics:
            self.statistics = StepStatistics(step, self.block(step), self.requirements, self.placement.device,
                                             self.share_statistics, norm_targets=self.requirements.targets,
                                             layer=self.targets.layer if self.targets else None)

    @torch.no_grad()
    def training_step(self, batch, batch_idx: int):
        step, last = self.current_step, batch_idx == len(self.batch_tasks) - 1
        if self.step_index >= len(self.schedule):
            return None
        if self.requirements.statistics and self.placement.owns(batch_idx):
            tasks = self.batch_tasks[batch_idx] if batch_idx < len(self.batch_tasks) else None
            if tasks is None or not torch.equal(check_tasks(batch, batch_idx, self.task_names), tasks):
                raise ValueError(f"calibration batch {batch_idx} differs from the one seen in setup: the "
                                 f"train loader must be deterministic (shuffle=False) and keep its samples "
                                 f"(Trainer(use_distributed_sampler=False))")
            if batch_idx not in self._inputs:  # a block's first step (or the first after resuming)
                with self.forward_precision():
                    self._inputs[batch_idx] = self.placement.inputs_to_cache(self.walk(batch_idx, batch, step))
            weights = token_weights(self.task_tokens, step, self.task_weights, tasks,
                                    lambda source: token_mask(self.adapter, self.model, step.stage, batch, source),
                                    self.placement.device)
            folds = self.requirements.folds  # consecutive samples alternate between folds: tasks split evenly
            fold_ids = (batch_idx + torch.arange(len(tasks))) % folds if folds else None
            targets = self.targets.targets(batch_idx) if self.requirements.targets else {}
            with self.statistics.feeding(weights, targets, tasks, fold_ids), self.forward_precision():
                try:
                    run_block(self.block(step), self._inputs[batch_idx].to(self.placement.device))
                except StepGathered:  # the step's layers have all run: the rest of the block is not needed
                    pass
        if self.requirements.normalize and self.requirements.statistics:
            t = int(self.batch_tasks[batch_idx][0])  # setup checked: one task per batch, tasks in turn
            if last or int(self.batch_tasks[batch_idx + 1][0]) != t:  # on every rank at the same batch
                self.statistics.fold_task(float(self.task_weights[t]), self.placement)
        if last:
            self.finish_step()
        return None

    def walk(self, batch_idx: int, batch, step: Step) -> BlockInputs:
        """Block inputs X̂ of `step`'s block for one batch (epmq.engine.capture.walk_to over this model)."""
        trace = self._traces.setdefault(batch_idx, Trace())

        def run(stage, i, inputs):  # only a resumed run walks through earlier (quantized) blocks
            block = self.adapter.blocks(self.model, stage)[i]
            self.placement.fetch(block)
            out = run_block(block, inputs)
            self.placement.release(block)
            return out

        return walk_to(self.adapter, self.model, self.stages, trace, batch, (step.stage_index, step.block),
                       self.placement.device, run, self.placement.to_cache)

    @torch.no_grad()
    def finish_step(self) -> None:
        """Solve the current step's layers, write Q, log, and move the batches past a finished block."""
        step, block, stats = self.current_step, self.block(self.current_step), self.statistics
        buffers = stats.buffers() if stats is not None else []
        if stats is not None:
            stats.close()
        if buffers:
            self.placement.all_reduce_(*buffers)
        if self.choice is not None:
            results, metrics = self.choice.choose(step, block, lambda solver: solve_layers(step, block, solver, stats,
                                                                                          self.targets),
                                                  self.forward_precision, self.show_progress)
        else:
            results, metrics = solve_layers(step, block, self.solver, stats, self.targets)
        for name, layer_metrics in metrics.items():
            for key, value in layer_metrics.items():
                self.log(f"calib/{step.label}/{name[len(step.prefix):]}/{key}", value, on_step=False, on_epoch=True,
                         batch_size=1, sync_dist=True)
        norms = solve_norms(step, block, self.solver, stats, self.targets)
        self.statistics = None
        self.finished.append(FinishedStep(step.index, step.label, step.layers, results, metrics, norms))
        if step.last:
            followed = step.index + 1 < len(self.schedule)  # else nothing reads it (a head's output: the logits)
            with self.forward_precision():
                for b, inputs in self._inputs.items() if followed else ():  # the quantized block feeds the next one
                    self._traces[b].advance(run_block(block, inputs.to(self.placement.device)), self.placement.to_cache)
            self._inputs = {}
            if self.choice is not None:
                self.choice.block_done()
            self.placement.release(block)
        self.step_index += 1
        if self.step_index == len(self.schedule):
            self._traces = {}
            self.trainer.should_stop = True

    # -- progress ---------------------------------------------------------------------------------
    def show_progress(self, text: str) -> None:
        """Put '<step> · text' on the progress bar now (for long work inside a step, where no batch starts)."""
        bar = getattr(getattr(self._trainer, "progress_bar_callback", None), "_train_progress_bar", None)
        if bar is not None:  # a TQDM bar that is showing
            bar.set_description(f"{self.progress_description()} · {text}")

    def progress_description(self, batch=None) -> str:
        """'<label> · block 2/4 · task mnist' (with the step's first layer when true-sequential)."""
        tasks = torch.as_tensor(batch["task"]).reshape(-1) if isinstance(batch, Mapping) and "task" in batch else None
        return describe_step(self.current_step, len(self.adapter.blocks(self.model, self.current_step.stage)),
                             len(self.stages) > 1, self.true_sequential, self.label, self.task_names, tasks)
