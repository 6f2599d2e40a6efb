"""Block-wise calibration of a merged model as a LightningModule: one fit epoch = one block.

    setup("fit")         capture block 0's inputs X̂ (with all forward kwargs) for every calibration
                         batch this rank owns; count the tokens n_t of every task (summed over ranks)
    epoch start          statistics H (and C for E-PMQ) for each quantized linear of block i,
                         forward hooks that feed them
    training_step        run merged block i on X̂; the hooks add H += w X̂ᵀX̂ (and C += w ỸᵀX̂,
                         Ỹ = Y_t - b_m from the ExpertActivationCache callback), w = w_t / n_t
    epoch end            finish_block(): all-reduce H, C over ranks; W* from the
                         MergedWeightAnchoring callback (E-PMQ) or W_m (GPTQ); GPTQ-round W* with H
                         (RTN: round W_m); write Q into the block; advance X̂ through the quantized block

DDP: every rank iterates the whole (unshuffled, unsharded) calibration loader and owns the batches
with batch_idx % world_size == rank, so samples are split exactly (no padding: DistributedSampler's
padding repeats samples and biases H) and every rank runs the same number of steps. That matters:
Lightning 2.6 broadcasts a SIGTERM flag every training step under DDP, so ranks with different
numbers of batches would pair that broadcast with another rank's all-reduce and hang. Build the
Trainer with use_distributed_sampler=False. setup() checks across ranks that the loaders agree (or,
with shard_batches=False, that pre-sharded loaders have equal lengths). All ranks solve the same
summed statistics and end with the same weights.

The module never holds the experts: the callbacks load one block of one expert at a time into
scratch modules that are not registered here.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from epmq.adapters import BlockAdapter, BlockInputs, adapter_for
from epmq.gptq import QuantResult, gptq, rtn
from epmq.quant import QuantSpec
from epmq.stats import LayerStatistics

METHODS = ("rtn", "gptq", "epmq")


class BlockwiseCalibration(L.LightningModule):
    """Calibrate (quantize) a merged transformer block by block.

    Args:
        model: the merged model (e.g. transformers.CLIPVisionModel); quantized in place.
        adapter: the family's BlockAdapter; None picks one from the model class.
        spec: epmq.quant.QuantSpec (bits, group size, damping, ...).
        method: "rtn" (round to nearest, no data), "gptq" (GPTQ of the merged model) or "epmq"
            (needs the ExpertActivationCache and MergedWeightAnchoring callbacks).
        task_names: names of the tasks; a batch's "task" entry indexes into this list.
        task_weights: w_t per task (mapping name -> w, or a sequence in task order); default 1 each.
            Each token of task t is weighted w_t / n_t, n_t = task t's calibration tokens, so a
            task counts by w_t whatever its number of samples.
        cache_device: where the cached hidden states live between steps (None: the model's device;
            "cpu" saves accelerator memory at the cost of transfers).
        shard_batches: True (default): every rank's train loader yields the same full calibration
            set and this module keeps batch b on rank b % world_size. False: the loader is already
            sharded by rank (then every rank must get the same number of batches).
        input_cache: a dict shared by calibrations of the same merged model on the same loader
            (e.g. RTN, GPTQ and every E-PMQ anchor candidate): block 0's inputs X̂ are captured into
            it once, by batch index, and reused afterwards. None: capture every time.

    Batches: dicts with the adapter's input keys (CLIP: "pixel_values") and "task" (batch,) ints.
    After fit: `quant_results` (full layer name -> QuantResult on CPU, for export), `block_losses`
    (block -> layer -> GPTQ loss tr((Q - W*) H (Q - W*)ᵀ)) and `rtn_losses` (the same for
    round-to-nearest of the same W* under the same H; GPTQ and E-PMQ only).
    """

    def __init__(self, model: nn.Module, adapter: BlockAdapter | None = None, spec: QuantSpec = QuantSpec(),
                 method: str = "gptq", task_names: Sequence[str] = (),
                 task_weights: Mapping[str, float] | Sequence[float] | None = None,
                 cache_device: str | torch.device | None = None, shard_batches: bool = True,
                 input_cache: dict | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"spec must be an epmq.quant.QuantSpec, got {type(spec).__name__}")
        task_names = list(task_names)
        if not task_names or len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be a non-empty list of distinct names, got {task_names}")
        self.model = model
        self.adapter = adapter if adapter is not None else adapter_for(model)
        self.spec = spec
        self.method = method
        self.task_names = task_names
        self.task_weights = self._parse_task_weights(task_weights, task_names)  # (T,) float64
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.shard_batches = bool(shard_batches)
        self.input_cache = input_cache
        self.automatic_optimization = False
        self.label = ""  # shown before the block in the progress bar, e.g. which anchor candidate
        self.num_blocks = self.adapter.num_blocks(model)
        self.adapter.linear_layers(self.adapter.blocks(model)[0])  # fail now if the layers are not there

        # Calibration state (plain attributes: never part of the state dict).
        self.inputs: list[BlockInputs | None] = []   # per batch: X̂ of the current block (None: other rank)
        self.batch_tasks: list[torch.Tensor] = []    # per batch: (batch,) task index of each sample
        self.task_tokens = torch.zeros(len(task_names), dtype=torch.float64)  # n_t, summed over ranks
        self.statistics: dict[str, LayerStatistics] = {}
        self.expert_targets: dict[str, torch.Tensor] = {}  # layer -> (batch, tokens, out), set per step
        self.quant_results: dict[str, QuantResult] = {}
        self.block_losses: dict[int, dict[str, float]] = {}
        self.rtn_losses: dict[int, dict[str, float]] = {}
        self._hooks: list = []
        self._sample_weights: torch.Tensor | None = None
        self._finished_block = -1
        self._reduced_block = -1

    @staticmethod
    def _parse_task_weights(task_weights, task_names) -> torch.Tensor:
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

    # -- Lightning plumbing ---------------------------------------------------------------
    def configure_optimizers(self):
        return None  # nothing is trained: manual optimization, no optimizer

    def forward(self, **inputs):
        return self.model(**inputs)

    def train(self, mode: bool = True):
        """Lightning switches to train mode for fit; the transformer stays in eval (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def block_index(self) -> int:
        return self.trainer.current_epoch

    @property
    def rank_world(self) -> tuple[int, int]:
        return self.trainer.global_rank, self.trainer.world_size

    def owns(self, batch_idx: int) -> bool:
        """Whether this rank calibrates on batch `batch_idx` (exact round-robin split)."""
        rank, world = self.rank_world
        return not self.shard_batches or batch_idx % world == rank

    def block(self, i: int | None = None) -> nn.Module:
        return self.adapter.blocks(self.model)[self.block_index if i is None else i]

    def calibration_loader(self):
        """The train loader as the datamodule (or fit's train_dataloaders) defines it."""
        if self.trainer.datamodule is not None:
            return self.trainer.datamodule.train_dataloader()
        source = self.trainer.fit_loop._data_source  # fit(model, train_dataloaders=...)
        if not source.is_defined():
            raise ValueError("BlockwiseCalibration needs calibration batches: pass a datamodule or "
                             "train_dataloaders to trainer.fit")
        return source.dataloader()

    # -- setup: block-0 inputs and token counts ----------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.num_blocks:
            raise ValueError(f"Trainer(max_epochs={max_epochs}) is less than the model's {self.num_blocks} "
                             f"blocks: one epoch calibrates one block, use max_epochs={self.num_blocks}")
        # Both are by design here: no optimizer, and a transformer kept in eval mode.
        warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        if self.method == "epmq":
            from callbacks.anchoring import MergedWeightAnchoring
            from callbacks.expert_cache import ExpertActivationCache

            for cls in (ExpertActivationCache, MergedWeightAnchoring):
                if not any(isinstance(cb, cls) for cb in self.trainer.callbacks):
                    raise ValueError(f"method='epmq' needs the {cls.__name__} callback in Trainer(callbacks=...)")
        self.model.eval()
        self.inputs, self.batch_tasks = [], []
        self.task_tokens = torch.zeros(len(self.task_names), dtype=torch.float64)
        self.check_loaders_across_ranks()  # even for rtn: uneven step counts would hang DDP
        if self.method == "rtn":
            return  # rounding needs no data
        device = self.trainer.strategy.root_device
        self.model.to(device)
        for b, batch in enumerate(self.calibration_loader()):
            tasks = self.check_tasks(batch, b)
            self.batch_tasks.append(tasks)
            if not self.owns(b):
                self.inputs.append(None)
                continue
            if self.input_cache is not None and b in self.input_cache:
                inputs = self.input_cache[b]  # read only: advancing a block makes new BlockInputs
            else:
                inputs = self.adapter.capture_block_inputs(self.model, batch)
                if self.input_cache is not None:
                    self.input_cache[b] = inputs
            n = self.adapter.tokens_per_sample(inputs).to(torch.float64)  # (batch,)
            self.task_tokens.index_add_(0, tasks, n)
            self.inputs.append(inputs if self.cache_device is None else inputs.to(self.cache_device))
        self.all_reduce_(self.task_tokens)
        empty = [t for t, n, w in zip(self.task_names, self.task_tokens, self.task_weights) if n == 0 and w > 0]
        if empty:
            raise ValueError(f"task(s) {empty} have no calibration samples (task_names={self.task_names})")

    def check_loaders_across_ranks(self) -> None:
        """Under DDP: equal batch counts on all ranks, and identical loaders when shard_batches.

        One pass over the loader without the model: (number of batches, a float64 fingerprint of
        the batches' task ids and tensors) is gathered from every rank.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        count, fingerprint = loader_fingerprint(self.calibration_loader())
        mine = torch.tensor([count, fingerprint], dtype=torch.float64, device=self.trainer.strategy.root_device)
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

    # -- one block: statistics ---------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.model.eval()
        if self.block_index >= self.num_blocks or self.method == "rtn":
            return
        layers = self.adapter.linear_layers(self.block())
        device = self.trainer.strategy.root_device
        with_C = self.method == "epmq"
        self.statistics = {name: LayerStatistics(lin.in_features, lin.out_features if with_C else None,
                                                 device=device)
                           for name, lin in layers.items()}
        self._hooks = [lin.register_forward_hook(self._statistics_hook(name)) for name, lin in layers.items()]

    def _statistics_hook(self, name: str):
        def hook(linear: nn.Linear, args, output):
            X = args[0]  # (batch, tokens, in): the merged layer's inputs X̂
            Y = None
            if self.method == "epmq":
                Y = self.expert_targets[name]  # (batch, tokens, out): Y_t = W_t X^e + b_t
                if linear.bias is not None:
                    Y = Y - linear.bias.to(Y)  # the merged layer keeps b_m: target Ỹ = Y_t - b_m
            self.statistics[name].add(X, Y, weight=self._sample_weights)
        return hook

    @torch.no_grad()
    def training_step(self, batch, batch_idx: int):
        if self.method == "rtn" or self.block_index >= self.num_blocks or not self.owns(batch_idx):
            return None
        if batch_idx >= len(self.inputs) or not torch.equal(self.check_tasks(batch, batch_idx),
                                                            self.batch_tasks[batch_idx]):
            raise ValueError(f"calibration batch {batch_idx} differs from the one captured in setup: the "
                             f"train loader must be deterministic (shuffle=False) and keep its samples "
                             f"(Trainer(use_distributed_sampler=False))")
        tasks = self.batch_tasks[batch_idx]
        device = self.trainer.strategy.root_device
        # w_t / n_t per sample: each task's tokens sum to w_t
        self._sample_weights = (self.task_weights / self.task_tokens.clamp_min(1))[tasks].to(device)
        self.adapter.run_block(self.block(), self.inputs[batch_idx].to(device))
        self.expert_targets = {}
        return None

    # -- one block: solve -----------------------------------------------------------------------
    def all_reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum tensors in place over all ranks (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        device = self.trainer.strategy.root_device
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t))
            offset += t.numel()

    def reduce_statistics(self) -> None:
        """Sum this block's raw H and C over ranks, once (idempotent, called before any solve)."""
        if self._reduced_block == self.block_index:
            return
        buffers = [buf for stats in self.statistics.values() for buf in stats.buffers()]
        if buffers:
            self.all_reduce_(*buffers)
        self._reduced_block = self.block_index

    def anchoring(self):
        from callbacks.anchoring import MergedWeightAnchoring

        found = [cb for cb in self.trainer.callbacks if isinstance(cb, MergedWeightAnchoring)]
        return found[0] if found else None

    @torch.no_grad()
    def finish_block(self) -> None:
        """Quantize the current block and advance X̂ (idempotent; the callbacks may call it first)."""
        i = self.block_index
        if self._finished_block == i or i >= self.num_blocks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.reduce_statistics()
        block = self.block(i)
        prefix = self.adapter.block_prefix(self.model, i)
        anchor = self.anchoring() if self.method == "epmq" else None
        losses, rtn_losses = {}, {}
        for name, linear in self.adapter.linear_layers(block).items():
            W_m = linear.weight.detach()  # (out, in)
            if self.method == "rtn":
                result = rtn(W_m, self.spec)
            else:
                stats = self.statistics[name]
                if stats.tokens == 0:
                    raise ValueError(f"block {i} layer '{name}': no calibration tokens reached it")
                W_star, H = anchor.target(i, name, stats.H, stats.C, W_m) if anchor else (W_m, stats.H)
                result = gptq(W_star, H, self.spec)
                rtn_losses[name] = rtn(W_star, self.spec, H=H).loss  # the baseline GPTQ must beat
            linear.weight.copy_(result.weight.to(linear.weight.dtype))
            self.quant_results[prefix + name] = _to_cpu(result)
            losses[name] = result.loss
        self.block_losses[i] = losses
        if rtn_losses:
            self.rtn_losses[i] = rtn_losses
        self.statistics = {}
        if self.method != "rtn" and i + 1 < self.num_blocks:
            device = self.trainer.strategy.root_device
            for b, inputs in enumerate(self.inputs):  # X̂ of block i+1 = quantized block i (X̂)
                if inputs is not None:
                    hidden = self.adapter.run_block(block, inputs.to(device))
                    self.inputs[b] = inputs.with_hidden(hidden.to(inputs.hidden.device))
        self._finished_block = i
        if i + 1 == self.num_blocks:
            self.inputs = []
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        self.finish_block()

    def progress_description(self, batch=None) -> str:
        """'block 2/4 · task mnist' for the progress bar (the tasks of `batch` when given)."""
        i = min(self.block_index, self.num_blocks - 1) + 1
        text = f"{self.label} · block {i}/{self.num_blocks}" if self.label else f"block {i}/{self.num_blocks}"
        if isinstance(batch, Mapping) and "task" in batch:
            ids = torch.as_tensor(batch["task"]).reshape(-1).unique().tolist()
            names = [self.task_names[t] if 0 <= t < len(self.task_names) else str(t) for t in ids]
            text += f" · {'task' if len(names) == 1 else 'tasks'} {','.join(names)}"
        return text


def loader_fingerprint(loader) -> tuple[int, float]:
    """(number of batches, Σ_b (b+1) · Σ entries of batch b's tensors) of a calibration loader.

    Cheap and order-sensitive: tells one calibration set (or one batch order) from another.
    """
    count, fingerprint = 0, 0.0
    for b, batch in enumerate(loader):
        count += 1
        for v in (batch.values() if isinstance(batch, Mapping) else ()):
            if isinstance(v, torch.Tensor):
                fingerprint += (b + 1) * v.double().sum().item()
    return count, fingerprint


def _to_cpu(result: QuantResult) -> QuantResult:
    return dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu()
                                          for f in dataclasses.fields(result)
                                          if isinstance(getattr(result, f.name), torch.Tensor)})
