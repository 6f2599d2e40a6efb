"""A run killed with SIGKILL in the middle of calibration resumes where it stopped and ends with the
weights of an uninterrupted run, bit for bit; a changed configuration is refused by name. The saved
steps hold packed codes (epmq.io.quantized_layer), from which a resumed module rebuilds the weights and
continues bit for bit; step files of the older unpacked format are refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import epmq
from epmq.core.solvers import GPTQ
from epmq.engine.calibration import BlockwiseCalibration
from epmq.io.step_store import StepStore
from epmq.jobs.run import run

from helpers.config import ROOT, make_cfg
from helpers.families import FAMILIES, TASKS, loader
from helpers.tiny import trainer_for

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
    proc = train(killed, zoo_cache, "+callbacks.killer._target_=helpers.killer.KillInStep", "+callbacks.killer.step=5",
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


def test_a_run_folder_of_another_epmq_version_is_refused_naming_both_versions(tmp_path, zoo_cache):
    out = tmp_path / "run"
    run(make_cfg(out, zoo_cache, *OPTIONS, "save_model=false"))
    # as epmq 0.1.0 wrote it: its version, and its layout's targets and option names
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    options = fingerprint["options"]
    options["quant"] = {**options["quant"], "_target_": "epmq.solvers.EPMQ", **options.pop("anchor")}
    fingerprint["epmq"] = "0.1.0"
    (out / "fingerprint.json").write_text(json.dumps(fingerprint))
    with pytest.raises(ValueError) as refused:
        run(make_cfg(out, zoo_cache, *OPTIONS, "save_model=false", f"resume={out}"))
    message = str(refused.value)
    assert message == (f"cannot resume {out}: it was written by epmq 0.1.0 and this is epmq {epmq.__version__}; "
                       f"a run resumes only with the version that started it: run again in a new folder, or resume "
                       f"with epmq 0.1.0")
    assert epmq.__version__ != "0.1.0" and "\n" not in message


def test_saved_steps_are_packed_and_a_resumed_module_continues_bit_for_bit(tmp_path):
    """Tiny Llama, 3-bit act-order GPTQ, true-sequential: the steps saved by a whole run, reloaded, give
    its weights exactly; a module resumed after 5 of its 8 steps ends with the whole run's weights."""
    family = FAMILIES["llama"]
    batches = family.batches(torch.Generator().manual_seed(3))
    solver = GPTQ(bits=3, group_size=16, act_order=True, blocksize=16)

    def module(resume=()):
        return BlockwiseCalibration(family.base(), family.adapter, solver, TASKS, true_sequential=True, resume=resume)

    whole = module()
    trainer_for(whole).fit(whole, train_dataloaders=loader(batches))
    store = StepStore(tmp_path / "steps", {"run": "whole"})
    for step in whole.finished:
        store.save(step)
    weights = {name: whole.model.get_submodule(name).weight.detach().clone() for name in whole.quant_results}

    # the files hold the packed form: int32 words, float32 grids, uint8 zeros, int32 g_idx, no float weight
    files = sorted((tmp_path / "steps").glob("step_*.safetensors"))
    assert len(files) == len(whole.schedule) == 8
    dtypes = {"qweight": torch.int32, "scales": torch.float32, "zeros": torch.uint8, "g_idx": torch.int32}
    for file in files:
        tensors = load_file(str(file))
        for layer in {key.rpartition(".")[0] for key in tensors}:
            t = {f: tensors[f"{layer}.{f}"] for f in dtypes}
            assert {f: v.dtype for f, v in t.items()} == dtypes and len(tensors) % 4 == 0
            out_features, in_features = weights[layer].shape
            assert t["qweight"].shape == (3 * in_features // 32, out_features)  # 3 words per 32 codes
            assert t["scales"].shape == t["zeros"].shape == (out_features, in_features // 16)
        # past its header, a file holds exactly the records' bytes (QuantizedLayer.nbytes)
        header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        step = whole.finished[int(file.stem.split("_")[1])]
        assert file.stat().st_size - header == sum(r.nbytes for r in step.results.values())

    loaded = StepStore(tmp_path / "steps", {"run": "whole"}).load()
    assert [(s.index, s.label, s.layers, s.metrics) for s in loaded] == \
        [(s.index, s.label, tuple(s.layers), s.metrics) for s in whole.finished]
    again = module()
    again.apply_finished(loaded)
    for name, w in weights.items():
        assert torch.equal(again.model.get_submodule(name).weight, w), name
        assert torch.equal(again.quant_results[name].qweight, whole.quant_results[name].qweight), name

    resumed = module(resume=loaded[:5])
    trainer_for(resumed, max_epochs=resumed.remaining_steps).fit(resumed, train_dataloaders=loader(batches))
    assert len(resumed.finished) == 8
    for name, w in weights.items():
        assert torch.equal(resumed.model.get_submodule(name).weight, w), name


def test_step_files_of_the_unpacked_format_are_refused_by_name(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "progress.json").write_text(json.dumps({"fingerprint": {"run": 1}, "steps": [], "extra": {}}))
    with pytest.raises(ValueError, match=r"cannot resume .*step format 1, this epmq reads format 2"):
        StepStore(folder, {"run": 1}).load()
