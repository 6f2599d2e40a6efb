"""Min-max grids and QuantSpec validation (epmq/core/quant.py)."""

import dataclasses

import pytest
import torch

from epmq.core.quant import QuantSpec, dequantize, find_params, grid_params, group_params, quantize


def test_quantspec_defaults_and_maxq():
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.sym, spec.act_order, spec.static_groups) == (4, 128, False, False, False)
    assert (spec.percdamp, spec.blocksize) == (0.01, 128)
    assert spec.maxq == 15
    assert QuantSpec(bits=2).maxq == 3 and QuantSpec(bits=8).maxq == 255
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("bits", 1), ("bits", 9), ("bits", 4.0), ("bits", True),
        ("group_size", 0), ("group_size", -2), ("group_size", 64.0),
        ("sym", 1), ("act_order", "yes"), ("static_groups", None),
        ("percdamp", 0), ("percdamp", -0.1), ("percdamp", float("nan")), ("percdamp", float("inf")),
        ("blocksize", 0), ("blocksize", -128), ("blocksize", 1.5),
    ],
)
def test_quantspec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"QuantSpec.{field}"):
        QuantSpec(**{field: value})


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_grid_contains_zero_and_codes_are_integers_in_range(bits, sym):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 40, generator=g)
    x[1] = x[1].abs() + 0.5  # all positive
    x[2] = -x[2].abs() - 0.5  # all negative
    x[3] = 0.0  # all zero
    scale, zero = find_params(x, bits, sym)
    maxq = 2**bits - 1
    assert scale.shape == zero.shape == (6,)
    assert (scale > 0).all()
    assert torch.equal(zero, zero.round()) and (zero >= 0).all() and (zero <= maxq).all()
    # 0 is a grid point, and a zero weight stays exactly zero.
    zero_q = dequantize(quantize(torch.zeros(6, 1), scale[:, None], zero[:, None], maxq), scale[:, None], zero[:, None])
    assert torch.equal(zero_q, torch.zeros(6, 1))
    codes = quantize(x, scale[:, None], zero[:, None], maxq)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= maxq
    assert torch.equal(x[3], dequantize(codes[3], scale[3], zero[3]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_grid_spans_the_range_and_rounds_to_nearest(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g) + torch.linspace(-1, 1, 5)[:, None]
    scale, zero = find_params(x, bits)
    s, z = scale[:, None], zero[:, None]
    lo = dequantize(torch.zeros_like(z), s, z)
    hi = dequantize(torch.full_like(z, 2**bits - 1), s, z)
    xmin, xmax = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    # Shifting the zero point to an integer moves the range by at most half a step.
    assert (lo <= xmin + s / 2 + 1e-6).all() and (hi >= xmax - s / 2 - 1e-6).all()
    err = (dequantize(quantize(x, s, z, 2**bits - 1), s, z) - x).abs()
    assert (err <= s / 2 + s * 1e-4).all()
    assert torch.allclose(scale, (xmax - xmin).squeeze(1) / (2**bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_is_symmetric(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 50, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [10.0]])
    scale, zero = find_params(x, bits, sym=True)
    maxq = 2**bits - 1
    assert torch.equal(zero, torch.full_like(zero, 2 ** (bits - 1)))
    assert torch.allclose(scale, 2 * x.abs().amax(1) / maxq)
    # Grid points k = 1 .. maxq come in +- pairs around 0: -(k - zero) = (2 zero - k) - zero.
    k = torch.arange(1, maxq + 1, dtype=torch.float32)
    pts = dequantize(k[None, :], scale[:, None], zero[:, None])
    mirrored = dequantize((2 * zero[:, None] - k[None, :]), scale[:, None], zero[:, None])
    assert torch.allclose(pts, -mirrored)
    assert ((2 * zero[:, None] - k) >= 0).all() and ((2 * zero[:, None] - k) <= maxq).all()


def test_grid_params_matches_find_params_and_handles_empty_ranges():
    xmin = torch.tensor([-1.0, 0.0, 0.0, -2.0])
    xmax = torch.tensor([3.0, 0.0, 5.0, -1.0])
    scale, zero = grid_params(xmin, xmax, bits=4)
    # -2..-1 is widened to -2..0, 0..0 becomes -1..1.
    assert torch.allclose(scale, torch.tensor([4.0, 2.0, 5.0, 2.0]) / 15)
    assert torch.equal(zero, torch.round(torch.tensor([1.0, 1.0, 0.0, 2.0]) / scale))


def test_group_params_shapes_and_short_last_group():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(7, 100, generator=g)
    scale, zero = group_params(W, 32, bits=3)
    assert scale.shape == zero.shape == (7, 4)  # 32 + 32 + 32 + 4 columns
    for i, (a, b) in enumerate([(0, 32), (32, 64), (64, 96), (96, 100)]):
        s, z = find_params(W[:, a:b], bits=3)
        assert torch.equal(scale[:, i], s) and torch.equal(zero[:, i], z)
    row_scale, row_zero = group_params(W, -1, bits=3)
    assert row_scale.shape == (7, 1)
    assert torch.equal(row_scale[:, 0], find_params(W, bits=3)[0])
    assert torch.equal(group_params(W, 500, bits=3)[0], row_scale)  # one group wider than W
