"""Tiny CLIP vision towers, experts saved to tmp dirs, and in-memory calibration data.

Everything is built in code (no zoo, no downloads): a 2-block CLIPVisionModel with 16x16 one-channel
images (17 tokens, width 32), experts = base + small random task vectors saved with save_pretrained.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import CLIPVisionConfig, CLIPVisionModel

from callbacks.expert_cache import ExpertActivationCache
from epmq.core.merge import task_arithmetic
from epmq.engine.calibration import BlockwiseCalibration
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.offline.zoo import build_zoo
from epmq.io.pool import ExpertPool
from epmq.core.quant import QuantSpec
from epmq.core.solvers import EPMQ, GPTQ, RTN

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


ROOT = Path(__file__).resolve().parents[1]


def load_results_doc():
    """scripts/results_doc.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory) -> Path:
    """A cache folder holding the micro offline zoo (built once per test session): <epmq cache>/zoo,
    so that the config's own path interpolation (suite.cache_dir: ${paths.cache_dir}/zoo) finds it."""
    cache = tmp_path_factory.mktemp("epmq-cache") / "zoo"
    build_zoo("micro", cache_dir=cache, seed=0, progress=False)
    return cache


def make_cfg(out_dir: Path, zoo_cache: Path, *overrides: str):
    """The composed train config with the micro suite, writing into out_dir.

    The micro zoo's options (suite.size, suite.progress) apply when the overrides keep the offline
    suite; an override choosing another suite (suite=..., or an experiment that does) gets none."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        chosen = compose("train", overrides=list(overrides)).suite.get("_target_", "")
        micro = ["suite.size=micro", "suite.progress=false"] if chosen.endswith(".OfflineSuite") else []
        cfg = compose("train", return_hydra_config=True, overrides=[
            *micro, f"paths.cache_dir={zoo_cache.parent}",
            "data.calib_samples=8", "data.select_samples=8", "data.batch_size=8", "data.test_samples=48",
            "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)
    return cfg


def wandb_records(run_file: Path):
    """The records of an offline W&B run file, in order (wandb Record protobufs).

    The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32, little-endian length, kind: 1 full, 2 first, 3 middle, 4 last)
    and a chunk of a serialised wandb Record protobuf.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def wandb_history(run_file: Path) -> dict:
    """Every history row's metrics in an offline W&B run file, merged (later rows win)."""
    history = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
    return history


def wandb_config(run_file: Path) -> dict:
    """The run's config as the offline W&B run file holds it (later updates win)."""
    config = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return config


def wandb_finished(run_file: Path) -> bool:
    """Whether the run file ends with the run's exit record (the run was closed and flushed)."""
    kinds = [r.WhichOneof("record_type") for r in wandb_records(run_file)]
    return bool(kinds) and kinds[-1] == "exit"
