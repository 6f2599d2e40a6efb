"""Merged-weight anchoring: the continuous E-PMQ target W* that GPTQ then rounds.

Per linear layer, with H = Σ w X̂ᵀX̂ (in x in) and C = Σ w ỸᵀX̂ (out x in) from epmq.core.stats and
the merged weight W_m (out x in), E-PMQ minimises over the quantization grid

    f(Q) = Σ w ‖X̂ Qᵀ − Ỹ‖²  +  λ Σ w ‖X̂ (Q − W_m)ᵀ‖²  +  δ ‖Q − W_m‖²_F
         = tr(Q H Qᵀ) − 2 tr(Q Cᵀ) + λ tr((Q − W_m) H (Q − W_m)ᵀ) + δ tr((Q − W_m)(Q − W_m)ᵀ) + c
         = tr(Q A Qᵀ) − 2 tr(Q Bᵀ) + c'
    with A = (1+λ) H + δ I   (in x in, symmetric positive definite for δ > 0)
         B = C + λ W_m H + δ W_m   (out x in).

Completing the square (A is symmetric): f(Q) = tr((Q − W*) A (Q − W*)ᵀ) + const, W* = B A⁻¹.
Since A = (1+λ)(H + δ/(1+λ) I), f(Q) = (1+λ) tr((Q − W*) H_δ (Q − W*)ᵀ) + const: the layer
error GPTQ minimises for the weight W* and the (damped) Hessian H, up to the factor (1+λ) that
does not move the minimiser. So GPTQ on (W*, H) rounds the E-PMQ objective. (GPTQ damps with
δ = percdamp·mean(diag H) itself; at λ = 0 that is exactly H_δ, for λ > 0 it damps a little
more, the usual GPTQ regularisation.)

δ is the damping, δ = percdamp · mean(diag H). It pulls Q toward W_m rather than toward 0, so
input directions the calibration data barely reaches keep the merged weights (DESIGN §1).

The weight form replaces the output anchor by one in weight space,
λ'' ‖Q − W_m‖²_F with λ'' = λ' · mean(diag H): A = H + (λ'' + δ) I, B = C + (λ'' + δ) W_m.
Here f(Q) = tr((Q − W*) A (Q − W*)ᵀ) + const with A = H + (λ''+δ) I, so GPTQ rounds it exactly
only when given A as its Hessian; with H it rounds toward W* under the data metric alone.

Both forms are solved as W* = W_m + (C − W_m H) A⁻¹ (subtract W_m A from both sides of
W* A = B): exactly W_m when C = W_m H, and the correction shrinks smoothly as λ grows.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

log = logging.getLogger(__name__)

FORMS = ("output", "weight")


def relaxed_target(H: torch.Tensor, C: torch.Tensor | None, W_merged: torch.Tensor,
                   strength: float, form: str = "output", percdamp: float = 0.01,
                   residual: bool = False) -> torch.Tensor:
    """Continuous minimiser W* of the anchored E-PMQ layer objective.

    output form:  W* = (C + λ W_m H + δ W_m) ((1+λ) H + δ I)⁻¹
    weight form:  W* = (C + (λ''+δ) W_m) (H + (λ''+δ) I)⁻¹,   λ'' = strength · mean(diag H)
    with δ = percdamp · mean(diag H).

    Args:
        H: (in x in) Σ w X̂ᵀX̂ of the merged model's layer inputs.
        C: (out x in) Σ w ỸᵀX̂ of the experts' targets against those inputs; may be None only
            when strength is inf.
        W_merged: (out x in) merged weight W_m (the anchor).
        strength: λ (output form) or λ' (weight form), >= 0; float('inf') returns W_merged.
        form: "output" or "weight".
        percdamp: δ as a fraction of mean(diag H), >= 0.
        residual: C is already the residual cross term R = Σ w (Ỹ − X̂W_mᵀ)ᵀX̂ = C − W_m H (out x in),
            accumulated from the targets minus the merged layer's own outputs. That skips the
            (out x in x in) product W_m H and the cancellation of two large, nearly equal terms.

    Returns:
        W* (out x in) on W_merged's device, float32 (float64 if W_merged is float64). With
        strength = inf it is a copy of W_merged, equal bit for bit.

    Solved in float64 with a Cholesky factorisation of A, never an explicit inverse.
    """
    strength = _check_number("strength", strength, allow_inf=True)
    percdamp = _check_number("percdamp", percdamp, allow_inf=False)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not isinstance(W_merged, torch.Tensor) or W_merged.dim() != 2 or not W_merged.is_floating_point():
        raise ValueError(f"W_merged must be a floating-point (out x in) tensor, got "
                         f"{getattr(W_merged, 'shape', type(W_merged))}")
    out_features, in_features = W_merged.shape
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"H must be (in x in) = ({in_features} x {in_features}) to match "
                         f"W_merged {tuple(W_merged.shape)}, got {getattr(H, 'shape', type(H))}")
    out_dtype = torch.promote_types(W_merged.dtype, torch.float32)
    if strength == math.inf:
        # λ → ∞ pins Q to W_m: GPTQ of the merged model exactly, whatever C says
        return W_merged.detach().to(dtype=out_dtype, copy=True)
    if C is None:
        raise ValueError("C is required for a finite strength (it is only optional with strength=inf)")
    if not isinstance(C, torch.Tensor) or tuple(C.shape) != (out_features, in_features):
        raise ValueError(f"C must be (out x in) = ({out_features} x {in_features}) to match "
                         f"W_merged, got {getattr(C, 'shape', type(C))}")

    device = W_merged.device
    H = H.detach().to(device, torch.float64)
    C = C.detach().to(device, torch.float64)
    W_m = W_merged.detach().to(torch.float64)
    for name, t in (("H", H), ("C", C), ("W_merged", W_m)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf")
    H = (H + H.T) / 2  # float32 batch products leave H symmetric only up to rounding
    mean_diag = H.diagonal().mean()
    if not mean_diag > 0:
        raise ValueError("H is all zeros (mean(diag H) = 0): no calibration tokens reached this "
                         "layer, so there is nothing to solve; check the calibration data and hooks")
    delta = percdamp * mean_diag
    R = C if residual else C - W_m @ H                             # out x in, the experts' pull
    # A is built in H's buffer (H, a fresh symmetrised copy, is not needed after R): at wide layers
    # every in x in float64 temporary costs in² · 8 bytes.
    if form == "output":
        A = H.mul_(1 + strength)                                   # (1+λ) H
        A.diagonal().add_(delta)                                   # + δ I
    else:
        A = H
        A.diagonal().add_(strength * mean_diag + delta)            # H + (λ'' + δ) I
    # W* A = W_m A + R  =>  W*ᵀ = W_mᵀ + A⁻¹ Rᵀ (A symmetric)
    correction = _solve_spd(A, R.T, float(delta), in_features).T   # out x in
    return (W_m + correction).to(out_dtype)


def rounding_hessian(H: torch.Tensor, strength: float, form: str = "output") -> torch.Tensor:
    """The Hessian (in x in) under which GPTQ rounds W* so that it minimises the anchored objective.

    Output form: H itself (the objective is (1+λ) tr((Q − W*) H (Q − W*)ᵀ) + const; the factor does
    not move the minimiser). Weight form: H + λ''I with λ'' = strength · mean(diag H), since there
    the objective is tr((Q − W*)(H + λ''I)(Q − W*)ᵀ) + const (GPTQ adds its own δ damping).
    strength = inf returns H, so that the weight form at inf is plain GPTQ like the output form.
    """
    strength = _check_number("strength", strength, allow_inf=True)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "output" or strength == 0 or strength == math.inf:
        return H
    lam = strength * H.diagonal().mean()
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def _solve_spd(A: torch.Tensor, B: torch.Tensor, delta: float, in_features: int) -> torch.Tensor:
    """A⁻¹ B for symmetric A (n x n) and B (n x k), by Cholesky; eigen-solve if A is not PD.

    A can lose definiteness only through rounding: with a large λ, (1+λ)·H magnifies the tiny
    negative eigenvalues that float32 batch products leave in H's null space until they outweigh
    δ. Then the exact minimiser over the PSD part of H is computed from H's eigenvalues clamped
    so that A's are at least its damping.
    """
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    if delta <= 0:
        raise ValueError("A = (1+λ)H + δI is not positive definite and percdamp = 0: "
                         "H is singular; use percdamp > 0")
    log.warning("relaxed_target: Cholesky of the damped system failed (in=%d); solving through "
                "its eigendecomposition with eigenvalues clamped at the damping %.3g",
                in_features, delta)
    evals, V = torch.linalg.eigh(A)
    evals = evals.clamp_min(delta)
    return V @ ((V.T @ B) / evals.unsqueeze(1))


def _check_number(name: str, value, allow_inf: bool) -> float:
    """A float >= 0 (and finite unless allow_inf), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or (value == math.inf and not allow_inf):
        allowed = ">= 0 (float('inf') allowed)" if allow_inf else "finite and >= 0"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def parse_strength(value) -> float:
    """An anchor strength: a number >= 0, or inf (YAML's .inf, the command line's and JSON files' "inf").

    The one parser of strengths: configs, command lines and results.json files all go through it."""
    if isinstance(value, str) and value.strip().lower() in (".inf", "inf", "+inf", "infinity"):
        return math.inf
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number >= 0 or inf, got {value!r}") from None
    if math.isnan(s) or s < 0:
        raise ValueError(f"strength must be >= 0 (inf allowed), got {value!r}")
    return s
