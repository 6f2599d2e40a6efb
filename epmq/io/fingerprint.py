"""Fingerprints: cheap summaries that tell one calibration set, model or configuration from another."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch


def loader_fingerprint(loader) -> tuple[int, float]:
    """(number of batches, Σ_b (b+1) · Σ entries of batch b's tensors) of a calibration loader.

    Cheap and order-sensitive: tells one calibration set (or one batch order) from another.
    """
    count, fingerprint = 0, 0.0
    for b, batch in enumerate(loader):
        count += 1
        for v in (batch.values() if isinstance(batch, Mapping) else ()):
            if isinstance(v, torch.Tensor):
                fingerprint += (b + 1) * v.double().sum().item()
    return count, fingerprint


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (hex)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path, sample: int = 1 << 20) -> str:
    """sha256 of a file's size and its first and last `sample` bytes: cheap for multi-GB weights,
    and a re-saved checkpoint with other values changes its header or its data (hex)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > sample:
            f.seek(max(sample, size - sample))
            h.update(f.read(sample))
    return h.hexdigest()


# Calibration options that only place tensors or share work (tested bit-identical): a run may resume
# with others. tf32 and the trainer's precision change the numbers and stay in the fingerprint.
PLACEMENT = ("offload_blocks", "cache_device", "share_statistics")


def run_fingerprint(config: dict, prepared) -> dict:
    """What a calibration's result depends on, for resuming: the epmq version, the models (the merged
    weights' content, each expert file's digest), the calibration data and the options that change
    results (suite, merge, quant, anchor, data, calibration, the trainer's precision, seed). config: the run's
    resolved config."""
    import epmq

    options = {k: config.get(k) for k in ("suite", "merge", "quant", "anchor", "data", "calibration", "seed")}
    if isinstance(options["suite"], dict):
        options["suite"] = {k: v for k, v in options["suite"].items() if k != "progress"}  # display only
    options["precision"] = str((config.get("trainer") or {}).get("precision", "32-true"))  # bf16-mixed rounds
    if isinstance(options["calibration"], dict):  # where tensors wait moves them, it does not change them
        options["calibration"] = {k: v for k, v in options["calibration"].items() if k not in PLACEMENT}
    experts = {task: {str(f): file_digest(Path(f)) for f in sorted({str(p) for p in ckpt.files.values()})}
               for task, ckpt in prepared.pool.experts.items()}
    count, total = loader_fingerprint(prepared.data.train_dataloader())
    return {"epmq": epmq.__version__, "options": options,
            "models": {"merged": state_dict_digest(prepared.merged_state), "experts": experts},
            "data": {"calibration_batches": count, "calibration_sum": total}}


def resume_refusal(saved: dict, current: dict) -> str:
    """Why a run saved with fingerprint `saved` cannot go on under `current` ('' when it can), in one sentence.

    A run folder of another epmq version is refused on the version alone: between versions the package
    layout, the config's `_target_` strings and option names may move (0.2.0 moved every module into
    core/io/engine/families/jobs and the anchor choice's options from quant to anchor), so the options
    would read as changed even where the calibration is not."""
    if saved.get("epmq") != current.get("epmq"):
        return (f"it was written by epmq {saved.get('epmq')} and this is epmq {current.get('epmq')}; a run resumes "
                f"only with the version that started it: run again in a new folder, or resume with epmq "
                f"{saved.get('epmq')}")
    return describe_changes(saved, current)


def describe_changes(old: dict, new: dict, prefix: str = "") -> str:
    """'' when equal, else a sentence naming every key whose value changed (nested keys dotted)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_changes(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key} was {_short(a)}, now {_short(b)}")
    return "; ".join(changes)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
