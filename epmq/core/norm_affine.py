"""Calibration of a LayerNorm's affine parameters toward the experts, channel by channel.

A LayerNorm computes y = γ ⊙ z + β from its input's normalised form z = (x − mean x) / std x. In the
merged model z comes from the merged path (X̂); the target is expert t's own norm output on its own path,
Ỹ_t = γ_t ⊙ z^e + β_t. Each channel c is a two-parameter least-squares problem, anchored like E-PMQ's
linear layers (output form, strength λ) to (γ_a, β_a), the merged parameters or their extrapolation:

    min over γ_c, β_c   Σ w (γ_c z_c + β_c − ỹ_c)²  +  λ Σ w ((γ_c − γ_a,c) z_c + (β_c − β_a,c))²
                        + δ (γ_c − γ_a,c)²

With the sums S = Σ w, Z = Σ w z_c, ZZ = Σ w z_c², Y = Σ w ỹ_c, YZ = Σ w ỹ_c z_c (all per channel), the
normal equations are the 2 x 2 system

    [(1+λ) ZZ + δ   (1+λ) Z ] [γ_c]   [YZ + λ (γ_a ZZ + β_a Z) + δ γ_a]
    [(1+λ) Z        (1+λ) S ] [β_c] = [Y  + λ (γ_a Z  + β_a S)        ]

solved in closed form; δ = percdamp · mean(ZZ) keeps it definite when a channel barely varies. λ = inf
returns the anchor. The weight form's λ' becomes a ridge λ'' + δ, λ'' = λ' mean(ZZ), on both parameters
instead (as the linear layers' weight form adds its damping to λ'').

The norms are fitted on the same forward pass as the block's linears, so those were fitted on the
merged norms' outputs (as FeatCal does); a true-sequential schedule fits them on the block's first step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NormStatistics:
    """The per-channel sums above for one LayerNorm of width `features` (float64 buffers).

    add(x, y, weight): x (..., features) the norm's input in the merged model, y (..., features) the
    target outputs, weight per token (a number or a tensor of a leading part of x.shape[:-1]).
    """

    def __init__(self, features: int, eps: float, device=None):
        self.features, self.eps = features, float(eps)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.S, self.Z, self.ZZ, self.Y, self.YZ = zeros(()), zeros(features), zeros(features), zeros(features), zeros(features)

    def buffers(self) -> list[torch.Tensor]:
        """What a distributed run all-reduces (sum)."""
        return [self.S, self.Z, self.ZZ, self.Y, self.YZ]

    def add(self, x: torch.Tensor, y: torch.Tensor, weight=1.0) -> None:
        if x.shape[-1] != self.features or y.shape != x.shape:
            raise ValueError(f"x and y must both be (..., {self.features}), got {tuple(x.shape)} and {tuple(y.shape)}")
        z = nn.functional.layer_norm(x.float(), (self.features,), eps=self.eps).reshape(-1, self.features)  # n x f
        y = y.float().reshape(-1, self.features)
        if isinstance(weight, torch.Tensor):
            w = weight.to(z.device, torch.float32).reshape(weight.shape + (1,) * (x.dim() - 1 - weight.dim()))
            w = w.expand(x.shape[:-1]).reshape(-1, 1)                                                 # n x 1
        else:
            w = z.new_full((z.shape[0], 1), float(weight))
        if not (torch.isfinite(z.sum()) and torch.isfinite(y.sum())):
            raise ValueError("LayerNorm statistics: the inputs or targets contain NaN or Inf")
        self.S += w.sum().double()
        self.Z += (w * z).sum(0).double()
        self.ZZ += (w * z * z).sum(0).double()
        self.Y += (w * y).sum(0).double()
        self.YZ += (w * y * z).sum(0).double()


def solve_norm_affine(stats: NormStatistics, gamma_a: torch.Tensor, beta_a: torch.Tensor, strength: float,
                      form: str = "output", percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, β), each (features,) float32: the anchored least-squares fit of the module docstring.

    gamma_a, beta_a: the anchor (features,); strength: λ (output form) or λ' (weight form), inf allowed.
    """
    if form not in ("output", "weight"):
        raise ValueError(f"form must be 'output' or 'weight', got {form!r}")
    if math.isinf(strength) or not float(stats.S) > 0:
        return gamma_a.detach().float().clone(), beta_a.detach().float().clone()
    g_a, b_a = gamma_a.detach().double().to(stats.S.device), beta_a.detach().double().to(stats.S.device)
    S, Z, ZZ, Y, YZ = stats.S, stats.Z, stats.ZZ, stats.Y, stats.YZ
    delta = percdamp * ZZ.mean()
    if form == "output":
        k, ridge = 1 + strength, delta
        r1 = YZ + strength * (g_a * ZZ + b_a * Z) + delta * g_a
        r2 = Y + strength * (g_a * Z + b_a * S)
        a11, a12, a22 = k * ZZ + ridge, k * Z, k * S
    else:  # a ridge λ'' = λ' mean(ZZ) toward the anchor on both parameters
        lam = strength * ZZ.mean() + delta
        a11, a12, a22 = ZZ + lam, Z, S + lam
        r1, r2 = YZ + lam * g_a, Y + lam * b_a
    det = a11 * a22 - a12 * a12                                   # > 0: the system is definite for δ > 0
    gamma = (a22 * r1 - a12 * r2) / det
    beta = (a11 * r2 - a12 * r1) / det
    return gamma.float(), beta.float()
