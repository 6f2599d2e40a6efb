"""Saving a quantized model: dequantized weights, the quantizer's parameters and the resolved config.

Layout of the folder (written under a temporary name, then renamed, so it is never half-written):

    config.json, model.safetensors   the model's save_pretrained (dequantized float weights)
    quantizer.safetensors            per quantized layer L: L.qweight (out x in, uint8 codes),
                                     L.scales / L.zeros (out x groups), L.g_idx (in,)
    quantization.json                bits, group size, ... and the run's resolved config
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from epmq.gptq import QuantResult


def save_quantized(model, results: dict[str, QuantResult], out_dir: str | Path, meta: dict) -> Path:
    """Write the quantized `model` (a transformers PreTrainedModel) to `out_dir`.

    results: full layer name -> QuantResult (codes, scales, zeros, g_idx) of every quantized layer.
    meta: JSON-serialisable description (quantization settings, resolved config) for quantization.json.
    Replaces an existing `out_dir` only once the new folder is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, r in results.items():
            for field in ("qweight", "scales", "zeros", "g_idx"):
                tensors[f"{name}.{field}"] = getattr(r, field).detach().cpu().contiguous()
        save_file(tensors, str(tmp / "quantizer.safetensors"))
        (tmp / "quantization.json").write_text(json.dumps(meta, indent=2, default=str))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
