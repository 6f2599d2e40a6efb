"""Arithmetic precision of calibration: fast block forwards, exact statistics.

Block forwards may run under torch.autocast (bfloat16 / float16) and, on CUDA, with TF32 matrix
products; both round the hidden states and the layer outputs to about 8-10 significant bits. The
statistics that GPTQ and E-PMQ solve with (H = Σ w X̂ᵀX̂, the cross term) are always multiplied
from float32 copies with autocast and TF32 off (`exact_products`), and summed in float64
(epmq.stats), so what a faster forward changes is the inputs those sums see, not the sums.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of an autocast option (None, "bfloat16" or "float16"); ValueError otherwise."""
    if name is None:
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be null (float32 forwards) or one of {sorted(AUTOCAST_DTYPES)}, got {name!r}")
    return AUTOCAST_DTYPES[name]


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
def forward_precision(device: torch.device, dtype: torch.dtype | None, allow_tf32: bool):
    """Block forwards under autocast to `dtype` (None: as the model is) and with TF32 if allowed."""
    with ExitStack() as stack:
        if dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        if allow_tf32:
            stack.enter_context(tf32(True))
        yield


@contextmanager
def exact_products(device: torch.device):
    """Autocast and TF32 off: products in the precision of their operands (statistics)."""
    with torch.autocast(device.type, enabled=False), tf32(False):
        yield
