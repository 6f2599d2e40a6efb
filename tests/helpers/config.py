"""The composed train config of a test run (Hydra's compose API on the repository's conf/), and the scripts that
tests load as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]  # the repository


def make_cfg(out_dir: Path, zoo_cache: Path, *overrides: str):
    """The composed train config with the micro suite, writing into out_dir.

    The micro zoo's options (suite.size, suite.progress) apply when the overrides keep the offline
    suite; an override choosing another suite (suite=..., or an experiment that does) gets none."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        chosen = compose("train", overrides=list(overrides)).suite.get("_target_", "")
        micro = ["suite.size=micro", "suite.progress=false"] if chosen.endswith(".OfflineSuite") else []
        cfg = compose("train", return_hydra_config=True, overrides=[
            *micro, f"paths.cache_dir={zoo_cache.parent}",
            "data.calib_samples=8", "data.select_samples=8", "data.batch_size=8", "data.test_samples=48",
            "trainer.enable_progress_bar=false", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)
    return cfg


def load_results_doc():
    """scripts/results_doc.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_doc"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
