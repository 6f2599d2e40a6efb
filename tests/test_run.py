"""The main job through Hydra's compose API, on the micro offline zoo (built once, in a tmp cache)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from safetensors.torch import load_file

from epmq.offline.zoo import build_zoo
from epmq.run import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("zoo-cache")
    build_zoo("micro", cache_dir=cache, seed=0, progress=False)
    return cache


def make_cfg(out_dir: Path, zoo_cache: Path, *overrides: str):
    """The composed train config with the micro suite, writing into out_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "suite.size=micro", f"suite.cache_dir={zoo_cache}", "suite.progress=false",
            "data.calib_samples=8", "data.select_samples=8", "data.batch_size=8", "data.test_samples=48",
            "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.mark.parametrize("group,options", [
    ("quant", ["epmq", "gptq", "rtn"]), ("merge", ["task_arithmetic", "ties", "simple_average", "none"]),
    ("trainer", ["cpu", "gpu", "ddp"]), ("logger", ["none", "csv", "wandb"])])
def test_every_config_option_composes(tmp_path, group, options):
    for option in options:
        cfg = make_cfg(tmp_path, tmp_path, f"{group}={option}")
        assert cfg.quant.bits == 4 and cfg.seed == 0


def test_epmq_run_writes_report_model_and_table(tmp_path, zoo_cache, capsys):
    cfg = make_cfg(tmp_path, zoo_cache, "quant.strength=1.0", "quant.form=output", "logger=csv")
    report = run(cfg)
    printed = capsys.readouterr().out
    for row in ("experts (each on its task)", "merged (FP32)", "epmq 4-bit"):
        assert row in printed

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["objective"] == pytest.approx(report["objective"])
    tasks = on_disk["suite"]["tasks"]
    for model in ("experts", "merged", "quantized"):
        accs = on_disk["metrics"][model]
        assert set(accs) == {*tasks, "avg"}
        assert all(0.0 <= a <= 1.0 for a in accs.values())
        assert accs["avg"] == pytest.approx(sum(accs[t] for t in tasks) / len(tasks))
    assert on_disk["quant"]["strength"] == 1.0 and on_disk["selection"] == []
    assert len(on_disk["calibration"]) == 2  # the micro tower has two blocks
    assert on_disk["config"]["quant"]["method"] == "epmq"

    # the saved model: dequantized weights equal codes mapped through their grids
    model_dir = tmp_path / "quantized_model"
    weights = load_file(str(model_dir / "model.safetensors"))
    codes = load_file(str(model_dir / "quantizer.safetensors"))
    layer = "encoder.layers.0.mlp.fc1"
    q, s, z, g = (codes[f"{layer}.{f}"] for f in ("qweight", "scales", "zeros", "g_idx"))
    dequant = (q.float() - z[:, g.long()]) * s[:, g.long()]
    assert torch.allclose(dequant, weights[f"{layer}.weight"], atol=1e-6)

    # the CSV logger got the test metrics
    metrics_csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "test/avg_acc" in metrics_csv and "calib/block_0/mlp.fc1/loss" in metrics_csv


def test_auto_strength_picks_the_best_selection_score(tmp_path, zoo_cache):
    cfg = make_cfg(tmp_path, zoo_cache, "quant.candidates.strength=[0.0,1.0,.inf]",
                   "quant.candidates.form=[output]", "evaluate_references=false", "save_model=false")
    report = run(cfg)
    scores = {s["strength"]: s["select_avg_acc"] for s in report["selection"]}
    assert set(scores) == {0.0, 1.0, math.inf}
    assert scores[report["quant"]["strength"]] == max(scores.values())
    assert set(report["metrics"]) == {"quantized"}
    assert not (tmp_path / "quantized_model").exists()


@pytest.mark.parametrize("override,match", [
    ("quant.bits=9", "bits"), ("quant.strength=-1", "strength"), ("quant.form=sideways", "form"),
    ("quant.method=awq", "method"), ("quant.group_size=0", "group_size"),
    ("data.calib_samples=0", "calib_samples"), ("suite.tasks=[mnist,imagenet]", "imagenet"),
])
def test_bad_options_fail_fast_naming_the_option(tmp_path, zoo_cache, override, match):
    cfg = make_cfg(tmp_path, zoo_cache, override)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "report.json").exists()


def wandb_history(run_file: Path) -> dict:
    """Every history row's metrics in an offline W&B run file, merged (later rows win).

    The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
    with a 7-byte header (crc32, little-endian length, kind: 1 full, 2 first, 3 middle, 4 last)
    and a chunk of a serialised wandb Record protobuf.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    pos, block, payload, history = 7, 32768, b"", {}
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
            if record.WhichOneof("record_type") == "history":
                history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
    return history


def test_wandb_offline_run_records_test_metrics(tmp_path, zoo_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tmp_path, zoo_cache, "quant=rtn", "logger=wandb", "save_model=false",
                   "evaluate_references=false")
    report = run(cfg)
    runs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline W&B run under {tmp_path}, found {runs}"
    history = wandb_history(runs[0])
    assert history["test/avg_acc"] == pytest.approx(report["objective"])
    for task in report["suite"]["tasks"]:
        assert history[f"test/{task}/acc"] == pytest.approx(report["metrics"]["quantized"][task])
    assert "calib/block_1/time_s" in history and history["calib/block_1/mlp.fc2/loss"] > 0


def test_train_py_prints_the_job_config():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "quant=gptq", "quant.bits=3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "method: gptq" in out and "bits: 3" in out
