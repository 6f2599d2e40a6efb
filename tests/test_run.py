"""The main job through Hydra's compose API, on the micro offline zoo (built once, in a tmp cache)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_cfg, wandb_finished, wandb_history
from epmq.run import run


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


@pytest.mark.parametrize("select_by,key,best", [("nll", "select_avg_nll", min), ("acc", "select_avg_acc", max)])
def test_auto_strength_picks_the_best_selection_score(tmp_path, zoo_cache, select_by, key, best):
    cfg = make_cfg(tmp_path, zoo_cache, "quant.candidates.strength=[0.0,1.0,.inf]",
                   "quant.candidates.form=[output]", "evaluate_references=false", "save_model=false",
                   f"quant.select_by={select_by}")
    report = run(cfg)
    scores = {s["strength"]: s[key] for s in report["selection"]}
    assert set(scores) == {0.0, 1.0, math.inf}
    assert scores[report["quant"]["strength"]] == best(scores.values())
    assert set(report["metrics"]) == {"quantized"}
    assert not (tmp_path / "quantized_model").exists()


@pytest.mark.parametrize("override,match", [
    ("quant.bits=9", "bits"), ("quant.strength=-1", "strength"), ("quant.form=sideways", "form"),
    ("quant.method=awq", "method"), ("quant.group_size=0", "group_size"),
    ("data.calib_samples=0", "calib_samples"), ("suite.tasks=[mnist,imagenet]", "imagenet"),
    ("quant.select_by=loss", "select_by"),
])
def test_bad_options_fail_fast_naming_the_option(tmp_path, zoo_cache, override, match):
    cfg = make_cfg(tmp_path, zoo_cache, override)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "report.json").exists()


def test_wandb_offline_run_records_test_metrics(tmp_path, zoo_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tmp_path, zoo_cache, "quant=rtn", "logger=wandb", "save_model=false",
                   "evaluate_references=false")
    report = run(cfg)
    runs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline W&B run under {tmp_path}, found {runs}"
    # complete as soon as run() returns: W&B's finish() alone leaves the file's tail unwritten
    assert wandb_finished(runs[0]), "the W&B run file lacks its exit record when run() returns"
    history = wandb_history(runs[0])
    assert history["test/avg_acc"] == pytest.approx(report["objective"])
    for task in report["suite"]["tasks"]:
        assert history[f"test/{task}/acc"] == pytest.approx(report["metrics"]["quantized"][task])
    assert "calib/block_1/time_s" in history and history["calib/block_1/mlp.fc2/loss"] > 0


def test_train_py_prints_the_job_config():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "quant=gptq", "quant.bits=3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "method: gptq" in out and "bits: 3" in out
