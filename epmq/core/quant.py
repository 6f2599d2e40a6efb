"""Min-max quantization grids, as in GPTQ (Frantar et al., 2023).

A row (or a group of columns within a row) of W gets a uniform grid of 2^bits points
{scale * (k - zero) : k = 0 .. maxq}, maxq = 2^bits - 1, spanning [min(w, 0), max(w, 0)]
so that 0 is always on the grid (a zero weight stays exactly zero). Asymmetric grids put
`zero` at round(-min / scale); symmetric grids span [-max|w|, max|w|] with zero = (maxq + 1) / 2.

    codes = clamp(round(w / scale) + zero, 0, maxq)          (integers 0 .. maxq)
    w_q   = scale * (codes - zero)

`scale` and `zero` are float tensors; `zero` holds integers. Everything here is a pure function
of tensors and works on any device and float dtype.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one linear layer.

    bits:          2..8, grid of 2^bits points.
    group_size:    columns (input features) sharing one scale/zero per row; -1 for one grid per row.
    sym:           symmetric grid (zero fixed at the middle code) instead of min-max asymmetric.
    act_order:     GPTQ processes columns by descending diag(H) (the most active inputs first).
    static_groups: with act_order, fit every group's grid up front on the unquantized weights
                   (groups stay contiguous in the original column order); no effect when group_size=-1.
    percdamp:      GPTQ damping, percdamp * mean(diag H) is added to diag H (> 0).
    blocksize:     GPTQ lazy-batch width (columns per block); groups are refitted at block starts.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(
                f"QuantSpec.group_size must be -1 (one grid per row) or a positive integer, "
                f"got {self.group_size!r}"
            )
        for name in ("sym", "act_order", "static_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if (
            isinstance(self.percdamp, bool)
            or not isinstance(self.percdamp, (int, float))
            or not math.isfinite(self.percdamp)
            or self.percdamp <= 0
        ):
            raise ValueError(f"QuantSpec.percdamp must be a finite number > 0, got {self.percdamp!r}")
        if not is_int(self.blocksize) or self.blocksize <= 0:
            raise ValueError(f"QuantSpec.blocksize must be a positive integer, got {self.blocksize!r}")

    @property
    def maxq(self) -> int:
        """Largest integer code, 2^bits - 1."""
        return 2**self.bits - 1


def grid_params(xmin, xmax, bits, sym=False):
    """Scale and zero of the min-max grid for given ranges.

    xmin, xmax: (...) tensors, the smallest and largest value of each slice.
    Returns scale, zero: (...) float tensors in xmin's dtype; zero holds integers in 0..maxq.
    """
    maxq = 2**bits - 1
    # The grid must contain 0, so the range is widened to include it.
    xmin = torch.clamp(xmin, max=0)
    xmax = torch.clamp(xmax, min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    # An all-zero slice still needs a valid (non-zero) scale.
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(x, bits, sym=False, dim=-1):
    """Min-max grid of each slice of x along `dim`.

    x: (..., k, ...) weights; the grid is fitted over dimension `dim` (k values per slice).
    Returns scale, zero with `dim` removed.
    """
    return grid_params(x.amin(dim), x.amax(dim), bits, sym)


def group_params(W, group_size, bits, sym=False):
    """Grids for consecutive column groups of W.

    W: (rows, cols); group_size: columns per group, -1 for one grid per row.
    Returns scale, zero: (rows, n_groups), n_groups = ceil(cols / group_size) (1 for -1).
    The last group may be shorter; it is padded with zeros, which leave min(., 0) and
    max(., 0) unchanged.
    """
    rows, cols = W.shape
    if group_size == -1 or group_size >= cols:
        scale, zero = find_params(W, bits, sym, dim=1)
        return scale.unsqueeze(1), zero.unsqueeze(1)
    n_groups = -(-cols // group_size)
    padded = W.new_zeros(rows, n_groups * group_size)
    padded[:, :cols] = W
    return find_params(padded.view(rows, n_groups, group_size), bits, sym, dim=2)


def quantize(x, scale, zero, maxq):
    """Integer codes clamp(round(x / scale) + zero, 0, maxq), in x's float dtype.

    scale, zero broadcast against x.
    """
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(codes, scale, zero):
    """Grid values (codes - zero) * scale, as float."""
    return (codes - zero) * scale
