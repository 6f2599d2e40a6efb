"""A run killed with SIGKILL in the middle of calibration resumes where it stopped and ends with the
weights of an uninterrupted run, bit for bit; a changed configuration is refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_cfg
from epmq.run import run

OPTIONS = ["quant.strength=1.0", "quant.form=output", "calibration.true_sequential=true", "data.calib_samples=12",
           "data.batch_size=4", "data.select_samples=4", "data.test_samples=16", "evaluate_references=false"]


def train(out, cache, *overrides, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "train.py", "suite.size=micro", f"suite.cache_dir={cache}",
                           "suite.progress=false", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}",
                           *OPTIONS, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def assert_complete(folder):
    """Every file a run wrote is whole: JSON parses, safetensors load; no temporary file remains."""
    for path in folder.rglob("*"):
        if path.is_dir() or ".hydra" in path.parts:
            continue
        assert not path.name.startswith("."), f"temporary file left behind: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(str(path))


@pytest.mark.slow
def test_sigkill_mid_calibration_then_resume_gives_the_uninterrupted_weights(tmp_path, zoo_cache):
    whole = tmp_path / "whole"
    train(whole, zoo_cache)
    killed = tmp_path / "killed"
    proc = train(killed, zoo_cache, "+callbacks.killer._target_=killer.KillInStep", "+callbacks.killer.step=5",
                 check=False)
    assert proc.returncode == -signal.SIGKILL
    progress = json.loads((killed / "calibration" / "epmq" / "output" / "strength_1" / "progress.json").read_text())
    assert [s["index"] for s in progress["steps"]] == [0, 1, 2, 3, 4]  # 8 steps: killed inside step 5
    assert not (killed / "report.json").exists()
    assert_complete(killed)

    resumed = train(killed, zoo_cache, f"resume={killed}")
    assert "Traceback" not in resumed.stderr
    assert_complete(killed)
    a, b = load_file(str(whole / "quantized_model" / "model.safetensors")), load_file(str(killed / "quantized_model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    reports = [json.loads((d / "report.json").read_text()) for d in (whole, killed)]
    assert reports[0]["metrics"] == reports[1]["metrics"]


def test_resuming_with_other_options_is_refused_by_name(tmp_path, zoo_cache):
    out = tmp_path / "run"
    run(make_cfg(out, zoo_cache, *OPTIONS, "save_model=false"))
    with pytest.raises(ValueError, match=r"cannot resume .*quant\.strength was 1\.0, now 2\.0"):
        run(make_cfg(out, zoo_cache, *OPTIONS[1:], "quant.strength=2.0", f"resume={out}"))
    with pytest.raises(ValueError, match="already holds a run"):  # and no silent mixing without resume=
        run(make_cfg(out, zoo_cache, *OPTIONS))
    # the same options resume a finished calibration without redoing it, wherever its tensors wait
    again = run(make_cfg(out, zoo_cache, *OPTIONS, "save_model=false", f"resume={out}",
                         "calibration.offload_blocks=true", "calibration.cache_device=cpu"))
    assert again["calibration"][0]["layers"]
