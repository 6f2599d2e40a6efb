"""Resumable calibration: every finished step saved in the run folder, atomically.

A StepStore is one folder per calibration (one anchor candidate, one comparison unit):

    progress.json             the run's fingerprint, the step format, and per finished step its index,
                              label, layers, per-layer metrics, bits, losses and damping, and the file
                              holding its codes
    step_<index>.safetensors  per quantized layer L of the step, as epmq.io.quantized_layer keeps it:
                              L.qweight (codes packed in int32 words), L.scales (float32), L.zeros
                              (uint8), L.g_idx (int32)

Each file is written under a temporary name and renamed into place, the step file before the
progress file that lists it, so a run killed at any moment leaves either the old or the new state,
never a half-written one (a temporary file of the interrupted write may remain, and is removed on
resume). Reloaded weights are rebuilt from the codes with the same dequantization as the solver, so
a resumed calibration continues bit for bit. The fingerprint (models, data, configuration, epmq
version) must match to resume; otherwise the store refuses and names what changed. Step files of
format 1 (unpacked uint8 codes and float32 zero points, no bits recorded) are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file, save_file
from torch import nn

from epmq.io.files import write_atomic, write_json_atomic
from epmq.io.fingerprint import resume_refusal
from epmq.io.quantized_layer import FIELDS, OPTIONAL, QuantizedLayer

PROGRESS = "progress.json"
STEP_FORMAT = 2  # 1: uint8 codes unpacked (out x in), float32 zeros; 2: QuantizedLayer's packed tensors


@dataclasses.dataclass
class FinishedStep:
    """A solved step, as the calibration keeps it and a resumed run reloads it.

    results: full layer name -> QuantizedLayer (packed codes and grids, on CPU; .weight() is the
    solver's weight, bit for bit); metrics: full layer name -> logged numbers; norms: full norm name ->
    {"weight": γ, "bias": β} (float32, CPU) for the LayerNorms the step calibrated (calibrate_norms).
    """

    index: int
    label: str
    layers: tuple[str, ...]
    results: dict[str, QuantizedLayer]
    metrics: dict[str, dict[str, float]]
    norms: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Write the step's quantized weights (and biases, and calibrated norms) into `model`, by full name."""
        for name, record in self.results.items():
            linear = model.get_submodule(name)
            linear.weight.copy_(record.weight().to(linear.weight))  # the solver's weight, bit for bit
            if record.bias is not None:
                linear.bias.copy_(record.bias.to(linear.bias))
        for name, params in self.norms.items():
            norm = model.get_submodule(name)
            norm.weight.copy_(params["weight"].to(norm.weight))
            norm.bias.copy_(params["bias"].to(norm.bias))


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
        changed = resume_refusal(progress["fingerprint"], self.fingerprint)
        if changed:
            raise ValueError(f"cannot resume {self.folder}: {changed}")
        step_format = progress.get("format", 1)
        if step_format != STEP_FORMAT:
            raise ValueError(f"cannot resume {self.folder}: its steps are saved in step format {step_format}, "
                             f"this epmq reads format {STEP_FORMAT} (packed codes) only; run again in a new "
                             f"folder, or resume with the epmq version that started the run")
        self.steps, self.extra = progress["steps"], progress.get("extra", {})
        finished = []
        for entry in self.steps:
            tensors = load_file(str(self.folder / entry["file"]))
            results = {}
            for layer, info in entry["results"].items():
                try:
                    results[layer] = QuantizedLayer.from_tensors({f: tensors[f"{layer}.{f}"] for f in FIELDS + OPTIONAL
                                                                  if f in FIELDS or f"{layer}.{f}" in tensors},
                                                                 info["bits"], info["loss"], info["damp"])
                except (KeyError, ValueError) as e:
                    raise ValueError(f"cannot resume {self.folder}: layer {layer} of {entry['file']} is "
                                     f"damaged ({e})") from None
            norms = {name: {p: tensors[f"{name}.{p}"] for p in ("weight", "bias")} for name in entry.get("norms", [])}
            finished.append(FinishedStep(entry["index"], entry["label"], tuple(entry["layers"]), results,
                                         entry["metrics"], norms))
        return finished

    def save(self, step: FinishedStep) -> None:
        """Add a finished step: its codes file, then the progress file listing it."""
        name = f"step_{step.index:05d}.safetensors"
        tensors = {f"{layer}.{f}": t.contiguous() for layer, r in step.results.items() for f, t in r.tensors().items()}
        tensors.update({f"{name}.{p}": t.contiguous() for name, params in step.norms.items() for p, t in params.items()})
        write_atomic(self.folder / name, lambda tmp: save_file(tensors, str(tmp)))
        self.steps = [s for s in self.steps if s["index"] != step.index] + [{
            "index": step.index, "label": step.label, "layers": list(step.layers), "file": name,
            "metrics": step.metrics, "norms": list(step.norms),
            "results": {layer: {"bits": r.bits, "loss": r.loss, "damp": r.damp} for layer, r in step.results.items()}}]
        self._write()

    def record(self, **extra) -> None:
        """Keep small JSON facts beside the steps (e.g. a candidate's selection scores)."""
        self.extra.update(extra)
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.folder / PROGRESS, {"fingerprint": self.fingerprint, "format": STEP_FORMAT,
                                                   "steps": self.steps, "extra": self.extra})
