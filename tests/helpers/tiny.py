"""The tiny world of the engine's tests, built in code: a 2-block CLIPVisionModel with 16x16 one-channel images
(17 tokens, width 32), experts = base + small random task vectors, in-memory calibration data, and a calibration
run wired as a job wires it (the targets callback included)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import CLIPVisionConfig, CLIPVisionModel

from callbacks.expert_cache import ExpertActivationCache
from epmq.core.quant import QuantSpec
from epmq.core.solvers import EPMQ, GPTQ, RTN
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.io.pool import ExpertPool

from helpers import families

TASKS = ["mnist", "svhn"]
SPEC = QuantSpec(bits=3, group_size=16, blocksize=16)
ADAPTER = CLIPVisionAdapter()  # the tiny towers below are CLIPVisionModels


def tiny_model(seed: int = 0) -> CLIPVisionModel:
    config = CLIPVisionConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    return CLIPVisionModel(config).eval()


def with_task_vector(base: CLIPVisionModel, seed: int, scale: float = 0.05) -> CLIPVisionModel:
    """A copy of base whose every float tensor moves by scale * ||tensor||-relative noise."""
    return families.with_task_vector(base, tiny_model(), seed, scale)


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
    """A CPU Trainer for `module`, with the experts' targets wired in as a job wires them (the callback that
    forwards the fit hooks to the module's targets provider)."""
    options = dict(accelerator="cpu", devices=1, max_epochs=len(module.schedule), logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   use_distributed_sampler=False, num_sanity_val_steps=0)
    options.update(kwargs)
    wired = [ExpertActivationCache(module.targets)] if module.targets is not None else []
    return L.Trainer(callbacks=[*callbacks, *wired], **options)


SPEC_ARGS = dict(bits=SPEC.bits, group_size=SPEC.group_size, blocksize=SPEC.blocksize)


def solver(method: str, strength: float = float("inf"), form: str = "output"):
    """The solver of `method` ("rtn", "gptq", "epmq") with the tests' small QuantSpec."""
    if method == "epmq":
        return EPMQ(strength=strength, form=form, **SPEC_ARGS)
    return {"rtn": RTN, "gptq": GPTQ}[method](**SPEC_ARGS)


def calibrate(merged_state: dict, method: str, data: CalibrationSet, pool: ExpertPool | None = None,
              strength: float = float("inf"), callbacks=(), **kwargs) -> BlockwiseCalibration:
    """Run BlockwiseCalibration on a fresh model holding `merged_state`; returns the module.

    kwargs go to the module when it takes them (true_sequential, ...), else to the Trainer."""
    module_keys = {"true_sequential", "offload_blocks", "cache_device", "shard_batches", "task_weights", "resume"}
    module = BlockwiseCalibration(load_state(merged_state), ADAPTER, solver(method, strength), TASKS, targets=pool,
                                  **{k: v for k, v in kwargs.items() if k in module_keys})
    trainer_for(module, callbacks, **{k: v for k, v in kwargs.items() if k not in module_keys}).fit(
        module, datamodule=CalibrationData(data))
    return module
