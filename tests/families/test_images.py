"""TaskDataModule on the micro zoo's data and on a hub-format DatasetDict saved to a tmp dir."""
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage

from epmq.families.images import TaskDataModule, hub_id, load_task_dataset
from epmq.families.offline.zoo import build_zoo

TASKS = ["mnist", "textures", "digits"]


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    return build_zoo("micro", cache_dir=tmp_path_factory.mktemp("zoo-cache"), seed=0, progress=False)


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """A hub-format task "toy": PIL images + labels, splits train/test only (no calibration split).

    Image i is a constant grey of value i, so a sample's pixels reveal which row it came from.
    """
    root = tmp_path_factory.mktemp("hub")
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})

    def split(start, n):
        images = [PILImage.fromarray(np.full((8, 8), start + i, dtype=np.uint8)) for i in range(n)]
        return Dataset.from_dict({"image": images, "label": [(start + i) % 3 for i in range(n)]}, features=features)

    DatasetDict(train=split(0, 30), test=split(100, 12)).save_to_disk(str(root / "toy"))
    return root


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32))[None]  # (1, H, W)


def processor_like(image):
    """Mimics an image processor: returns {"pixel_values": [array (C, H, W)]}."""
    return {"pixel_values": [np.asarray(image, dtype=np.float32)[None]]}


def test_calibration_batches_count_exactly_and_keep_the_task(zoo_root):
    dm = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=7, select_samples=5, batch_size=3, seed=0)
    batches = list(dm.train_dataloader())
    per_task = {i: 0 for i in range(len(TASKS))}
    for b in batches:
        assert b["pixel_values"].dtype == torch.float32 and b["pixel_values"].shape[1:] == (1, 28, 28)
        assert b["label"].dtype == torch.long and b["task"].dtype == torch.long
        assert len(set(b["task"].tolist())) == 1  # one task per batch
        per_task[int(b["task"][0])] += len(b["task"])
    assert per_task == {0: 7, 1: 7, 2: 7}
    for task in TASKS:
        assert len(dm.calib_rows[task]) == 7 and len(dm.select_rows[task]) == 5
        assert not set(dm.calib_rows[task]) & set(dm.select_rows[task])


def test_batches_hold_the_rows_they_claim(zoo_root):
    dm = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=4, batch_size=4, seed=1)
    first = next(iter(dm.train_dataloader()))  # task 0's batch
    calib = load_task_dataset(TASKS[0], zoo_root)["calibration"].with_format("torch")[dm.calib_rows[TASKS[0]]]
    assert torch.equal(first["pixel_values"], calib["pixel_values"])
    assert torch.equal(first["label"], calib["label"])


def test_sampling_is_seeded_and_per_task(zoo_root):
    def rows(seed, tasks=TASKS):
        dm = TaskDataModule(tasks, root_or_hub=zoo_root, calib_samples=6, select_samples=3, seed=seed)
        dm.setup()
        return dm.calib_rows, dm.select_rows

    assert rows(0) == rows(0)
    assert rows(0)[0] != rows(1)[0]
    # A task's draw does not depend on which other tasks are present.
    assert rows(0, ["digits"])[0]["digits"] == rows(0)[0]["digits"]


def test_calibration_batches_cover_every_sample_once_one_task_per_batch(zoo_root):
    dm = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=5, batch_size=2, seed=0)
    batches = list(dm.train_dataloader())
    assert [len(b["task"]) for b in batches] == [2, 2, 1] * len(TASKS)
    assert all(b["task"].unique().numel() == 1 for b in batches)
    seen = torch.cat([torch.stack([b["task"], b["label"]], 1) for b in batches])
    assert seen[:, 0].bincount().tolist() == [5] * len(TASKS)
    flat = [i for batch in dm.calibration_batches() for i in batch]
    assert sorted(flat) == list(range(5 * len(TASKS)))  # each sample exactly once, no padding


def test_test_and_select_loaders_are_per_task(zoo_root):
    dm = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=4, select_samples=6, batch_size=16)
    tests = dm.test_dataloader()
    assert len(tests) == len(TASKS)
    test_sizes = [len(load_task_dataset(t, zoo_root)["test"]) for t in TASKS]
    assert [len(loader.dataset) for loader in tests] == test_sizes
    for i, loader in enumerate(tests):
        assert all((b["task"] == i).all() for b in loader)
    assert [len(loader.dataset) for loader in dm.select_dataloader()] == [6] * len(TASKS)
    sub = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=4, test_samples=10)
    assert [len(loader.dataset) for loader in sub.test_dataloader()] == [10] * len(TASKS)
    assert dm.num_classes == {"mnist": 10, "textures": 3, "digits": 10}


def test_evaluation_loaders_take_their_own_batch_size(zoo_root, monkeypatch):
    dm = TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=6, select_samples=6, batch_size=2,
                        eval_batch_size=5, test_samples=10, seed=0)
    assert {len(b["label"]) for b in dm.train_dataloader()} == {2}
    for loaders in (dm.test_dataloader(), dm.select_dataloader(), *dm.select_halves_dataloaders()):
        sizes = [len(b["label"]) for b in loaders[0]]
        assert sizes[0] == min(5, len(loaders[0].dataset)) and sum(sizes) == len(loaders[0].dataset)
    assert TaskDataModule(TASKS, root_or_hub=zoo_root, batch_size=3).eval_batch_size == 3  # default: batch_size
    # workers and pinned memory only with an accelerator ("auto")
    cpu = TaskDataModule(TASKS, root_or_hub=zoo_root)
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    accelerated = TaskDataModule(TASKS, root_or_hub=zoo_root)
    assert accelerated.pin_memory and accelerated.num_workers >= 1
    assert TaskDataModule(TASKS, root_or_hub=zoo_root, num_workers=0, pin_memory=False).num_workers == 0


@pytest.mark.parametrize("transform", [to_tensor, processor_like])
def test_hub_format_takes_calibration_from_train(hub_root, transform):
    dm = TaskDataModule(["toy"], root_or_hub=hub_root, calib_samples=5, select_samples=4, batch_size=10,
                        seed=0, transform=transform)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (5, 1, 8, 8)
    # Constant image i came from train row i; its label is i % 3.
    rows = batch["pixel_values"][:, 0, 0, 0].long()
    assert rows.tolist() == dm.calib_rows["toy"]
    assert torch.equal(batch["label"], rows % 3)
    test = next(iter(dm.test_dataloader()[0]))
    assert test["pixel_values"][:, 0, 0, 0].min() >= 100  # test rows come from the test split
    assert dm.num_classes == {"toy": 3}


def test_hub_ids():
    assert hub_id("mnist") == "tanganke/mnist"
    assert hub_id("stanford-cars") == "tanganke/stanford_cars"
    assert hub_id("mnist", "me/{task}-clip") == "me/mnist-clip"


def test_bad_inputs_name_the_fault(zoo_root, hub_root):
    with pytest.raises(ValueError, match="calib_samples"):
        TaskDataModule(TASKS, root_or_hub=zoo_root, calib_samples=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        TaskDataModule(TASKS, root_or_hub=zoo_root, eval_batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        TaskDataModule(TASKS, root_or_hub=zoo_root, num_workers="many")
    with pytest.raises(ValueError, match="pin_memory"):
        TaskDataModule(TASKS, root_or_hub=zoo_root, pin_memory="yes")
    with pytest.raises(ValueError, match="'cifar10'"):
        TaskDataModule(["mnist", "cifar10"], root_or_hub=zoo_root)
    with pytest.raises(ValueError, match="tasks"):
        TaskDataModule([], root_or_hub=zoo_root)
    with pytest.raises(ValueError, match="root_or_hub"):
        TaskDataModule(TASKS, root_or_hub=zoo_root / "missing")
    with pytest.raises(ValueError, match="'textures'.*exceed"):
        TaskDataModule(["textures"], root_or_hub=zoo_root, calib_samples=40, select_samples=40).setup()
    with pytest.raises(ValueError, match="transform"):
        TaskDataModule(["toy"], root_or_hub=hub_root, calib_samples=2).setup()
    with pytest.raises(ValueError, match="test_samples"):
        TaskDataModule(["toy"], root_or_hub=hub_root, calib_samples=2, test_samples=99, transform=to_tensor).setup()
