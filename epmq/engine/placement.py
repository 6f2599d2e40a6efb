"""Where a calibration computes and where its tensors wait, which batches this rank owns, and sums over ranks.

DDP: every rank iterates the whole (unshuffled, unsharded) calibration loader and owns the batches with
batch_idx % world_size == rank, so samples are split exactly (DistributedSampler's padding repeats samples
and biases H) and every rank runs the same number of steps (Lightning runs a collective every step under
DDP: uneven counts hang). Build the Trainer with use_distributed_sampler=False. All ranks solve the same
summed statistics.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage
from epmq.engine.capture import BlockInputs
from epmq.io.fingerprint import loader_fingerprint


def distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Placement:
    """Devices and ranks of one calibration.

    Args:
        offload_blocks: keep the blocks on the CPU and move each to the device only for its steps (the rest of
            the model stays on the device). "auto": only on a GPU whose free memory is less than twice the
            model's size (the other half is for statistics and hidden states); decided in `place`.
        cache_device: where hidden states wait between steps (None: the device).
        shard_batches: True: every rank's loader yields the full calibration set and this rank keeps batch b
            when b % world_size == rank; False: the loader is already sharded by rank.
    """

    def __init__(self, offload_blocks: bool | str = "auto", cache_device: str | torch.device | None = None,
                 shard_batches: bool = True):
        if offload_blocks not in (True, False, "auto"):
            raise ValueError(f"offload_blocks must be true, false or auto, got {offload_blocks!r}")
        self.offload_blocks = offload_blocks
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.shard_batches = bool(shard_batches)
        self.device = torch.device("cpu")
        self.world_size, self.rank = 1, 0

    def bind(self, device: torch.device, world_size: int = 1, rank: int = 0) -> None:
        """The trainer's device and this process's place among the ranks."""
        self.device, self.world_size, self.rank = torch.device(device), int(world_size), int(rank)

    def owns(self, batch_idx: int) -> bool:
        """Whether this rank calibrates on batch `batch_idx` (exact round-robin split)."""
        return not self.shard_batches or batch_idx % self.world_size == self.rank

    def to_cache(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor kept between steps, on cache_device when one is set."""
        return t if self.cache_device is None else t.to(self.cache_device)

    def inputs_to_cache(self, inputs: BlockInputs) -> BlockInputs:
        return inputs if self.cache_device is None else inputs.to(self.cache_device)

    def place(self, model: nn.Module, adapter: ModelAdapter, stages: list[Stage], whole_model_why: str = "") -> None:
        """The model on the device; with offload_blocks, its blocks stay on the CPU until their turn.

        whole_model_why: a reason the model must stay whole on the device (then offloading is refused).
        Spawned DDP processes receive the model's CPU tensors in shared memory: each rank writes its
        quantized weights, so each takes a private copy first (else one rank's Q would become another
        rank's W_m).
        """
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and t.is_shared():
                t.data = t.data.clone()
        if self.offload_blocks == "auto":
            self.offload_blocks = (self.device.type == "cuda"
                                   and 2 * _bytes(model) > torch.cuda.mem_get_info(self.device)[0])
        if self.offload_blocks and whole_model_why:
            raise ValueError(f"{whole_model_why}: set calibration.offload_blocks=false")
        if not self.offload_blocks:
            model.to(self.device)
            return
        blocks = [adapter.blocks(model, s) for s in stages]
        held = [list(b) for b in blocks]
        for b in blocks:  # detach the blocks, move the rest, put them back on the CPU
            for j in range(len(b)):
                b[j] = nn.Identity()
        model.to(self.device)
        for b, mods in zip(blocks, held):
            for j, mod in enumerate(mods):
                b[j] = mod.to("cpu")

    def fetch(self, block: nn.Module) -> None:
        """An offloaded block onto the device for its steps."""
        if self.offload_blocks:
            block.to(self.device)

    def release(self, block: nn.Module) -> None:
        """An offloaded block back to the CPU once its steps are done."""
        if self.offload_blocks:
            block.to("cpu")

    def all_reduce_(self, *tensors: torch.Tensor) -> None:
        """Sum tensors in place over all ranks (no-op without a process group of several ranks)."""
        if not distributed():
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t))
            offset += t.numel()

    def check_loaders(self, loader: Iterable) -> None:
        """Under DDP: equal batch counts on all ranks, and identical loaders when shard_batches."""
        if not distributed():
            return
        count, fingerprint = loader_fingerprint(loader)
        mine = torch.tensor([count, fingerprint], dtype=torch.float64, device=self.device)
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


def _bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
