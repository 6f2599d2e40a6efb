"""epmq.core.norm_affine: the per-channel sums of a LayerNorm's normalised input and targets, and the anchored
least-squares (γ, β) solved from them, each checked against a brute-force computation from the raw rows
(float64): weighted sums of F.layer_norm, per-channel torch.linalg.lstsq of the stacked objective.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from epmq.core.anchor_choice import LayerwiseEPMQ
from epmq.core.norm_affine import NormStatistics, solve_norm_affine
from epmq.core.solvers import EPMQ

FEATURES = 12
EPS = 1e-5


def problem(seed: int, batch: int = 6, tokens: int = 9):
    """Norm inputs x (batch, tokens, features) with channel offsets and scales, token weights w (batch, tokens),
    an anchor (γ_a, β_a) and targets y of a nearby affine map plus a nonlinear part (so no fit is exact)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, tokens, FEATURES, generator=g) * (torch.rand(FEATURES, generator=g) * 3 + 0.2)
         + torch.randn(FEATURES, generator=g))
    w = torch.rand(batch, tokens, generator=g) + 0.1
    gamma_a = 1 + 0.3 * torch.randn(FEATURES, generator=g)
    beta_a = 0.2 * torch.randn(FEATURES, generator=g)
    z = F.layer_norm(x, (FEATURES,), eps=EPS)
    y = ((gamma_a + 0.4 * torch.randn(FEATURES, generator=g)) * z + beta_a + 0.3 * torch.randn(FEATURES, generator=g)
         + 0.2 * torch.tanh(2 * z) + 0.05 * torch.randn(z.shape, generator=g))
    return x, y, w, gamma_a, beta_a


def gathered(x, y, w, parts: int = 3) -> NormStatistics:
    stats = NormStatistics(FEATURES, EPS)
    for idx in torch.arange(len(x)).chunk(parts):
        stats.add(x[idx], y[idx], w[idx])
    return stats


def raw(x, y, w):
    """(z, y, w) as float64 rows: (n, features), (n, features), (n,)."""
    z = F.layer_norm(x.double(), (FEATURES,), eps=EPS).reshape(-1, FEATURES)
    return z, y.double().reshape(-1, FEATURES), w.double().reshape(-1)


def stacked_lstsq(blocks) -> torch.Tensor:
    """argmin Σ ‖A θ − b‖² over θ for the rows of all (A, b) stacked, A (m, 2), b (m,): float64 (2,)."""
    A = torch.cat([a for a, _ in blocks])
    b = torch.cat([b for _, b in blocks])
    return torch.linalg.lstsq(A, b[:, None]).solution[:, 0]


def brute_force(x, y, w, gamma_a, beta_a, strength: float, form: str, percdamp: float):
    """Per channel, the minimiser of the module docstring's objective written as stacked weighted rows."""
    z, Y, wr = raw(x, y, w)
    g_a, b_a = gamma_a.double(), beta_a.double()
    delta = percdamp * (wr[:, None] * z * z).sum(0).mean()
    gamma, beta = torch.empty(FEATURES, dtype=torch.float64), torch.empty(FEATURES, dtype=torch.float64)
    for c in range(FEATURES):
        design = torch.stack([z[:, c], torch.ones_like(z[:, c])], 1)       # n x 2: [z_c, 1]
        sw = wr.sqrt()[:, None]
        fit = (sw * design, sw[:, 0] * Y[:, c])                                # Σ w (γ z + β − ỹ)²
        if form == "output":
            rows = [fit, (math.sqrt(strength) * sw * design,                   # λ Σ w ((γ − γ_a) z + β − β_a)²
                          math.sqrt(strength) * sw[:, 0] * (g_a[c] * z[:, c] + b_a[c])),
                    (delta.sqrt() * torch.tensor([[1.0, 0.0]], dtype=torch.float64),  # δ (γ − γ_a)²
                     delta.sqrt() * g_a[c:c + 1])]
        else:  # ridge λ'' = λ' mean(ZZ) + δ on both parameters
            lam = (strength * (wr[:, None] * z * z).sum(0).mean() + delta).sqrt()
            rows = [fit, (lam * torch.eye(2, dtype=torch.float64), lam * torch.stack([g_a[c], b_a[c]]))]
        gamma[c], beta[c] = stacked_lstsq(rows)
    return gamma, beta


def test_statistics_are_the_weighted_sums_of_the_layer_norm_and_the_targets():
    x, y, w, _, _ = problem(0)
    stats = gathered(x, y, w)
    z, Y, wr = raw(x, y, w)
    close = dict(rtol=1e-5, atol=1e-5)  # the rows are summed in float32
    torch.testing.assert_close(stats.S, wr.sum(), **close)
    torch.testing.assert_close(stats.Z, (wr[:, None] * z).sum(0), **close)
    torch.testing.assert_close(stats.ZZ, (wr[:, None] * z * z).sum(0), **close)
    torch.testing.assert_close(stats.Y, (wr[:, None] * Y).sum(0), **close)
    torch.testing.assert_close(stats.YZ, (wr[:, None] * Y * z).sum(0), **close)
    assert all(b.dtype == torch.float64 for b in stats.buffers()) and len(stats.buffers()) == 5
    # z is the normalised input, not x: its channels' sum over features is 0 for every token
    assert (stats.Z - (wr[:, None] * x.double().reshape(-1, FEATURES)).sum(0)).abs().max() > 1e-2

    # per-sample weights (batch,) broadcast over the tokens, a number over everything
    per_sample = torch.rand(len(x), generator=torch.Generator().manual_seed(1)) + 0.5
    other = NormStatistics(FEATURES, EPS)
    other.add(x, y, per_sample)
    other.add(x[:2], y[:2], 0.25)
    tokens = x.shape[1]
    expected = per_sample.double().repeat_interleave(tokens)
    torch.testing.assert_close(other.S, expected.sum() + 0.25 * 2 * tokens, **close)
    torch.testing.assert_close(other.YZ, (expected[:, None] * Y * z).sum(0) + 0.25 * (Y * z)[:2 * tokens].sum(0),
                               **close)


@pytest.mark.parametrize("percdamp", [1e-9])
def test_output_form_at_0_is_the_weighted_least_squares_fit_per_channel(percdamp):
    x, y, w, gamma_a, beta_a = problem(2)
    gamma, beta = solve_norm_affine(gathered(x, y, w), gamma_a, beta_a, 0.0, "output", percdamp=percdamp)
    assert gamma.dtype == beta.dtype == torch.float32 and gamma.shape == beta.shape == (FEATURES,)
    z, Y, wr = raw(x, y, w)
    sw = wr.sqrt()[:, None]
    for c in range(FEATURES):
        design = torch.stack([z[:, c], torch.ones_like(z[:, c])], 1)
        expected = torch.linalg.lstsq(sw * design, (sw[:, 0] * Y[:, c])[:, None]).solution[:, 0]
        torch.testing.assert_close(torch.stack([gamma[c], beta[c]]).double(), expected, rtol=1e-4, atol=1e-5)
    assert (gamma - gamma_a).abs().max() > 0.05  # the fit moved away from the anchor


@pytest.mark.parametrize("form,strength,percdamp", [("output", 0.0, 0.01), ("output", 0.7, 0.01),
                                                    ("output", 5.0, 0.1), ("weight", 0.0, 0.01),
                                                    ("weight", 0.3, 0.01), ("weight", 4.0, 0.1)])
def test_solution_is_the_minimiser_of_the_anchored_objective(form, strength, percdamp):
    x, y, w, gamma_a, beta_a = problem(3)
    gamma, beta = solve_norm_affine(gathered(x, y, w), gamma_a, beta_a, strength, form, percdamp=percdamp)
    expected = brute_force(x, y, w, gamma_a, beta_a, strength, form, percdamp)
    torch.testing.assert_close(gamma.double(), expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(beta.double(), expected[1], rtol=1e-4, atol=1e-5)
    # strictly between the plain fit and the anchor: neither end
    plain = brute_force(x, y, w, gamma_a, beta_a, 0.0, "output", 1e-12)
    assert (gamma.double() - gamma_a.double()).abs().max() > 1e-3
    if strength > 0:
        assert (gamma.double() - plain[0]).abs().max() > 1e-3


def test_strength_inf_returns_the_anchor_exactly_and_a_copy():
    x, y, w, gamma_a, beta_a = problem(4)
    stats = gathered(x, y, w)
    for form in ("output", "weight"):
        gamma, beta = solve_norm_affine(stats, gamma_a, beta_a, math.inf, form)
        assert torch.equal(gamma, gamma_a) and torch.equal(beta, beta_a)
        gamma += 1  # not the anchor's storage
        assert not torch.equal(gamma, gamma_a)
    # a larger λ is closer to the anchor
    far, near = (solve_norm_affine(stats, gamma_a, beta_a, s)[0] for s in (0.1, 100.0))
    assert (near - gamma_a).abs().max() < (far - gamma_a).abs().max()


@pytest.mark.parametrize("form,strength", [("output", 0.0), ("output", 0.5), ("output", 3.0), ("weight", 0.0),
                                           ("weight", 2.0)])
def test_targets_that_are_the_anchor_outputs_give_the_anchor(form, strength):
    x, _, w, gamma_a, beta_a = problem(5)
    y = gamma_a * F.layer_norm(x, (FEATURES,), eps=EPS) + beta_a
    gamma, beta = solve_norm_affine(gathered(x, y, w), gamma_a, beta_a, strength, form)
    torch.testing.assert_close(gamma, gamma_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(beta, beta_a, rtol=1e-4, atol=1e-5)


def test_no_tokens_give_the_anchor():
    _, _, _, gamma_a, beta_a = problem(6)
    gamma, beta = solve_norm_affine(NormStatistics(FEATURES, EPS), gamma_a, beta_a, 0.0)
    assert torch.equal(gamma, gamma_a) and torch.equal(beta, beta_a)


def test_bad_inputs_are_refused():
    x, y, w, _, _ = problem(7)
    stats = NormStatistics(FEATURES, EPS)
    with pytest.raises(ValueError, match=f"{FEATURES}"):
        stats.add(x[..., :-1], y[..., :-1], w)  # not the norm's width
    with pytest.raises(ValueError, match="must both be"):
        stats.add(x, y[:, :-1], w)              # targets of another shape
    for bad in (math.nan, math.inf):
        broken = y.clone()
        broken[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            stats.add(x, broken, w)
        broken = x.clone()
        broken[0, 0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            stats.add(broken, y, w)
    assert float(stats.S) == 0 and float(stats.ZZ.abs().sum()) == 0  # nothing refused was added


def test_epmq_norm_affine_anchors_at_the_extrapolated_norm():
    """EPMQ.norm_affine: the anchor is γ_0 + ρ (γ_m − γ_0) (and β alike); at λ = inf that is the result."""
    x, y, w, gamma_m, beta_m = problem(8)
    g = torch.Generator().manual_seed(9)
    base = (gamma_m + 0.2 * torch.randn(FEATURES, generator=g), beta_m + 0.1 * torch.randn(FEATURES, generator=g))
    stats = gathered(x, y, w)
    rho = 1.7
    gamma_x, beta_x = base[0] + rho * (gamma_m - base[0]), base[1] + rho * (beta_m - base[1])
    gamma, beta = EPMQ(strength="inf", extrapolate=rho).norm_affine(stats, gamma_m, beta_m, base)
    torch.testing.assert_close(gamma, gamma_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta, beta_x, rtol=1e-6, atol=1e-6)
    # finite λ: the solve anchored at the extrapolated norm, with the solver's form and percdamp
    solver = EPMQ(strength=0.8, form="weight", extrapolate=rho, percdamp=0.05)
    got = solver.norm_affine(stats, gamma_m, beta_m, base)
    expected = solve_norm_affine(stats, gamma_x, beta_x, 0.8, "weight", percdamp=0.05)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (got[0] - solve_norm_affine(stats, gamma_m, beta_m, 0.8, "weight", percdamp=0.05)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="extrapolate"):
        solver.norm_affine(stats, gamma_m, beta_m)  # ρ ≠ 1 needs the base model's norm
    # ρ = 1 ignores the base
    same = EPMQ(strength=0.8).norm_affine(stats, gamma_m, beta_m, base)
    assert torch.equal(same[0], solve_norm_affine(stats, gamma_m, beta_m, 0.8)[0])


def test_calibrate_norms_is_a_checked_described_ingredient():
    for bad in (1, "true", None):
        with pytest.raises(ValueError, match="calibrate_norms"):
            EPMQ(strength=1.0, calibrate_norms=bad)
    solver = EPMQ(strength=1.0, calibrate_norms=True)
    assert solver.calibrate_norms is True and solver.describe()["calibrate_norms"] is True
    assert "calibrate_norms=True" in repr(solver) and "calibrate_norms" not in repr(EPMQ(strength=1.0))
    with pytest.raises(ValueError, match="ingredients"):
        LayerwiseEPMQ(calibrate_norms=True)
