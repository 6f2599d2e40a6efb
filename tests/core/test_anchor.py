import logging
import math

import pytest
import torch

from epmq.core.anchor import relaxed_target, rounding_hessian
from epmq.core.stats import LayerStatistics

D_IN, D_OUT = 12, 5


def layer_problem(n=200, rank=None, seed=0, expert_shift=0.3):
    """Inputs X (n x in, rows in a `rank`-dim subspace if given), merged W_m and expert targets Y.

    Returns X, Y, W_m (float64) and H, C from LayerStatistics.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    if rank is not None:
        basis = torch.linalg.qr(torch.randn(D_IN, rank, generator=g, dtype=torch.float64)).Q  # in x rank
        X = X[:, :rank] @ basis.T
    W_m = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    W_e = W_m + expert_shift * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    Y = X @ W_e.T + 0.05 * torch.randn(n, D_OUT, generator=g, dtype=torch.float64)
    stats = LayerStatistics(D_IN, D_OUT)
    stats.add(X, Y)
    return X, Y, W_m, stats.H, stats.C


def objective(Q, X, Y, W_m, strength, form, percdamp):
    """The anchored objective written from the inputs themselves (not from H and C)."""
    H_diag_mean = (X * X).sum(0).mean()
    delta = percdamp * H_diag_mean
    expert_term = ((X @ Q.T - Y) ** 2).sum()
    if form == "output":
        anchor = strength * ((X @ (Q - W_m).T) ** 2).sum()
    else:
        anchor = strength * H_diag_mean * ((Q - W_m) ** 2).sum()
    return expert_term + anchor + delta * ((Q - W_m) ** 2).sum()


@pytest.mark.parametrize("form", ["output", "weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_infinite_strength_returns_w_merged_bit_for_bit(form, dtype):
    _, _, W_m, H, C = layer_problem()
    W = W_m.to(dtype)
    for c in (C, None):
        W_star = relaxed_target(H, c, W, float("inf"), form=form)
        assert W_star.dtype == torch.float32
        assert W_star.data_ptr() != W.data_ptr()
        assert torch.equal(W_star.to(dtype), W)
        assert torch.equal(W_star, W.float())


@pytest.mark.parametrize("form", ["output", "weight"])
@pytest.mark.parametrize("strength", [0.0, 0.5, 3.0, 100.0])
@pytest.mark.parametrize("rank", [None, 7])
def test_experts_computing_the_merged_layer_give_w_merged(form, strength, rank):
    X, _, W_m, H, _ = layer_problem(rank=rank)
    stats = LayerStatistics(D_IN, D_OUT)
    stats.add(X, X @ W_m.T)          # expert outputs = merged layer outputs, so C = W_m H
    W_star = relaxed_target(H, stats.C, W_m.float(), strength, form=form)
    torch.testing.assert_close(W_star, W_m.float(), rtol=0, atol=1e-6)
    W_star64 = relaxed_target(H, stats.C, W_m, strength, form=form)
    assert W_star64.dtype == torch.float64
    torch.testing.assert_close(W_star64, W_m, rtol=0, atol=1e-11)


@pytest.mark.parametrize("form", ["output", "weight"])
def test_zero_strength_tiny_damping_is_the_experts_least_squares_weight(form):
    X, Y, W_m, H, C = layer_problem(n=400)
    W_ls = torch.linalg.lstsq(X, Y).solution.T          # argmin ||X Wᵀ - Y||, out x in
    W_star = relaxed_target(H, C, W_m, 0.0, form=form, percdamp=1e-12)
    torch.testing.assert_close(W_star, W_ls, rtol=0, atol=1e-8)
    # and it is not W_m: the experts moved the layer
    assert (W_ls - W_m).norm() > 0.1 * W_m.norm()


@pytest.mark.parametrize("form", ["output", "weight"])
def test_distance_to_w_merged_shrinks_monotonically_with_strength(form):
    _, _, W_m, H, C = layer_problem(rank=8)
    strengths = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4]
    dist = [(relaxed_target(H, C, W_m, s, form=form) - W_m).norm().item() for s in strengths]
    assert all(a > b for a, b in zip(dist, dist[1:])), dist
    assert dist[-1] < 1e-3 * dist[0]


@pytest.mark.parametrize("form, strength", [("output", 0.0), ("output", 2.0), ("weight", 0.0), ("weight", 0.7)])
def test_w_star_minimises_the_continuous_objective(form, strength):
    X, Y, W_m, H, C = layer_problem(n=60, rank=9, seed=3)
    percdamp = 0.01
    W_star = relaxed_target(H, C, W_m, strength, form=form, percdamp=percdamp).requires_grad_(True)
    f_star = objective(W_star, X, Y, W_m, strength, form, percdamp)
    (grad,) = torch.autograd.grad(f_star, W_star)
    W_m_grad = W_m.clone().requires_grad_(True)
    (grad_at_merged,) = torch.autograd.grad(objective(W_m_grad, X, Y, W_m, strength, form, percdamp), W_m_grad)
    assert grad.norm() < 1e-9 * grad_at_merged.norm()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(20):
            P = 1e-3 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
            assert objective(W_star + P, X, Y, W_m, strength, form, percdamp) > f_star


@pytest.mark.parametrize("form", ["output", "weight"])
def test_directions_h_does_not_see_keep_w_merged(form):
    rank = 6
    X, Y, W_m, H, C = layer_problem(rank=rank, seed=5)
    evals, V = torch.linalg.eigh(H)
    N = V[:, : D_IN - rank]                                  # in x (in-rank): H's null space
    assert evals[: D_IN - rank].abs().max() < 1e-10 * evals.max()
    W_star = relaxed_target(H, C, W_m, 0.5, form=form)
    torch.testing.assert_close(W_star @ N, W_m @ N, rtol=0, atol=1e-9)
    # plain damping (C + λ W_m H)((1+λ)H + δI)⁻¹ sends the same directions to zero
    delta = 0.01 * H.diagonal().mean()
    plain = torch.linalg.solve((1.5 * H + delta * torch.eye(D_IN, dtype=H.dtype)), (C + 0.5 * W_m @ H).T).T
    assert (plain @ N).norm() < 1e-6 * (W_m @ N).norm()
    assert (W_star - W_m).norm() < (plain - W_m).norm()


@pytest.mark.parametrize("form", ["output", "weight"])
def test_indefinite_h_from_rounding_falls_back_and_stays_exact(form, caplog):
    # a huge strength magnifies a slightly negative eigenvalue of H past the damping
    rank = 6
    X, _, W_m, H, _ = layer_problem(rank=rank, seed=2)
    v = torch.linalg.eigh(H).eigenvectors[:, 0:1]              # a null direction of H
    H_bad = H - 1e-9 * H.diagonal().mean() * (v @ v.T)
    C = W_m @ H_bad
    strength = 1e9 if form == "output" else 0.0
    with caplog.at_level(logging.WARNING, logger="epmq.core.anchor"):
        W_star = relaxed_target(H_bad, C, W_m, strength, form=form)
    assert torch.isfinite(W_star).all()
    torch.testing.assert_close(W_star, W_m, rtol=0, atol=1e-9)
    if form == "output":
        assert "Cholesky" in caplog.text


def test_weight_form_limits():
    _, _, W_m, H, C = layer_problem(rank=9, seed=4)
    d_small = (relaxed_target(H, C, W_m, 1e3, form="weight") - W_m).norm()
    d_large = (relaxed_target(H, C, W_m, 1e6, form="weight") - W_m).norm()
    assert d_large < 1e-2 * d_small
    # the weight anchor is isotropic: at equal strength it shrinks the correction in every
    # input direction alike, so output and weight forms differ for an anisotropic H
    assert (relaxed_target(H, C, W_m, 1.0, form="weight") - relaxed_target(H, C, W_m, 1.0)).norm() > 1e-3
    # ... but at strength 0 both are pure expert guidance, damped toward W_m alike: one model
    # (so the anchor selection tries 0 once, like inf)
    W_out, W_wt = (relaxed_target(H, C, W_m, 0.0, form=f, percdamp=0.05) for f in ("output", "weight"))
    assert torch.allclose(W_out, W_wt, rtol=1e-12, atol=1e-12)
    assert torch.equal(rounding_hessian(H, 0.0, "weight"), H)


def test_accepts_float32_statistics_and_returns_float32():
    _, _, W_m, H, C = layer_problem()
    W_star = relaxed_target(H.float(), C.float(), W_m.float(), 1.0)
    reference = relaxed_target(H, C, W_m, 1.0)
    assert W_star.dtype == torch.float32 and W_star.device == W_m.device
    torch.testing.assert_close(W_star.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strength=-1.0), "strength"),
    (dict(strength=math.nan), "strength"),
    (dict(strength="big"), "strength"),
    (dict(form="input"), "form"),
    (dict(percdamp=-0.1), "percdamp"),
    (dict(percdamp=math.inf), "percdamp"),
    (dict(H=torch.eye(D_IN + 1)), "H must be"),
    (dict(C=torch.zeros(D_OUT + 1, D_IN)), "C must be"),
    (dict(C=None), "C is required"),
    (dict(H=torch.zeros(D_IN, D_IN)), "H is all zeros"),
    (dict(H=torch.full((D_IN, D_IN), math.nan)), "H contains NaN"),
    (dict(W_merged=torch.zeros(D_IN)), "W_merged"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    _, _, W_m, H, C = layer_problem()
    args = dict(H=H, C=C, W_merged=W_m, strength=1.0, form="output", percdamp=0.01) | kwargs
    with pytest.raises(ValueError, match=match):
        relaxed_target(**args)


@pytest.mark.parametrize("form", ["output", "weight"])
@pytest.mark.parametrize("strength", [0.0, 0.5, 4.0])
def test_objective_is_a_quadratic_form_around_w_star_under_the_rounding_hessian(form, strength):
    # f(Q) = tr((Q − W*) A (Q − W*)ᵀ) + const with A = k · H_round + δI, k = 1+λ for the output
    # form and 1 for the weight form: differences of f between any two weights must match
    # differences of that quadratic form (GPTQ on (W*, H_round) then rounds f, up to its own damping).
    percdamp = 0.01
    X, Y, W_m, H, C = layer_problem(seed=3)
    W_star = relaxed_target(H, C, W_m, strength, form, percdamp)
    H_round = rounding_hessian(H, strength, form)
    k = 1 + strength if form == "output" else 1.0
    A = k * H_round + percdamp * H.diagonal().mean() * torch.eye(D_IN, dtype=H.dtype)
    g = torch.Generator().manual_seed(9)
    Q1, Q2 = (W_m + 0.5 * torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) for _ in range(2))

    def quad(Q):
        return torch.trace((Q - W_star) @ A @ (Q - W_star).T)

    lhs = objective(Q1, X, Y, W_m, strength, form, percdamp) - objective(Q2, X, Y, W_m, strength, form, percdamp)
    rhs = quad(Q1) - quad(Q2)
    assert torch.allclose(lhs, rhs, rtol=1e-8, atol=1e-8 * float(lhs.abs()))


def test_rounding_hessian_is_h_at_infinite_strength_and_for_the_output_form():
    _, _, _, H, _ = layer_problem()
    assert rounding_hessian(H, math.inf, "weight") is H
    assert rounding_hessian(H, 3.0, "output") is H
    shifted = rounding_hessian(H, 2.0, "weight") - H
    assert torch.allclose(shifted, 2.0 * H.diagonal().mean() * torch.eye(D_IN, dtype=H.dtype))


@pytest.mark.parametrize("form", ["output", "weight"])
def test_callers_statistics_are_left_untouched(form):
    # the solve builds A in a working buffer; H and C are the run's accumulated statistics
    _, _, W_m, H, C = layer_problem()
    H0, C0 = H.clone(), C.clone()
    relaxed_target(H, C, W_m, 2.0, form)
    assert torch.equal(H, H0) and torch.equal(C, C0)
