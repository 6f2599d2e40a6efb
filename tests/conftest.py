"""Tiny CLIP vision towers, experts saved to tmp dirs, and in-memory calibration data.

Everything is built in code (no zoo, no downloads): a 2-block CLIPVisionModel with 16x16 one-channel
images (17 tokens, width 32), experts = base + small random task vectors saved with save_pretrained.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import CLIPVisionConfig, CLIPVisionModel

from callbacks.anchoring import MergedWeightAnchoring
from callbacks.expert_cache import ExpertActivationCache
from epmq.merge import task_arithmetic
from epmq.module import BlockwiseCalibration
from epmq.pool import ExpertPool
from epmq.quant import QuantSpec

TASKS = ["mnist", "svhn"]
SPEC = QuantSpec(bits=3, group_size=16, blocksize=16)


def tiny_model(seed: int = 0) -> CLIPVisionModel:
    config = CLIPVisionConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    return CLIPVisionModel(config).eval()


def with_task_vector(base: CLIPVisionModel, seed: int, scale: float = 0.05) -> CLIPVisionModel:
    """A copy of base whose every float tensor moves by scale * ||tensor||-relative noise."""
    expert = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in base.state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        sd[k] = v + scale * v.abs().mean().clamp_min(1e-3) * noise if v.is_floating_point() else v
    expert.load_state_dict(sd)
    return expert


def load_state(state: dict) -> CLIPVisionModel:
    model = tiny_model()
    model.load_state_dict(state)
    return model


class CalibrationSet(Dataset):
    """Samples {"pixel_values": (1, 16, 16), "label": int, "task": int}."""

    def __init__(self, pixel_values: torch.Tensor, tasks: torch.Tensor):
        self.pixel_values, self.tasks = pixel_values, tasks

    def __len__(self):
        return len(self.tasks)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "label": 0, "task": self.tasks[i]}


class CalibrationData(L.LightningDataModule):
    """Unshuffled calibration loader: the full set on every rank (the module shards batches by
    rank), or with shard_by_rank=True samples rank, rank + world, ... (for shard_batches=False)."""

    def __init__(self, dataset: CalibrationSet, batch_size: int = 3, shard_by_rank: bool = False):
        super().__init__()
        self.dataset, self.batch_size, self.shard_by_rank = dataset, batch_size, shard_by_rank

    def train_dataloader(self):
        dataset = self.dataset
        if self.shard_by_rank:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            dataset = Subset(dataset, range(rank, len(dataset), world))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)


def calibration_set(n_per_task=(5, 4), seed: int = 1) -> CalibrationSet:
    """Tasks interleaved so that batches mix tasks; unequal counts so task weighting matters."""
    gen = torch.Generator().manual_seed(seed)
    tasks = torch.cat([torch.full((n,), t) for t, n in enumerate(n_per_task)])
    tasks = tasks[torch.randperm(len(tasks), generator=gen)]
    pixel_values = torch.randn(len(tasks), 1, 16, 16, generator=gen)
    return CalibrationSet(pixel_values, tasks)


def trainer_for(module: BlockwiseCalibration, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=module.num_blocks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   use_distributed_sampler=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


def calibrate(merged_state: dict, method: str, data: CalibrationSet, pool: ExpertPool | None = None,
              strength: float = float("inf"), spec: QuantSpec = SPEC, **trainer_kwargs) -> BlockwiseCalibration:
    """Run BlockwiseCalibration on a fresh model holding `merged_state`; returns the module."""
    module = BlockwiseCalibration(load_state(merged_state), spec=spec, method=method, task_names=TASKS)
    callbacks = []
    if method == "epmq":
        callbacks = [ExpertActivationCache(pool), MergedWeightAnchoring(strength)]
    trainer_for(module, callbacks, **trainer_kwargs).fit(module, datamodule=CalibrationData(data))
    return module


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Base, two experts (saved with save_pretrained) and their task-arithmetic merge."""
    root = tmp_path_factory.mktemp("zoo")
    base = tiny_model()
    base.save_pretrained(root / "base")
    experts = {}
    for t, task in enumerate(TASKS):
        expert = with_task_vector(base, seed=10 + t)
        expert.save_pretrained(root / task)
        experts[task] = expert
    merged = task_arithmetic(base.state_dict(), {t: e.state_dict() for t, e in experts.items()},
                             scaling_factor=0.5)
    return {"root": root, "base": base, "experts": experts, "merged": merged,
            "paths": {task: root / task for task in TASKS}}
