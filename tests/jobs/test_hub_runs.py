"""The main job from hub ids, against the local hub of tests/helpers/hub_server.py: tiny repositories laid out as
the paper's are (../shared/HUB_LAYOUTS.md) for suite=clip and suite=flan_t5, downloaded by huggingface_hub and
datasets through their online code paths. What it shows: the runs finish; only the splits a run reads are
downloaded (an `extra` split and GLUE's unlabelled test split never are); a dataset repository holding a loading
script is read from the hub's parquet conversion branch; no HTTP request line is logged unless log_http=true."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file

from epmq.jobs.run import run

from helpers import clip_zoo, t5_glue_zoo
from helpers.clip_zoo import TASKS
from helpers.config import make_cfg
from helpers.hub_server import dataset_card, parquet_files

pytestmark = pytest.mark.slow


def folder_files(folder: Path, skip=()) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def http_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "HTTP Request" in r.getMessage()]


def test_clip_run_from_the_hub(hub_server, tmp_path, caplog):
    local = tmp_path / "local"
    clip_zoo.build(local, layout="prefixed")  # experts as FusionBench's: model.safetensors with vision_model. keys
    # the base as openai's: pytorch_model.bin only, and the old preprocessor config
    base = local / "base"
    files = folder_files(base, skip=("model.safetensors", "processor_config.json"))
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(load_file(str(base / "model.safetensors")), bin_path)
    files["pytorch_model.bin"] = bin_path
    processor = json.loads((base / "processor_config.json").read_text())["image_processor"]
    files["preprocessor_config.json"] = json.dumps({
        "crop_size": clip_zoo.IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": processor["image_mean"],
        "image_std": processor["image_std"], "resample": 3, "size": clip_zoo.IMAGE})
    hub_server.add_repo("openai/clip-tiny", files)
    for task in TASKS:
        hub_server.add_repo(f"tanganke/clip-tiny_{task}", folder_files(local / "experts" / task))

    layout = "data/{split}-00000-of-00001.parquet"
    for task in TASKS:
        dd = load_from_disk(str(local / "data" / task))
        if task == "shapes":  # a split no run reads, as svhn's extra
            dd = DatasetDict({**dd, "extra": dd["train"]})
        data = parquet_files(dd, tmp_path, layout)
        if task == "colors":  # a loading script beside the parquet files: datasets refuses the repository
            hub_server.add_repo(f"tanganke/{task}", {f"{task}.py": "import datasets\n", **data}, repo_type="dataset")
            hub_server.add_repo(f"tanganke/{task}", parquet_files(dd, tmp_path, "default/{split}/0000.parquet"),
                                repo_type="dataset", revision="refs/convert/parquet")
        else:
            hub_server.add_repo(f"tanganke/{task}", {"README.md": dataset_card({"default": dd}, "data/{split}-*"), **data},
                                repo_type="dataset")

    out = tmp_path / "run"
    cfg = make_cfg(out, tmp_path / "cache" / "zoo", "suite=clip", "suite.base=openai/clip-tiny",
                   "suite.experts='tanganke/clip-tiny_{task}'", "suite.datasets='tanganke/{task}'",
                   f"suite.tasks=[{','.join(TASKS)}]", "data.select_samples=0", "data.test_samples=null",
                   "quant.strength=1.0", "quant.form=output")
    with caplog.at_level(logging.INFO):
        results = run(cfg)

    assert 0 <= results["objective"] <= 1
    assert hub_server.requested("/openai/clip-tiny/resolve/") and hub_server.requested("pytorch_model.bin")
    assert not hub_server.requested("extra-00000")  # the unused split: neither downloaded nor asked about
    assert hub_server.requested("/api/datasets/tanganke/colors/revision/refs%2Fconvert%2Fparquet")
    assert "loading script" in caplog.text and "refs/convert/parquet" in caplog.text
    assert not http_lines(caplog)  # the hub clients' request lines stay at DEBUG unless log_http=true


def test_flan_t5_run_from_the_hub(hub_server, tmp_path, caplog):
    tasks = ("sst2", "rte")
    zoo = t5_glue_zoo.build_zoo(tmp_path / "local", tasks=tasks, steps=4)
    hub_server.add_repo("google/flan-t5-tiny", folder_files(zoo["base"]))
    for task in tasks:
        hub_server.add_repo(f"tanganke/flan-t5-tiny_glue-{task}", folder_files(zoo["root"] / "experts" / task))
    # GLUE as nyu-mll/glue lays it out: a config per task, each with an unlabelled test split no run reads
    configs, files = {}, {}
    for task in tasks:
        dd = zoo["datasets"][task]
        configs[task] = DatasetDict({**dd, "test": dd["validation"]})
        files.update(parquet_files(configs[task], tmp_path, f"{task}/{{split}}-00000-of-00001.parquet"))
    hub_server.add_repo("nyu-mll/glue", {"README.md": dataset_card(configs, "{config}/{split}-*"), **files},
                        repo_type="dataset")

    out = tmp_path / "run"
    cfg = make_cfg(out, tmp_path / "cache" / "zoo", "suite=flan_t5", "suite.base=google/flan-t5-tiny",
                   "suite.experts='tanganke/flan-t5-tiny_glue-{task}'", "suite.data=nyu-mll/glue",
                   f"suite.tasks=[{','.join(tasks)}]", "data.select_samples=0", "data.test_samples=8",
                   "quant.group_size=16", "quant.strength=1.0", "quant.form=output", "log_http=true")
    with caplog.at_level(logging.INFO):
        results = run(cfg)
    assert 0 <= results["objective"] <= 1
    assert hub_server.requested("sst2/validation-00000") and hub_server.requested("rte/train-00000")
    assert not hub_server.requested("/test-00000")  # GLUE's test splits: never fetched
    assert http_lines(caplog)  # asked for: the clients' request lines are back
    assert (out / "quantized_model" / "tokenizer_config.json").is_file()  # saved beside the weights for clients
