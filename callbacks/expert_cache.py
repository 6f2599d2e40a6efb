"""ExpertActivationCache: the experts' side of E-PMQ, one block of one expert at a time.

For every calibration sample of task t it keeps X^e, the hidden states of expert t (and of no other
expert) at the current block, starting from expert t's own block-0 inputs: expert t has its own
embeddings (patch, position, pre-layernorm), so these differ from the merged model's. Per block:

    epoch start       load expert t's weights of block i only (pool.expert_block) into a scratch
                      copy of the block, for every task; never registered on the LightningModule
    batch start       run expert t's full-precision block on X^e of task t's samples; hooks on its
                      linears capture Y_t = W_t X^e + b_t, handed to the module as
                      pl_module.expert_targets (layer -> (batch, tokens, out), rows aligned with X̂);
                      the block output is kept as X^e of block i+1
    epoch end         swap in the next X^e, free the scratch blocks

Expert work is one extra block forward per sample (expert t only sees task t's samples).

The targets depend only on the experts and the calibration batches, never on the merged model, the
bit width or the anchor. With keep=True they are recorded during the first E-PMQ fit and replayed
by later fits on the same batches (anchor candidates, bit widths, merges), without touching the
pool again. That costs memory: Σ over blocks and quantized layers of samples x tokens x out.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

from epmq.adapters import BlockInputs
from epmq.module import loader_fingerprint
from epmq.pool import ExpertPool, match_prefix


class ExpertActivationCache(L.Callback):
    """Expert hidden states and per-layer targets for BlockwiseCalibration(method="epmq").

    Args:
        pool: epmq.pool.ExpertPool holding an expert for every task in the module's task_names.
        keep: record every block's targets and replay them in later fits on the same batches.
    """

    def __init__(self, pool: ExpertPool, keep: bool = False):
        if not isinstance(pool, ExpertPool):
            raise ValueError(f"pool must be an epmq.pool.ExpertPool, got {type(pool).__name__}")
        self.pool = pool
        self.keep = bool(keep)
        self.trace: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # block -> batch -> layer -> Y
        self._trace_layout = None  # (task names, per-batch task ids, owned batches) it was recorded for
        self._replay = False
        # batch index -> task index -> X^e of that task's samples in the batch (this rank's batches)
        self.inputs: dict[int, dict[int, BlockInputs]] = {}
        self._next: dict[int, dict[int, torch.Tensor]] = {}
        self._blocks: dict[int, nn.Module] = {}   # task index -> scratch block of the current block
        self._outputs: dict[str, torch.Tensor] = {}
        self._key_map = ("", "")  # (strip, add): pool keys -> model keys

    # -- block 0 inputs of every expert -------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        missing = [t for t in pl_module.task_names if t not in self.pool.tasks]
        if missing:
            raise ValueError(f"the expert pool has no expert for task(s) {missing}; pool tasks: {self.pool.tasks}")
        self._key_map = match_prefix(self.pool.keys(), pl_module.model.state_dict().keys())

    def _model_keys(self, sd: dict) -> dict:
        strip, add = self._key_map
        return {add + k[len(strip):]: v for k, v in sd.items()}

    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module) -> None:
        """X^e of block 0: each sample through its own expert's stem (everything before block 0)."""
        if pl_module.method != "epmq":
            self.inputs = {}  # nothing to do for rtn / gptq
            return
        layout = None
        if self.keep:  # what the targets depend on: tasks, batches (their samples) and this rank's share
            layout = (tuple(pl_module.task_names), tuple(tuple(t.tolist()) for t in pl_module.batch_tasks),
                      tuple(b for b, x in enumerate(pl_module.inputs) if x is not None),
                      loader_fingerprint(pl_module.calibration_loader()))
        self._replay = (self.keep and self._trace_layout == layout
                        and len(self.trace) == pl_module.num_blocks)
        if self._replay:
            return  # every block's targets are recorded for exactly these batches
        self.trace, self._trace_layout = {}, layout
        adapter, model = pl_module.adapter, pl_module.model
        blocks_path = adapter.blocks_path(model) + "."
        # A copy of the model that shares the blocks' tensors (they are never run: the capture stops
        # at block 0), so the copy costs only the stem.
        shared = {id(t): t for t in list(adapter.blocks(model).parameters()) + list(adapter.blocks(model).buffers())}
        scratch = copy.deepcopy(model, memo=shared)
        self.inputs = {b: {} for b, x in enumerate(pl_module.inputs) if x is not None}
        batches = {b: x for b, x in enumerate(pl_module.calibration_loader()) if b in self.inputs}
        strip, add = self._key_map
        for t, task in enumerate(pl_module.task_names):
            stem = self._model_keys(self.pool.expert_subset(
                task, lambda k: not (add + k[len(strip):]).startswith(blocks_path)))
            result = scratch.load_state_dict(stem, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"expert '{task}': keys {result.unexpected_keys[:3]} do not fit the model")
            for b in self.inputs:
                idx = (pl_module.batch_tasks[b] == t).nonzero().flatten()
                if idx.numel():
                    sub = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                           for k, v in batches[b].items()}
                    captured = adapter.capture_block_inputs(scratch, sub)
                    self.inputs[b][t] = captured if pl_module.cache_device is None else captured.to(pl_module.cache_device)
        del scratch

    # -- one block --------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        i = pl_module.block_index
        if i >= pl_module.num_blocks or self._replay:
            return
        adapter = pl_module.adapter
        prefix = adapter.block_prefix(pl_module.model, i)
        strip, add = self._key_map
        merged_block = adapter.blocks(pl_module.model)[i]
        self._blocks, self._next, self._outputs = {}, {b: {} for b in self.inputs}, {}
        for t, task in enumerate(pl_module.task_names):
            if not any(t in per_task for per_task in self.inputs.values()):
                continue  # no samples of this task on this rank
            block = copy.deepcopy(merged_block).eval()  # the merged block's shape, not yet quantized
            weights = self.pool.expert_subset(task, lambda k: (add + k[len(strip):]).startswith(prefix))
            block.load_state_dict({k[len(prefix):]: v for k, v in self._model_keys(weights).items()}, strict=True)
            for name, linear in adapter.linear_layers(block).items():
                linear.register_forward_hook(self._capture(name))
            self._blocks[t] = block

    def _capture(self, name: str):
        def hook(linear, args, output):
            self._outputs[name] = output  # (n, tokens, out) = W_t X^e + b_t
        return hook

    @torch.no_grad()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        i = pl_module.block_index
        if self._replay and i < pl_module.num_blocks and batch_idx in self.trace[i]:
            device = trainer.strategy.root_device
            pl_module.expert_targets = {name: Y.to(device) for name, Y in self.trace[i][batch_idx].items()}
            return
        if i >= pl_module.num_blocks or batch_idx not in self.inputs:
            return
        adapter, tasks = pl_module.adapter, pl_module.batch_tasks[batch_idx]
        device = trainer.strategy.root_device
        targets: dict[str, torch.Tensor] = {}
        for t, inputs in self.inputs[batch_idx].items():
            idx = (tasks == t).nonzero().flatten().to(device)
            hidden = adapter.run_block(self._blocks[t], inputs.to(device))
            self._next[batch_idx][t] = hidden.to(inputs.hidden.device)
            for name, Y in self._outputs.items():
                if name not in targets:
                    targets[name] = Y.new_zeros((tasks.numel(),) + tuple(Y.shape[1:]))
                targets[name][idx] = Y  # rows of task t's samples, aligned with the merged batch
            self._outputs = {}
        pl_module.expert_targets = targets
        if self.keep:
            keep_on = pl_module.cache_device
            self.trace.setdefault(i, {})[batch_idx] = (
                targets if keep_on is None else {name: Y.to(keep_on) for name, Y in targets.items()})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.block_index >= pl_module.num_blocks or self._replay:
            return
        for b, per_task in self.inputs.items():
            for t, inputs in per_task.items():
                if t not in self._next[b]:
                    raise RuntimeError(f"batch {b} was not visited in block {pl_module.block_index}: "
                                       f"calibration needs every batch in every epoch (no limit_train_batches)")
                per_task[t] = inputs.with_hidden(self._next[b][t])
        self._blocks, self._next = {}, {}

    def on_fit_end(self, trainer, pl_module) -> None:
        self.inputs, self._blocks, self._next, self._outputs = {}, {}, {}, {}
        if self.keep and len(self.trace) != pl_module.num_blocks:  # an interrupted fit: do not replay it
            self.trace, self._trace_layout = {}, None

