"""GPTQ and round-to-nearest (epmq/core/gptq.py) on small random correlated problems."""

import logging

import pytest
import torch

from epmq.core.gptq import QuantResult, gptq, layer_loss, rtn
from epmq.core.quant import QuantSpec, dequantize, find_params, quantize


def problem(seed, out=24, inp=96, n=400, rank=None):
    """W (out, in) and H = 2/n X^T X from inputs X (n, in) with correlated, unequally scaled columns."""
    g = torch.Generator().manual_seed(seed)
    r = rank or inp
    mix = torch.randn(r, inp, generator=g) / r**0.5 + 0.5 * torch.randn(1, inp, generator=g)
    X = (torch.randn(n, r, generator=g) @ mix) * (torch.rand(inp, generator=g) * 2 + 0.1)
    H = 2 / n * X.t() @ X
    W = torch.randn(out, inp, generator=g) * 0.1
    return W, H


def naive_gptq(W, H, bits, group_size, sym, act_order, percdamp=0.01):
    """Textbook GPTQ in float64: one column at a time with the explicit inverse Hessian,
    updating the remaining columns and removing the quantized one from H^-1 (Schur complement).
    Groups are fitted on the fully updated weights when their first column comes up."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(cols):
        if j == 0 or (group_size != -1 and j % group_size == 0):
            width = cols if group_size == -1 else group_size
            scale, zero = find_params(W[:, j : j + width], bits, sym)
        q = dequantize(quantize(W[:, j], scale, zero, 2**bits - 1), scale, zero)
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q[:, torch.argsort(perm)]


def assert_on_grid(res: QuantResult, W, spec: QuantSpec):
    out, inp = W.shape
    n_groups = 1 if spec.group_size == -1 else -(-inp // spec.group_size)
    assert res.weight.shape == (out, inp) and res.weight.dtype == torch.float32
    assert res.qweight.shape == (out, inp) and res.qweight.dtype == torch.uint8
    assert res.scales.shape == res.zeros.shape == (out, n_groups)
    assert res.g_idx.shape == (inp,) and res.g_idx.dtype == torch.long
    assert res.g_idx.min() >= 0 and res.g_idx.max() < n_groups
    assert res.qweight.max() <= spec.maxq
    assert torch.equal(res.zeros, res.zeros.round()) and (res.scales > 0).all()
    rebuilt = (res.qweight - res.zeros[:, res.g_idx]) * res.scales[:, res.g_idx]
    assert torch.equal(rebuilt, res.weight)
    assert torch.isfinite(res.weight).all()


SPECS = [
    QuantSpec(bits=b, group_size=gs, sym=sym, act_order=act, static_groups=st, blocksize=bs)
    for b, gs, sym, act, st, bs in [
        (2, -1, False, False, False, 128),
        (3, 32, False, True, False, 32),
        (4, 32, True, True, True, 128),
        (4, 24, False, True, False, 40),  # groups straddle block boundaries
        (8, 128, False, False, False, 16),
        (3, 16, True, False, True, 64),
    ]
]


def spec_id(s):
    return f"b{s.bits}g{s.group_size}s{s.sym:d}a{s.act_order:d}st{s.static_groups:d}B{s.blocksize}"


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_gptq_weights_lie_on_their_grid_and_beat_rtn(spec):
    for seed in range(3):
        W, H = problem(seed)
        res = gptq(W, H, spec)
        assert_on_grid(res, W, spec)
        base = rtn(W, spec, H)
        assert_on_grid(base, W, spec)
        assert res.loss < base.loss
        assert res.loss == pytest.approx(layer_loss(res.weight, W, H), rel=1e-4)
        assert res.damp == pytest.approx(spec.percdamp * torch.diag(H).mean().item(), rel=1e-6)


@pytest.mark.parametrize(
    "bits, group_size, sym, act_order", [(2, -1, False, False), (3, 8, True, True), (4, 8, False, True)]
)
def test_gptq_matches_textbook_column_by_column_gptq(bits, group_size, sym, act_order):
    # blocksize = group_size: the reference refits each group on the fully updated weights.
    W, H = problem(7, out=32, inp=64)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order, blocksize=8)
    res = gptq(W, H, spec)
    Q = naive_gptq(W, H, bits, group_size, sym, act_order)
    scales = res.scales[:, res.g_idx]
    flipped = ((res.weight - Q.float()).abs() > 0.5 * scales).float().mean().item()
    assert flipped <= 0.02
    assert res.loss == pytest.approx(layer_loss(Q, W, H), rel=0.02)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=3, group_size=-1), QuantSpec(bits=4, group_size=16, act_order=True),
     QuantSpec(bits=2, group_size=24, sym=True, act_order=True, static_groups=True, blocksize=32)],
)
def test_identity_hessian_gives_round_to_nearest_exactly(spec):
    W, _ = problem(3)
    H = 2.5 * torch.eye(W.shape[1])
    res, base = gptq(W, H, spec), rtn(W, spec, H)
    assert torch.equal(res.weight, base.weight)
    assert torch.equal(res.qweight, base.qweight)
    assert torch.equal(res.scales, base.scales) and torch.equal(res.zeros, base.zeros)
    assert torch.equal(res.g_idx, base.g_idx)
    assert res.loss == pytest.approx(2.5 * (base.weight - W).square().sum().item(), rel=1e-5)


def test_diagonal_hessian_without_act_order_gives_round_to_nearest():
    W, _ = problem(4)
    H = torch.diag(torch.rand(W.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1)
    spec = QuantSpec(bits=3, group_size=32)
    assert torch.equal(gptq(W, H, spec).weight, rtn(W, spec).weight)


def test_blocksize_only_changes_rounding_noise_without_groups():
    # Lazy batch updates are exact in exact arithmetic: any blocksize solves the same problem.
    W, H = problem(5, out=32, inp=128)
    losses = [gptq(W, H, QuantSpec(bits=3, group_size=-1, blocksize=bs)).loss for bs in (1, 7, 32, 128, 1000)]
    assert max(losses) <= min(losses) * 1.02


def test_dead_columns_are_zeroed_without_nan():
    W, H = problem(6)
    dead = torch.tensor([0, 5, 6, 50, 95])
    H[dead, :] = 0
    H[:, dead] = 0
    H_fixed = H.clone()
    H_fixed[dead, dead] = 1  # as the reference: dead inputs get H[i, i] = 1 before damping
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=-1, act_order=True)):
        res = gptq(W, H, spec)
        assert_on_grid(res, W, spec)
        assert res.damp == pytest.approx(spec.percdamp * torch.diag(H_fixed).mean().item(), rel=1e-6)
        assert torch.equal(res.weight[:, dead], torch.zeros(W.shape[0], len(dead)))
        assert res.loss == pytest.approx(layer_loss(res.weight, W, H), rel=1e-4)
        assert res.loss < rtn(W, spec, H).loss


def test_act_order_group_indices():
    W, H = problem(8, inp=100)
    perm = torch.argsort(torch.diag(H), descending=True)
    g = 16
    static = gptq(W, H, QuantSpec(group_size=g, act_order=True, static_groups=True))
    assert torch.equal(static.g_idx, torch.arange(100) // g)  # contiguous groups in W's order
    dynamic = gptq(W, H, QuantSpec(group_size=g, act_order=True))
    # Groups are consecutive in processing order: the i-th most active column is in group i // g.
    assert torch.equal(dynamic.g_idx[perm], torch.arange(100) // g)
    assert torch.equal(torch.bincount(dynamic.g_idx), torch.tensor([16] * 6 + [4]))


def test_cholesky_failure_raises_damping_with_a_warning(caplog):
    W, H = problem(9, inp=64)
    evals, evecs = torch.linalg.eigh(H.double())
    evals[0] = -0.05 * torch.diag(H).mean()  # indefinite: 1% damping cannot fix it, 10% can
    H_bad = (evecs @ torch.diag(evals) @ evecs.t()).float()
    with caplog.at_level(logging.WARNING, logger="epmq.core.gptq"):
        res = gptq(W, H_bad, QuantSpec(bits=4, group_size=32))
    assert any("raising damp" in r.getMessage() for r in caplog.records)
    assert res.damp == pytest.approx(0.1 * torch.diag(H_bad).mean().item(), rel=1e-5)
    assert_on_grid(res, W, QuantSpec(bits=4, group_size=32))
    assert torch.isfinite(torch.tensor(res.loss))
    assert res.loss == pytest.approx(layer_loss(res.weight, W, H_bad), rel=1e-4, abs=1e-6)


def test_well_posed_problem_logs_nothing(caplog):
    W, H = problem(10)
    with caplog.at_level(logging.WARNING, logger="epmq.core.gptq"):
        gptq(W, H, QuantSpec())
    assert not caplog.records


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_input_dtypes_compute_in_float32(dtype):
    W, H = problem(11)
    spec = QuantSpec(bits=4, group_size=32)
    ref = gptq(W.to(dtype).float(), H, spec)
    res = gptq(W.to(dtype), H.to(torch.float64), spec)
    assert res.weight.dtype == torch.float32
    assert torch.equal(res.weight, ref.weight)
    assert_on_grid(rtn(W.to(dtype), spec), W, spec)


def test_low_rank_hessian_loss_is_the_exact_trace():
    # Few samples: most of the damped loss is damping, so the loss is taken from the trace itself.
    W, H = problem(12, rank=4)
    res = gptq(W, H, QuantSpec(bits=8, group_size=-1, act_order=True))
    assert res.loss == pytest.approx(layer_loss(res.weight, W, H), rel=1e-6)
    assert res.loss < rtn(W, QuantSpec(bits=8, group_size=-1), H).loss


def test_rtn_loss_without_and_with_hessian():
    W, H = problem(13)
    spec = QuantSpec(bits=3)
    plain, weighted = rtn(W, spec), rtn(W, spec, H)
    assert torch.equal(plain.weight, weighted.weight)
    assert plain.loss == pytest.approx((plain.weight.double() - W.double()).square().sum().item())
    D = plain.weight.double() - W.double()
    assert weighted.loss == pytest.approx(torch.trace(D @ H.double() @ D.t()).item(), rel=1e-9)
    assert plain.damp == 0.0


@pytest.mark.parametrize(
    "W, H, match",
    [
        (torch.zeros(4), torch.eye(4), "W must be a 2-D"),
        (torch.zeros(3, 4, dtype=torch.long), torch.eye(4), "W must be a 2-D"),
        (torch.full((3, 4), float("nan")), torch.eye(4), "W contains NaN"),
        (torch.zeros(3, 4), torch.eye(5), "H must be a"),
        (torch.zeros(3, 4), torch.full((4, 4), float("inf")), "H contains NaN"),
        (torch.zeros(3, 4), -torch.eye(4), "H must have a positive mean diagonal"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_them(W, H, match):
    with pytest.raises(ValueError, match=match):
        gptq(W, H, QuantSpec())


def test_result_lives_on_w_device_and_inputs_are_untouched():
    W, H = problem(14)
    W0, H0 = W.clone(), H.clone()
    res = gptq(W, H, QuantSpec(act_order=True, group_size=32))
    assert torch.equal(W, W0) and torch.equal(H, H0)
    for t in (res.weight, res.qweight, res.scales, res.zeros, res.g_idx):
        assert t.device == W.device
