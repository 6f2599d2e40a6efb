"""Resumable calibration: every finished step saved in the run folder, atomically.

A StepStore is one folder per calibration (one anchor candidate, one comparison unit):

    progress.json             the run's fingerprint, and per finished step its index, label, layers,
                              per-layer metrics, losses and damping, and the file holding its codes
    step_<index>.safetensors  per quantized layer L of the step: L.qweight (uint8 codes), L.scales,
                              L.zeros, L.g_idx

Each file is written under a temporary name and renamed into place, the step file before the
progress file that lists it, so a run killed at any moment leaves either the old or the new state,
never a half-written one (a temporary file of the interrupted write may remain, and is removed on
resume). Reloaded weights are rebuilt from the codes with the same dequantization as the solver, so
a resumed calibration continues bit for bit. The fingerprint (models, data, configuration, epmq
version) must match to resume; otherwise the store refuses and names what changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file, save_file

from epmq.gptq import QuantResult
from epmq.module import FinishedStep
from epmq.quant import dequantize
from epmq.report import write_atomic, write_json_atomic

PROGRESS = "progress.json"
_FIELDS = ("qweight", "scales", "zeros", "g_idx")


class StepStore:
    """Finished steps of one calibration under `folder`, tied to a fingerprint (a JSON-able dict)."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back
        self.steps: list[dict] = []
        self.extra: dict = {}

    @property
    def exists(self) -> bool:
        return (self.folder / PROGRESS).is_file()

    def load(self) -> list[FinishedStep]:
        """The finished steps on disk (none for a new store); ValueError if the fingerprint differs."""
        if rank_zero_only.rank == 0:  # the writer's own leftovers: temporary files of an interrupted write
            for stale in self.folder.glob(".*"):
                stale.unlink(missing_ok=True)
        if not self.exists:
            return []
        progress = json.loads((self.folder / PROGRESS).read_text())
        changed = describe_changes(progress["fingerprint"], self.fingerprint)
        if changed:
            raise ValueError(f"cannot resume {self.folder}: {changed}")
        self.steps, self.extra = progress["steps"], progress.get("extra", {})
        finished = []
        for entry in self.steps:
            tensors = load_file(str(self.folder / entry["file"]))
            results = {}
            for layer, info in entry["results"].items():
                q, s, z, g = (tensors[f"{layer}.{f}"] for f in _FIELDS)
                weight = dequantize(q.float(), s.index_select(1, g), z.index_select(1, g))
                results[layer] = QuantResult(weight, q, s, z, g, info["loss"], info["damp"])
            finished.append(FinishedStep(entry["index"], entry["label"], tuple(entry["layers"]), results,
                                         entry["metrics"]))
        return finished

    def save(self, step: FinishedStep) -> None:
        """Add a finished step: its codes file, then the progress file listing it."""
        name = f"step_{step.index:05d}.safetensors"
        tensors = {f"{layer}.{f}": getattr(r, f).contiguous() for layer, r in step.results.items() for f in _FIELDS}
        write_atomic(self.folder / name, lambda tmp: save_file(tensors, str(tmp)))
        self.steps = [s for s in self.steps if s["index"] != step.index] + [{
            "index": step.index, "label": step.label, "layers": list(step.layers), "file": name,
            "metrics": step.metrics,
            "results": {layer: {"loss": r.loss, "damp": r.damp} for layer, r in step.results.items()}}]
        self._write()

    def record(self, **extra) -> None:
        """Keep small JSON facts beside the steps (e.g. a candidate's selection scores)."""
        self.extra.update(extra)
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.folder / PROGRESS, {"fingerprint": self.fingerprint, "steps": self.steps,
                                                   "extra": self.extra})


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

