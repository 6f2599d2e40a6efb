"""One quantized linear layer as epmq keeps it once solved: its codes packed into int32 words.

The solver's QuantResult holds the dequantized weight in float32 beside the uint8 codes, about
5 bytes a weight; calibration keeps every finished layer until the run ends (and saves it for
resume), so a QuantizedLayer keeps only what the weight is made of:

    qweight  int32   [packed_length(in, bits), out]  codes, packed along the input axis (epmq.io.packing
                                                     pack_bits; for 2, 3, 4 and 8 bits this is GPTQ's qweight)
    scales   float32 [out, n_groups]                 grid steps, as the solver computed them
    zeros    uint8   [out, n_groups]                 zero points (integer codes of 0.0)
    g_idx    int32   [in]                            group of each input column
    bias     float32 [out]                           only when the solver calibrated the bias (else None)

about bits/8 + 5/group_size bytes a weight. weight() rebuilds the solver's float32 weight with the
solver's own dequantization, (code - zero[g_idx]) * scale[g_idx], so it is bit for bit
QuantResult.weight.
"""

from __future__ import annotations

import dataclasses

import torch

from epmq.core.gptq import QuantResult
from epmq.core.quant import dequantize
from epmq.io.packing import CODE_BITS, check_code_bits, pack_bits, packed_length, unpack_bits

FIELDS = ("qweight", "scales", "zeros", "g_idx")  # the tensors of every record, as files store them
OPTIONAL = ("bias",)  # stored only when present


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """A quantized (out x in) linear layer: packed codes and grids (layout in the module docstring).

    bits: code width, 2..8; shape: (out, in); loss, damp: the solver's QuantResult.loss and .damp.
    Build one with from_result; codes() and weight() give the (out, in) codes and weight back.
    """

    bits: int
    shape: tuple[int, int]
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float
    damp: float = 0.0
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in CODE_BITS:
            raise ValueError(f"QuantizedLayer.bits must be one of {CODE_BITS}, got {self.bits!r}")
        if len(self.shape) != 2:
            raise ValueError(f"QuantizedLayer.shape must be (out, in), got {self.shape!r}")
        out_features, in_features = self.shape
        expected = {"qweight": ((packed_length(in_features, self.bits), out_features), torch.int32),
                    "scales": ((out_features, self.scales.shape[-1]), torch.float32),
                    "zeros": ((out_features, self.scales.shape[-1]), torch.uint8),
                    "g_idx": ((in_features,), torch.int32)}
        if self.bias is not None:
            expected["bias"] = ((out_features,), torch.float32)
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"QuantizedLayer of shape {tuple(self.shape)} at {self.bits} bits: {name} must be "
                                 f"{dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if in_features and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.n_groups):
            raise ValueError(f"g_idx must index the {self.n_groups} groups, "
                             f"got {int(self.g_idx.min())} .. {int(self.g_idx.max())}")

    @classmethod
    def from_result(cls, result: QuantResult, bits: int, bias: torch.Tensor | None = None) -> QuantizedLayer:
        """The solver's result at `bits` bits, its codes packed on their device; the record is on the CPU.
        bias: the layer's calibrated bias (out,), when the solver gave one.

        ValueError when a code or zero point does not fit in `bits` bits or a zero point is not an integer.
        """
        maxq = (1 << check_code_bits(bits)) - 1
        zeros = result.zeros.detach()
        if zeros.numel() and not (torch.equal(zeros, zeros.round()) and 0 <= zeros.min() and zeros.max() <= maxq):
            raise ValueError(f"zero points must be integers in 0 .. {maxq} for {bits} bits")
        codes = result.qweight.detach()  # (out, in)
        return cls(bits=bits, shape=tuple(codes.shape),
                   qweight=pack_bits(codes.t(), bits).cpu(),
                   scales=result.scales.detach().to("cpu", torch.float32).contiguous(),
                   zeros=zeros.to("cpu", torch.uint8).contiguous(),
                   g_idx=result.g_idx.detach().to("cpu", torch.int32).contiguous(),
                   loss=float(result.loss), damp=float(result.damp),
                   bias=None if bias is None else bias.detach().to("cpu", torch.float32).contiguous())

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes in 0 .. 2^bits - 1 (QuantResult.qweight)."""
        return unpack_bits(self.qweight, self.bits, self.shape[1]).t().contiguous()

    def weight(self) -> torch.Tensor:
        """(out, in) float32 grid values (code - zero[g_idx]) * scale[g_idx]: QuantResult.weight, bit for bit."""
        g = self.g_idx.long()
        return dequantize(self.codes(), self.scales[:, g], self.zeros.float()[:, g])

    @property
    def nbytes(self) -> int:
        """Bytes of the four tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """{"qweight", "scales", "zeros", "g_idx"} and "bias" when there is one: what a file needs besides
        bits, loss and damp (the shape is (qweight.shape[1], g_idx.shape[0]))."""
        return {f: getattr(self, f) for f in FIELDS + OPTIONAL if getattr(self, f) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: int, loss: float, damp: float) -> QuantizedLayer:
        """The record whose tensors() are `tensors` (ValueError naming what does not fit)."""
        missing = [k for k in FIELDS if k not in tensors]
        if missing:
            raise ValueError(f"a quantized layer needs qweight, scales, zeros and g_idx; missing {missing}")
        shape = (tensors["qweight"].shape[-1], tensors["g_idx"].shape[0])
        return cls(bits, shape, tensors["qweight"], tensors["scales"], tensors["zeros"], tensors["g_idx"],
                   float(loss), float(damp), tensors.get("bias"))
