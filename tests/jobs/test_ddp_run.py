"""`python train.py trainer=ddp` with 2 CPU processes against 1 process, end to end (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from epmq import load_quantized
from epmq.io.load import QuantLinear

ROOT = Path(__file__).resolve().parents[2]


def train(out: Path, cache: Path, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", "suite.size=micro", f"suite.cache_dir={cache}",
                    "suite.progress=false", "data.calib_samples=16", "data.select_samples=8",
                    "quant.strength=1", "quant.form=output", "evaluate_references=false",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow  # 30 s: two train.py runs; tests/test_ddp.py checks DDP against one process in the fast suite
def test_two_processes_give_the_one_process_model_and_accuracy(tmp_path):
    cache = tmp_path / "cache"
    one = train(tmp_path / "one", cache)
    two = train(tmp_path / "two", cache, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    for task, acc in one["metrics"]["quantized"].items():
        assert abs(two["metrics"]["quantized"][task] - acc) <= 0.002, task  # within 0.2 points
    m1, m2 = (load_quantized(tmp_path / run / "quantized_model") for run in ("one", "two"))
    codes = {name: m.codes() for name, m in m1.named_modules() if isinstance(m, QuantLinear)}
    assert codes and codes.keys() == {name for name, m in m2.named_modules() if isinstance(m, QuantLinear)}
    same = sum(int((c == m2.get_submodule(name).codes()).sum()) for name, c in codes.items())
    total = sum(c.numel() for c in codes.values())
    assert same / total >= 0.999, f"only {same / total:.4%} of the codes agree"


@pytest.mark.slow  # 40 s: two train.py runs
def test_two_processes_choose_each_blocks_anchor_as_one_process_does(tmp_path):
    cache = tmp_path / "cache"
    block = ("quant.strength=auto", "anchor.select=block", "anchor.candidates.strength=[0.0,1.0,10.0,.inf]", "save_model=false")
    one = train(tmp_path / "one", cache, *block)
    two = train(tmp_path / "two", cache, *block, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    assert one["quant"]["select"] == two["quant"]["select"] == "block"
    assert two["quant"]["layer_strengths"] == one["quant"]["layer_strengths"]
    for task, acc in one["metrics"]["quantized"].items():
        assert abs(two["metrics"]["quantized"][task] - acc) <= 0.002, task
