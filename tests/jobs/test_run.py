"""The main job through Hydra's compose API, on the micro offline zoo (built once, in a tmp cache)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from epmq.jobs.run import run

from helpers.config import ROOT, make_cfg
from helpers.wandb_files import wandb_config, wandb_finished, wandb_history

GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "hydra")


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_file_composes_and_instantiates(tmp_path, zoo_cache, group):
    """Each option of each group composes with the rest, and what it names can be built."""
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        cfg = make_cfg(tmp_path, zoo_cache, f"{group}={path.stem}")
        node = cfg.get(group) if group != "experiment" else cfg
        if group == "experiment":
            assert callable(get_method(cfg.job._target_))
        elif group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            with pytest.raises(Exception, match="GPU|gpu|CUDA|cuda"):  # a clear refusal without a GPU
                instantiate(cfg.trainer)
        elif group == "quant":
            from epmq.jobs.steps import solvers

            assert all(hasattr(s, "solve") for s in solvers(cfg.quant, cfg.anchor))
        elif group in ("logger", "callbacks"):
            for sub in (node or {}).values():
                assert instantiate(sub) is not None
        elif node is not None and "_target_" in node and OmegaConf.missing_keys(node):
            # a family without a default model (causal_lm): the missing option is named, nothing is built
            with pytest.raises(Exception, match=sorted(OmegaConf.missing_keys(node))[0]):
                instantiate(node)
        elif node is not None and "_target_" in node:
            assert instantiate(node) is not None, path
        assert cfg.seed == 0 and cfg.quant.bits == 4


def test_epmq_run_writes_report_model_table_and_csv_metrics(tmp_path, zoo_cache, capsys, caplog):
    cfg = make_cfg(tmp_path, zoo_cache, "quant.strength=1.0", "quant.form=output", "logger=csv")
    with caplog.at_level(logging.INFO):
        report = run(cfg)
    printed = capsys.readouterr().out
    # every phase a user waits on starts and ends with a line in the log, in order, each end with its time
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("epmq", "callbacks"))]
    phases = ["merge", "references (each expert on its task, the FP merge)", "calibration epmq/output/strength_1",
              "saving the quantized model"]
    starts = [lines.index(f"{p} ...") for p in phases]
    ends = [next(i for i, line in enumerate(lines) if line.startswith(f"{p}: done in ")) for p in phases]
    assert starts == sorted(starts) and all(a < b for a, b in zip(starts, ends))
    assert any(line.startswith("test: 192 samples in ") for line in lines)  # the quantized model's evaluation
    assert report["quant"]["spec"]["sym"] is False  # the image families' default grids: asymmetric min-max
    for row in ("experts (each on its task)", "merged (FP)", "epmq 4-bit", "acc (%), higher is better"):
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
    assert [b["block"] for b in on_disk["calibration"]] == ["block_0", "block_1"]  # the micro tower's two blocks
    assert on_disk["config"]["quant"]["_target_"] == "epmq.core.solvers.EPMQ"
    assert len(on_disk["suite"]["weights_sha256"]) == 64

    # the saved model: the GPTQ layout (tests/test_export.py checks it in depth), 4-bit layers < 0.3x float32
    model_dir = tmp_path / "quantized_model"
    weights = load_file(str(model_dir / "model.safetensors"))
    layer = "encoder.layers.0.mlp.fc1"
    assert f"{layer}.weight" not in weights and weights[f"{layer}.qweight"].dtype == torch.int32
    assert weights[f"{layer}.scales"].dtype == torch.float16 and weights[f"{layer}.bias"].dtype == torch.float32
    assert json.loads((model_dir / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert on_disk["model_dir"] == str(model_dir) and on_disk["model_size"]["quantized_layers_ratio"] <= 0.3

    # everything the module, the callbacks and the evaluators log reaches the CSV logger
    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    logged = {k: float(v) for row in rows for k, v in row.items() if v}
    assert logged["test/avg_acc"] == pytest.approx(report["objective"])
    assert logged["merged/test/avg_acc"] == pytest.approx(report["metrics"]["merged"]["avg"])
    assert logged["experts/test/avg_acc"] == pytest.approx(report["metrics"]["experts"]["avg"])
    for i in (0, 1):
        layers = on_disk["calibration"][i]["layers"]
        assert logged[f"calib/block_{i}/mlp.fc1/loss"] == pytest.approx(layers["mlp.fc1"]["loss"])
        assert logged[f"calib/block_{i}/mlp.fc1/anchor_shift"] == pytest.approx(layers["mlp.fc1"]["anchor_shift"])
        assert logged[f"calib/block_{i}/time_s"] > 0


@pytest.mark.parametrize("select_by,key,best", [("nll", "select_avg_nll", min), ("acc", "select_avg_acc", max)])
def test_auto_strength_picks_the_best_selection_score(tmp_path, zoo_cache, select_by, key, best):
    cfg = make_cfg(tmp_path, zoo_cache, "anchor.candidates.strength=[0.0,1.0,.inf]",
                   "anchor.candidates.form=[output]", "evaluate_references=false", "save_model=false",
                   f"anchor.select_by={select_by}")
    report = run(cfg)
    scores = {s["strength"]: s[key] for s in report["selection"]}
    assert set(scores) == {0.0, 1.0, math.inf}
    assert scores[report["quant"]["strength"]] == best(scores.values())
    assert set(report["metrics"]) == {"quantized"}
    assert not (tmp_path / "quantized_model").exists()


@pytest.mark.parametrize("override,match", [
    ("quant.bits=9", "quant.bits|bits"), ("quant.strength=-1", "strength"), ("quant.form=sideways", "form"),
    ("job._target_=epmq.nothing.here", "job._target_"), ("quant.group_size=0", "group_size"),
    ("data.calib_samples=0", "calib_samples"), ("suite.tasks=[mnist,imagenet]", "imagenet"),
    ("anchor.select_by=loss", "select_by"), ("merge=none", "suite.merged"),
    ("merge.scaling_factor=-1", "scaling_factor"),
])
def test_bad_options_fail_fast_naming_the_option(tmp_path, zoo_cache, override, match):
    cfg = make_cfg(tmp_path, zoo_cache, override)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "calibration").exists()


def test_options_without_a_value_are_all_named_in_one_error(tmp_path, zoo_cache):
    cfg = make_cfg(tmp_path, zoo_cache, "suite=causal_lm", "merge=none", "suite.merged=/nowhere", "quant=gptq")
    with pytest.raises(ValueError, match=r"^suite\.datasets is not set and has no default: give it on the command "
                                         r"line \(e\.g\. suite\.datasets=\.\.\.\)$"):
        run(cfg)  # one model to quantize: no base, no experts, only its calibration text is missing
    cfg = make_cfg(tmp_path, zoo_cache, "suite=causal_lm", "suite.tokenizer=???", "suite.merged=/nowhere")
    with pytest.raises(ValueError, match=r"^suite\.datasets, suite\.tokenizer are not set and have no "
                                         r"default: give them on the command line \(e\.g\. suite\.datasets=\.\.\.\)$"):
        run(cfg)


@pytest.mark.slow  # several train.py processes: 15 s
def test_command_line_errors_are_one_line_with_a_nonzero_status(tmp_path, zoo_cache):
    """At the command line a bad option prints one line and exits 1; HYDRA_FULL_ERROR=1 shows the stack."""
    def train(*overrides, **env):
        return subprocess.run([sys.executable, "train.py", "suite.size=micro", f"suite.cache_dir={zoo_cache}",
                               "suite.progress=false", f"hydra.run.dir={tmp_path / 'run'}", *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **env})

    bad = train("quant.bits=9")
    output = (bad.stdout + bad.stderr).strip().splitlines()
    assert bad.returncode == 1
    assert len(output) == 1 and "quant" in output[0] and "bits" in output[0] and "Traceback" not in bad.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "train.log"]  # only Hydra's log
    full = train("quant.bits=9", HYDRA_FULL_ERROR="1")
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_wandb_offline_run_records_config_test_and_step_metrics(tmp_path, zoo_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(tmp_path, zoo_cache, "quant.strength=1.0", "quant.form=output", "logger=wandb",
                   "save_model=false")
    report = run(cfg)
    runs = list(tmp_path.rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline W&B run under {tmp_path}, found {runs}"
    # complete as soon as run() returns: W&B's finish() alone leaves the file's tail unwritten
    assert wandb_finished(runs[0]), "the W&B run file lacks its exit record when run() returns"
    history = wandb_history(runs[0])
    assert history["test/avg_acc"] == pytest.approx(report["objective"])
    for task in report["suite"]["tasks"]:
        assert history[f"test/{task}/acc"] == pytest.approx(report["metrics"]["quantized"][task])
        assert history[f"experts/test/{task}/acc"] == pytest.approx(report["metrics"]["experts"][task])
    assert history["calib/block_1/time_s"] > 0 and history["calib/block_1/mlp.fc2/loss"] > 0
    assert history["calib/block_1/mlp.fc2/anchor_shift"] == pytest.approx(
        report["calibration"][1]["layers"]["mlp.fc2"]["anchor_shift"])
    config = wandb_config(runs[0])
    assert config["quant"]["_target_"] == "epmq.core.solvers.EPMQ" and config["quant"]["strength"] == 1.0


def test_a_merged_model_brought_by_the_user_runs_end_to_end(tmp_path, zoo_cache):
    """merge=none with suite.merged=<folder>: no merging, the folder's weights are quantized."""
    from epmq.families.offline.suite import OfflineSuite

    suite = OfflineSuite("micro", cache_dir=str(zoo_cache), progress=False)
    merged = suite.model()  # the base as "merged model": other weights than task arithmetic's
    merged.save_pretrained(tmp_path / "mine")
    mine = run(make_cfg(tmp_path / "b", zoo_cache, "quant=gptq", "merge=none", f"suite.merged={tmp_path / 'mine'}"))
    base_fp = mine["metrics"]["merged"]
    reference = run(make_cfg(tmp_path / "c", zoo_cache, "quant=gptq", "merge=task_arithmetic",
                             "merge.scaling_factor=0.0"))  # θ₀ + 0·Στ: the base again
    assert base_fp == pytest.approx(reference["metrics"]["merged"])
    assert mine["objective"] == pytest.approx(reference["objective"])


def test_train_py_prints_the_job_config():
    out = subprocess.run([sys.executable, "train.py", "--cfg", "job", "quant=gptq", "quant.bits=3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "_target_: epmq.core.solvers.GPTQ" in out and "bits: 3" in out


def test_hub_http_request_lines_are_quiet_unless_asked_for():
    """The HTTP clients under huggingface_hub and datasets log each request at INFO: at WARNING by default."""
    import logging

    from epmq.jobs.steps import HTTP_LOGGERS, quiet_libraries

    try:
        quiet_libraries()
        assert not any(logging.getLogger(name).isEnabledFor(logging.INFO) for name in HTTP_LOGGERS)
        assert logging.getLogger("httpx").isEnabledFor(logging.WARNING)
        quiet_libraries(log_http=True)
        assert all(logging.getLogger(name).isEnabledFor(logging.INFO) for name in HTTP_LOGGERS)
    finally:
        quiet_libraries()
