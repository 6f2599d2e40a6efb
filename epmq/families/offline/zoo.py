"""Build, cache and open the offline expert zoo: a small CLIP vision tower, its task heads and experts.

Layout of a zoo root (every model through save_pretrained, so pools load it like hub experts):

    zoo.json                  manifest: tasks, num_classes, config, fingerprint, weights_sha256,
                              FP test metrics
    base/                     CLIPVisionModel.save_pretrained (safetensors)
    experts/<task>/           CLIPVisionModel.save_pretrained (safetensors)
    heads/<task>.safetensors  {"weight": (num_classes, hidden), "bias": (num_classes,)}
    data/<task>/              DatasetDict.save_to_disk, splits train/calibration/test,
                              columns "pixel_values" (float32, 1 x 28 x 28, normalised) and "label"

Recipe (DESIGN §6): the base learns 4-way rotation prediction on the pooled training images of all
tasks (label-free); each task's head is a linear probe on the base's pooler_output, then frozen;
each expert fine-tunes the whole tower under its frozen head. The zoo is cached under
<cache>/<size>-<fingerprint[:16]>, the fingerprint hashing the config, the seed and the data arrays;
it is built in a temporary folder and renamed into place only when complete.

The build runs on ZooConfig.threads torch threads with deterministic algorithms, so the same inputs
give the same weights whatever the caller's thread settings; the manifest's weights_sha256 (see
weights_sha256()) records which weights were written, and Zoo.verify_weights() checks a cached zoo.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, Features, load_from_disk
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModel

from epmq.families.offline.classifier import CLIPClassifier, accuracy, load_head, save_head
from epmq.families.offline.heads import fit_head
from epmq.families.offline.pretrain import pretrain_rotation
from epmq.families.offline.sources import SPLITS, TASKS, TaskData, load_task
from epmq.families.offline.train import train

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the recipe changes in a way the config does not show (3: fixed threads)
MANIFEST = "zoo.json"


@dataclass(frozen=True)
class ZooConfig:
    """Everything that decides a zoo besides the seed. counts: task -> (train, calibration, test)."""

    counts: dict[str, tuple[int, int, int]]
    model: dict[str, int]  # CLIPVisionConfig keyword arguments
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    pretrain_batch: int = 64
    head_steps: int = 300
    head_weight_decay: float = 1e-4
    expert_epochs: int = 5
    expert_lr: float = 5e-4  # 1e-3 breaks the merges (TA 0.3 at 50%), 3e-4 leaves too small a merge gap
    expert_batch: int = 32
    lr_schedule: str = "cosine"  # for pretraining and experts; see epmq.families.offline.train.train
    # Torch threads during the build, whatever the caller set. Matmuls and reductions split their
    # sums by thread, so the count changes the rounding and with it the weights: it is part of the recipe.
    threads: int = 2
    tasks: tuple[str, ...] = field(default=TASKS)


_MNIST_LIKE = dict(image_size=28, patch_size=4, num_channels=1)

SIZES: dict[str, ZooConfig] = {
    # DESIGN §6's prototype: 0.8 M parameters, 50 tokens, a few minutes on 2 cores.
    "default": ZooConfig(
        counts={"mnist": (3500, 500, 1000), "fashion_mnist": (5000, 1000, 1000),
                "digits": (1000, 397, 400), "textures": (3000, 300, 600)},
        model=dict(_MNIST_LIKE, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
        # 2 threads, torch's default on 2 cores, keeps the build as fast as before: a training step
        # (batch 64) took 165-200 ms on 2 idle cores against 280-345 ms on 1 thread. The price: when
        # other jobs load the cores the two threads wait on each other (a build then took 1767 s).
        threads=2,
    ),
    # For tests: same sources and code path, a 2-layer 32-wide tower, 17 tokens, ~15 s to build.
    # Trained long enough that every expert beats the task-arithmetic merge on its own task (by
    # 4-16 points on the 96 test images), so tests can check orderings rather than noise.
    "micro": ZooConfig(
        counts={t: (256, 48, 96) for t in TASKS},
        model=dict(image_size=28, patch_size=7, num_channels=1, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=2),
        pretrain_epochs=3, pretrain_batch=32, head_steps=100, expert_epochs=10,
        # 1 thread: the matmuls are too small to share. On 2 idle cores a build took 3.5-3.9 s on either
        # count (a step 6-9 ms on 1 thread, 8-11 ms on 2); with other jobs on the cores it took 4-7 s on
        # 1 thread against 21-144 s on 2, whose threads then wait for each other at every op.
        threads=1,
    ),
}


def default_cache_dir() -> Path:
    """The zoo cache folder: $EPMQ_CACHE/zoo when EPMQ_CACHE is set, else ~/.cache/epmq/zoo."""
    root = os.environ.get("EPMQ_CACHE")
    return Path(root).expanduser() / "zoo" if root else Path.home() / ".cache" / "epmq" / "zoo"


def _split_counts(cfg: ZooConfig, task: str) -> dict[str, int]:
    return dict(zip(SPLITS, cfg.counts[task]))


def fingerprint(cfg: ZooConfig, seed: int, data: dict[str, TaskData]) -> str:
    """sha256 over the format version, the config (build threads included), the seed and every data array (hex)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "config": asdict(cfg), "seed": seed}, sort_keys=True).encode())
    for task in cfg.tasks:
        for split in SPLITS:
            for a in data[task].splits[split]:
                h.update(a.contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_sha256(root: str | Path) -> str:
    """sha256 (hex) over every tensor a zoo root holds in base/, experts/ and heads/, read from its files.

    Files go in sorted order of their path relative to root, tensors in sorted key order; each adds
    "<path>:<key>:<dtype>:<shape>" and then its raw bytes. Hashing tensors rather than file bytes
    keeps the hash independent of safetensors' header layout and metadata, so it names the weights.
    """
    root = Path(root)
    h = hashlib.sha256()
    files = sorted((p for d in ("base", "experts", "heads") for p in (root / d).rglob("*.safetensors")),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"{root} holds no safetensors files under base/, experts/ or heads/")
    for path in files:
        rel = path.relative_to(root).as_posix()
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                h.update(f"{rel}:{key}:{t.dtype}:{list(t.shape)}".encode())
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _reproducible(threads: int):
    """Run the block on `threads` torch threads with deterministic algorithms; restore the caller's after.

    warn_only: an op without a deterministic kernel warns instead of stopping the build.
    """
    num_threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(num_threads)


def _dataset_dict(task: TaskData) -> DatasetDict:
    """TaskData -> DatasetDict with an Array3D "pixel_values" column and a ClassLabel "label" column."""
    x0 = task.splits["train"][0]
    features = Features({"pixel_values": Array3D(shape=tuple(x0.shape[1:]), dtype="float32"),
                         "label": ClassLabel(names=task.classes)})
    return DatasetDict({s: Dataset.from_dict({"pixel_values": x.numpy(), "label": y.numpy()}, features=features)
                        for s, (x, y) in task.splits.items()})


def _build(root: Path, cfg: ZooConfig, seed: int, data: dict[str, TaskData], progress: bool) -> dict:
    """Train base, heads and experts into root; returns the FP metrics for the manifest."""
    torch.manual_seed(seed)  # parameter init
    g = torch.Generator().manual_seed(seed)  # rotations and batch order of the pretraining
    timings = {}
    t0 = time.perf_counter()
    base = CLIPVisionModel(CLIPVisionConfig(**cfg.model))
    pooled = torch.cat([data[t].splits["train"][0] for t in cfg.tasks])
    rotation_loss = pretrain_rotation(base, pooled, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
                                      batch_size=cfg.pretrain_batch, generator=g, schedule=cfg.lr_schedule,
                                      progress=progress)
    base.eval().save_pretrained(root / "base")
    timings["pretrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    heads: dict[str, nn.Linear] = {}
    metrics = {"base": {}, "experts": {}, "rotation_loss": rotation_loss}
    (root / "heads").mkdir()
    for task in tqdm(cfg.tasks, desc="heads: linear probes", disable=not progress, leave=False):
        x, y = data[task].splits["train"]
        with torch.no_grad():
            feats = torch.cat([base(pixel_values=xb).pooler_output for xb in x.split(500)])
        heads[task] = fit_head(feats, y, data[task].num_classes, cfg.head_weight_decay, cfg.head_steps)
        save_head(heads[task], root / "heads" / f"{task}.safetensors")
        metrics["base"][task] = accuracy(CLIPClassifier(base, heads[task]), *data[task].splits["test"])
    timings["heads_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)  # the experts' batch order, independent of the pretraining recipe
    for task in cfg.tasks:
        expert = CLIPClassifier(copy.deepcopy(base), heads[task])
        train(expert, *data[task].splits["train"], epochs=cfg.expert_epochs, lr=cfg.expert_lr,
              batch_size=cfg.expert_batch, generator=g, schedule=cfg.lr_schedule, desc=f"expert: {task}",
              progress=progress)
        expert.tower.save_pretrained(root / "experts" / task)
        metrics["experts"][task] = accuracy(expert, *data[task].splits["test"])
    timings["experts_s"] = time.perf_counter() - t0

    for task in cfg.tasks:
        _dataset_dict(data[task]).save_to_disk(str(root / "data" / task))
    for name in ("base", "experts"):
        metrics[name]["avg"] = float(np.mean([metrics[name][t] for t in cfg.tasks]))
    metrics["timings"] = timings
    return metrics


def build_zoo(size: str = "default", cache_dir: str | Path | None = None, seed: int = 0,
              progress: bool = True) -> Path:
    """Build the offline zoo of `size` ("default" or "micro") or return the cached one; returns its root.

    cache_dir defaults to default_cache_dir(). The zoo's folder name carries its fingerprint, so a
    rebuild with the same config, seed and data is a cache hit (logged) and returns at once.
    """
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; choose one of {sorted(SIZES)}")
    cfg = SIZES[size]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    g = torch.Generator().manual_seed(seed)
    data = {t: load_task(t, _split_counts(cfg, t), g)
            for t in tqdm(cfg.tasks, desc="zoo: loading data", disable=not progress, leave=False)}
    fp = fingerprint(cfg, seed, data)
    root = cache / f"{size}-{fp[:16]}"
    if (root / MANIFEST).is_file():
        log.info("zoo cache hit: %s", root)
        return root

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache))
    log.info("building %s zoo into %s", size, root)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        with _reproducible(cfg.threads):
            metrics = _build(tmp, cfg, seed, data, progress)
        metrics["timings"].update(build_s=time.perf_counter() - start, build_cpu_s=time.process_time() - cpu_start)
        manifest = {
            "format": FORMAT_VERSION, "size": size, "seed": seed, "fingerprint": fp,
            "weights_sha256": weights_sha256(tmp),
            "tasks": list(cfg.tasks),
            "num_classes": {t: data[t].num_classes for t in cfg.tasks},
            "classes": {t: data[t].classes for t in cfg.tasks},
            "splits": {t: _split_counts(cfg, t) for t in cfg.tasks},
            "config": asdict(cfg),
            "metrics": metrics,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        try:
            tmp.rename(root)
        except OSError:  # another process finished the same zoo first: keep theirs
            if not (root / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s zoo in %.1f s (%.1f s CPU): %s", size, metrics["timings"]["build_s"],
             metrics["timings"]["build_cpu_s"], root)
    return root


@dataclass
class Zoo:
    """A built zoo on disk: paths and loaders over the layout in this module's docstring."""

    root: Path
    manifest: dict

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def tower_dir(self, name: str) -> Path:
        """"base" or a task name -> the folder save_pretrained wrote."""
        if name == "base":
            return self.root / "base"
        if name not in self.manifest["tasks"]:
            raise ValueError(f"zoo {self.root} has no expert {name!r}; tasks: {self.tasks}")
        return self.root / "experts" / name

    def tower(self, name: str = "base") -> CLIPVisionModel:
        return CLIPVisionModel.from_pretrained(str(self.tower_dir(name))).eval()

    def head(self, task: str) -> nn.Linear:
        self.tower_dir(task)  # validates the task name
        return load_head(self.root / "heads" / f"{task}.safetensors")

    def data(self, task: str) -> DatasetDict:
        self.tower_dir(task)
        return load_from_disk(str(self.root / "data" / task))

    @property
    def weights_sha256(self) -> str | None:
        """The weights hash the manifest recorded at build time (None for zoos older than format 3)."""
        return self.manifest.get("weights_sha256")

    def verify_weights(self) -> str:
        """Recompute weights_sha256 from the files; raise ValueError if it differs from the manifest's.

        Returns the hash. Reads every tower and head once (the default zoo's weights are about 16 MB).
        """
        actual = weights_sha256(self.root)
        if actual != self.weights_sha256:
            raise ValueError(f"zoo {self.root}: weights hash {actual} does not match "
                             f"the manifest's {self.weights_sha256}")
        return actual


def open_zoo(root: str | Path) -> Zoo:
    """Open a zoo root written by build_zoo (reads and checks its manifest)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ValueError(f"{root} is not a zoo: {MANIFEST} is missing (build one with epmq.families.offline.zoo.build_zoo)")
    manifest = json.loads(path.read_text())
    missing = {"tasks", "num_classes", "config", "fingerprint", "metrics"} - manifest.keys()
    if missing:
        raise ValueError(f"{path} lacks keys {sorted(missing)}")
    return Zoo(root, manifest)
