"""epmq.io.quantized_layer: a solved layer kept as packed codes and grids rebuilds the solver's codes and
float32 weight bit for bit (2..8 bits, grouped, per-row, odd groups, act-order, static groups, RTN),
takes the bytes its format says (about bits/8 + 5/group_size a weight), and damaged input is refused."""

from __future__ import annotations

import pytest
import torch

from epmq.core.gptq import gptq, rtn
from epmq.core.quant import QuantSpec
from epmq.io.packing import pack_rows, packed_length
from epmq.io.quantized_layer import QuantizedLayer

SPECS = {
    "grouped": dict(group_size=16),
    "per-row": dict(group_size=-1),
    "odd-groups-act-order": dict(group_size=7, act_order=True),
    "act-order": dict(group_size=16, act_order=True),
    "static-groups-sym": dict(group_size=16, act_order=True, static_groups=True, sym=True),
}


def solved(name: str, bits: int):
    spec = QuantSpec(bits=bits, blocksize=16, **SPECS[name])
    gen = torch.Generator().manual_seed(bits * 100 + len(name))
    rows, cols = (37, 45) if "odd" in name else (48, 64)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(4 * cols, cols, generator=gen) * torch.linspace(0.1, 2, cols)  # act-order permutes
    return gptq(W, X.t() @ X, spec), spec


def assert_same(rec: QuantizedLayer, r) -> None:
    """The record holds exactly the result: codes, grids, g_idx, numbers, and the weight bit for bit."""
    assert torch.equal(rec.codes(), r.qweight) and rec.codes().dtype == torch.uint8
    assert torch.equal(rec.weight(), r.weight) and rec.weight().dtype == torch.float32
    assert torch.equal(rec.scales, r.scales) and torch.equal(rec.zeros.float(), r.zeros)
    assert torch.equal(rec.g_idx.long(), r.g_idx)
    assert (rec.loss, rec.damp) == (r.loss, r.damp)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_gptq_layers_come_back_bit_for_bit(name, bits):
    r, spec = solved(name, bits)
    if spec.act_order and not spec.static_groups:
        assert not torch.equal(r.g_idx, r.g_idx.sort().values)  # a real act-order g_idx
    rec = QuantizedLayer.from_result(r, bits)
    assert rec.shape == tuple(r.weight.shape) and rec.bits == bits
    assert rec.qweight.shape == (packed_length(rec.shape[1], bits), rec.shape[0])
    assert_same(rec, r)
    if bits in (2, 3, 4, 8):  # the words are GPTQ's qweight, what epmq.io.export writes as it is
        assert torch.equal(rec.qweight, pack_rows(r.qweight.t(), bits))
    # rebuilt from its own tensors (what a step file holds), it is the same layer
    assert_same(QuantizedLayer.from_tensors(rec.tensors(), bits, rec.loss, rec.damp), r)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_rtn_layers_with_zero_groups_come_back_bit_for_bit(bits):
    W = torch.randn(9, 40, generator=torch.Generator().manual_seed(bits))
    W[:3, :16] = 0  # all-zero groups
    W[3, :] = W[3, :].abs()  # non-negative rows: zero point 0
    r = rtn(W, QuantSpec(bits=bits, group_size=16))
    assert bool((r.zeros == 0).any())
    assert_same(QuantizedLayer.from_result(r, bits), r)


def test_a_vit_b_sized_layer_takes_the_bytes_its_format_says():
    """768 x 3072 (ViT-B's fc2) at 4 bits, group 128: the codes at bits/8 bytes a weight, a float32 scale
    and a uint8 zero per row and group, an int32 g_idx per input; against ~5 bytes a weight before."""
    out_features, in_features, bits, group = 768, 3072, 4, 128
    W = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    r = rtn(W, QuantSpec(bits=bits, group_size=group))
    rec = QuantizedLayer.from_result(r, bits)
    n_groups = in_features // group
    weights = out_features * in_features
    assert rec.nbytes == weights * bits // 8 + out_features * n_groups * (4 + 1) + in_features * 4
    assert rec.nbytes / weights <= bits / 8 + 5 / group + 4 / out_features <= 0.6
    before = sum(t.numel() * t.element_size() for t in (r.weight, r.qweight, r.scales, r.zeros, r.g_idx))
    assert before / weights >= 5 and rec.nbytes * 9 < before
    assert_same(rec, r)


def test_what_does_not_fit_is_refused_by_name():
    r = rtn(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), QuantSpec(bits=4, group_size=16))
    with pytest.raises(ValueError, match="0 .. 7"):  # 4-bit codes (and zeros) do not fit in 3 bits
        QuantizedLayer.from_result(r, 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedLayer.from_result(r, 9)
    bad = type(r)(r.weight, r.qweight, r.scales, r.zeros + 0.5, r.g_idx, r.loss)
    with pytest.raises(ValueError, match="zero points must be integers"):
        QuantizedLayer.from_result(bad, 4)
    tensors = QuantizedLayer.from_result(r, 4).tensors()
    with pytest.raises(ValueError, match=r"scales must be torch.float32 \(4, 2\), got torch.float16"):
        QuantizedLayer.from_tensors({**tensors, "scales": tensors["scales"].half()}, 4, 0.0, 0.0)
    # 32 codes take 6 words at 6 bits
    with pytest.raises(ValueError, match=r"qweight must be torch.int32 \(6, 4\), got torch.int32 \(4, 4\)"):
        QuantizedLayer.from_tensors(tensors, 6, 0.0, 0.0)
    with pytest.raises(ValueError, match="g_idx must index the 2 groups"):
        QuantizedLayer.from_tensors({**tensors, "g_idx": tensors["g_idx"] + 1}, 4, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"missing \['zeros'\]"):
        QuantizedLayer.from_tensors({k: v for k, v in tensors.items() if k != "zeros"}, 4, 0.0, 0.0)
