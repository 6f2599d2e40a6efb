"""Arithmetic precision of calibration: fast block forwards, exact statistics.

Block forwards may run under autocast (Trainer(precision="bf16-mixed" or "16-mixed")) and, on
CUDA, with TF32 matrix products (calibration.tf32); both round the hidden states and the layer
outputs to about 8-10 significant bits. The statistics GPTQ and E-PMQ solve with (H = Σ w X̂ᵀX̂,
the cross term) are always multiplied from float32 copies with autocast and TF32 off
(`exact_products`) and summed in float64 (epmq.core.stats): a faster forward changes the inputs those
sums see, not the sums.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def tf32(enabled: bool):
    """TF32 matrix products on CUDA (matmul and cuDNN) on or off for the duration, then as before."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def exact_products(device: torch.device):
    """Autocast and TF32 off: products in the precision of their operands (statistics)."""
    with torch.autocast(device.type, enabled=False), tf32(False):
        yield
