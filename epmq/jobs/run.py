"""run(cfg): the job `python train.py` runs, chosen by `job._target_` (conf/train.yaml).

    job: {_target_: epmq.jobs.quantize.quantize}      the main job (default)
    job: {_target_: epmq.jobs.compare.compare}        every method side by side (experiment=compare)

A job is a function of the whole config that returns its report (a dict with an "objective").
"""

from __future__ import annotations

from hydra.utils import get_method
from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    """Run the job `cfg.job._target_` names on `cfg`; returns its report."""
    target = (cfg.get("job") or {}).get("_target_")
    if not target:
        raise ValueError("job._target_ is not set: it names the job to run (e.g. epmq.jobs.quantize.quantize)")
    try:
        job = get_method(target)
    except Exception as e:
        raise ValueError(f"job._target_: cannot import {target!r} ({e})") from None
    return job(cfg)
