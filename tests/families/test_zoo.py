"""The offline zoo builder (micro size): layout, manifest, loading, determinism, cache, classifier."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from epmq.families.offline import zoo as zoo_mod
from epmq.families.offline.classifier import CLIPClassifier, accuracy, load_head, tower_state_dict
from epmq.families.offline.heads import fit_head
from epmq.families.offline.pretrain import rotate_batch
from epmq.families.offline.sources import TASKS
from epmq.families.offline.suite import OfflineSuite
from epmq.families.offline.zoo import SIZES, build_zoo, default_cache_dir, open_zoo, weights_sha256

MICRO = SIZES["micro"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo-cache")
    return cache, build_zoo("micro", cache_dir=cache, seed=0, progress=False)


def test_layout_and_manifest(built):
    _, root = built
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["tasks"] == list(TASKS)
    assert manifest["num_classes"] == {"mnist": 10, "fashion_mnist": 10, "digits": 10, "textures": 3}
    assert manifest["config"]["model"] == MICRO.model
    assert len(manifest["fingerprint"]) == 64 and root.name.endswith(manifest["fingerprint"][:16])
    assert manifest["weights_sha256"] == weights_sha256(root) and len(manifest["weights_sha256"]) == 64
    for name in ("base", "experts"):
        assert set(manifest["metrics"][name]) == set(TASKS) | {"avg"}
    for folder in [root / "base"] + [root / "experts" / t for t in TASKS]:
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    hidden = MICRO.model["hidden_size"]
    for task in TASKS:
        head = load_file(str(root / "heads" / f"{task}.safetensors"))
        assert head["weight"].shape == (manifest["num_classes"][task], hidden)
        assert head["bias"].shape == (manifest["num_classes"][task],)


def test_saved_data_matches_manifest(built):
    _, root = built
    zoo = open_zoo(root)
    for task in zoo.tasks:
        dd = zoo.data(task)
        assert set(dd) == {"train", "calibration", "test"}
        for split, n in zoo.manifest["splits"][task].items():
            assert len(dd[split]) == n
            assert dd[split].column_names == ["pixel_values", "label"]
        x = dd["test"].with_format("torch")[:2]["pixel_values"]
        assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32


def test_models_load_and_experts_moved_from_base(built):
    _, root = built
    base = CLIPVisionModel.from_pretrained(str(root / "base"))
    assert base.config.hidden_size == MICRO.model["hidden_size"]
    base_sd = base.state_dict()
    for task in TASKS:
        expert_sd = CLIPVisionModel.from_pretrained(str(root / "experts" / task)).state_dict()
        assert expert_sd.keys() == base_sd.keys()
        moved = sum(float((expert_sd[k] - base_sd[k]).abs().sum()) for k in base_sd if base_sd[k].is_floating_point())
        assert moved > 0  # fine-tuning changed the tower


def test_classifier_round_trip_reproduces_manifest_metrics(built):
    _, root = built
    zoo = open_zoo(root)
    task = "textures"
    model = CLIPClassifier.from_pretrained(root / "experts" / task, root / "heads" / f"{task}.safetensors")
    test = zoo.data(task)["test"].with_format("torch")[:]
    logits = model(test["pixel_values"][:5])
    assert logits.shape == (5, zoo.manifest["num_classes"][task])
    assert not any(p.requires_grad for p in model.head.parameters())
    acc = accuracy(model, test["pixel_values"], test["label"])
    assert acc == pytest.approx(zoo.manifest["metrics"]["experts"][task])


def test_same_seed_rebuilds_identically_elsewhere(built, tmp_path):
    _, root = built
    again = build_zoo("micro", cache_dir=tmp_path, seed=0, progress=False)
    assert again.name == root.name
    for rel in ("base/model.safetensors", "experts/digits/model.safetensors", "heads/mnist.safetensors"):
        a, b = load_file(str(root / rel)), load_file(str(again / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open_zoo(again).verify_weights() == open_zoo(root).weights_sha256


# Builds the micro zoo under the thread count given in argv[1] (also set in the environment by the
# caller, so MKL and OpenMP start with it) and prints the manifest's and the recomputed weights hash.
_BUILD_WITH_THREADS = """
import json, sys, torch
threads, cache = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(threads)
from epmq.families.offline.zoo import build_zoo, open_zoo, weights_sha256
root = build_zoo("micro", cache_dir=cache, seed=0, progress=False)
print(json.dumps({"manifest": open_zoo(root).weights_sha256, "files": weights_sha256(root),
                  "threads_after": torch.get_num_threads()}))
"""


@pytest.mark.slow  # two builds in subprocesses: 12 s of the fast suite's budget
def test_weights_do_not_depend_on_the_callers_threads(built, tmp_path):
    # Without the builder's fixed thread count, 1 and 2 threads gave different micro weights.
    _, root = built
    runs = {}
    for threads in (1, 2):  # both at once: each build holds one thread
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        runs[threads] = subprocess.Popen(
            [sys.executable, "-c", _BUILD_WITH_THREADS, str(threads), str(tmp_path / f"cache-{threads}")],
            env=env, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for threads, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results[threads] = json.loads(out.strip().splitlines()[-1])
    for threads, r in results.items():
        assert r["threads_after"] == threads  # the caller's setting is restored
        assert r["files"] == r["manifest"]
    assert results[1]["manifest"] == results[2]["manifest"] == open_zoo(root).weights_sha256


def test_build_settings_are_restored_after_an_error():
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with zoo_mod._reproducible(1):
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("boom")
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_verify_weights_catches_changed_files(built, tmp_path):
    _, root = built
    copy = tmp_path / "zoo"
    for name in ("base", "experts", "heads"):
        shutil.copytree(root / name, copy / name)
    shutil.copy(root / "zoo.json", copy / "zoo.json")
    zoo = open_zoo(copy)
    assert zoo.verify_weights() == zoo.weights_sha256
    head = load_file(str(copy / "heads" / "digits.safetensors"))
    head["bias"][0] += 1e-3
    save_file(head, str(copy / "heads" / "digits.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        zoo.verify_weights()


def test_suite_report_names_the_weights(built):
    cache, root = built
    described = OfflineSuite("micro", cache_dir=str(cache), progress=False).describe()
    assert described["weights_sha256"] == open_zoo(root).weights_sha256


def test_second_build_is_a_cache_hit(built, caplog):
    cache, root = built
    stamp = (root / "zoo.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="epmq.families.offline.zoo"):
        assert build_zoo("micro", cache_dir=cache, seed=0, progress=False) == root
    assert "cache hit" in caplog.text
    assert (root / "zoo.json").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [root.name]  # no temporary folders left


def test_other_seed_other_fingerprint():
    g0, g1 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    data0 = {t: zoo_mod.load_task(t, zoo_mod._split_counts(MICRO, t), g0) for t in MICRO.tasks}
    data1 = {t: zoo_mod.load_task(t, zoo_mod._split_counts(MICRO, t), g1) for t in MICRO.tasks}
    fp = zoo_mod.fingerprint(MICRO, 0, data0)
    assert fp == zoo_mod.fingerprint(MICRO, 0, data0)
    assert fp != zoo_mod.fingerprint(MICRO, 0, data1)  # data changed
    assert fp != zoo_mod.fingerprint(MICRO, 1, data0)  # seed changed


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(root, *args):
        (root / "base").mkdir()
        (root / "base" / "half-written").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(zoo_mod, "_build", explode)
    with pytest.raises(RuntimeError, match="boom"):
        build_zoo("micro", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_follows_epmq_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EPMQ_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "zoo"
    monkeypatch.delenv("EPMQ_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "epmq", "zoo")


def test_bad_inputs_name_the_fault(tmp_path, built):
    _, root = built
    with pytest.raises(ValueError, match="'huge'"):
        build_zoo("huge", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="zoo.json"):
        open_zoo(tmp_path)
    with pytest.raises(ValueError, match="'cifar10'"):
        open_zoo(root).tower("cifar10")


def test_legacy_prefixed_state_dict_fits_a_v5_tower(built):
    _, root = built
    tower = CLIPVisionModel.from_pretrained(str(root / "experts" / "mnist"))
    legacy = {"vision_model." + k: v for k, v in tower.state_dict().items()}
    fresh = CLIPVisionModel(tower.config)
    fresh.load_state_dict(tower_state_dict(legacy))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(fresh(pixel_values=x).pooler_output, tower(pixel_values=x).pooler_output)


def test_load_head_rejects_incomplete_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3, 4)}, str(tmp_path / "h.safetensors"))
    with pytest.raises(ValueError, match="bias"):
        load_head(tmp_path / "h.safetensors")


def test_fit_head_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(3, 8, generator=g)
    y = torch.arange(90) % 3
    feats = centers[y] + 0.3 * torch.randn(90, 8, generator=g)
    head = fit_head(feats, y, 3)
    assert (head(feats).argmax(-1) == y).float().mean() == 1.0
    with pytest.raises(ValueError, match="labels"):
        fit_head(feats, y + 1, 3)


def test_rotation_labels_undo_the_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 6, 6, generator=g)
    rotated, k = rotate_batch(x, torch.zeros(16, dtype=torch.long), g)
    assert k.min() >= 0 and k.max() <= 3 and len(set(k.tolist())) > 1
    restored = torch.stack([torch.rot90(img, -int(r), dims=(1, 2)) for img, r in zip(rotated, k)])
    assert torch.equal(restored, x)
