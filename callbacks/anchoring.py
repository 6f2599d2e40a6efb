"""MergedWeightAnchoring: the E-PMQ target W* that GPTQ rounds, per quantized layer.

At the end of each block BlockwiseCalibration.finish_block() sums H and C over ranks and then asks
this callback for W* = epmq.anchor.relaxed_target(H, C, W_m, strength, form, percdamp):

    output form  W* = (C + λ W_m H + δ W_m) ((1+λ) H + δ I)⁻¹
    weight form  W* = (C + (λ'' + δ) W_m) (H + (λ'' + δ) I)⁻¹,  λ'' = λ' mean(diag H)

strength = inf returns W_m bit for bit, so the run is exactly GPTQ of the merged model. The
relative shift ‖W* − W_m‖ / ‖W_m‖ of every layer is logged as calib/block_<i>/<layer>/anchor_shift.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from epmq.anchor import FORMS, relaxed_target, rounding_hessian


class MergedWeightAnchoring(L.Callback):
    """Anchor strength and form of E-PMQ.

    Args:
        strength: λ (output form) or λ' (weight form), >= 0; float("inf") (or "inf") = plain GPTQ.
        form: "output" or "weight".
        percdamp: δ as a fraction of mean(diag H); None takes the module's QuantSpec.percdamp.
    """

    def __init__(self, strength: float = 1.0, form: str = "output", percdamp: float | None = None):
        strength = float(strength)  # also accepts "inf" from a config file
        if math.isnan(strength) or strength < 0:
            raise ValueError(f"strength must be >= 0 (inf allowed), got {strength}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if percdamp is not None and not (math.isfinite(percdamp) and percdamp >= 0):
            raise ValueError(f"percdamp must be finite and >= 0, got {percdamp}")
        self.strength, self.form, self.percdamp = strength, form, percdamp
        self.shifts: dict[int, dict[str, float]] = {}  # block -> layer -> ‖W* − W_m‖ / ‖W_m‖
        self._spec_percdamp = 0.01

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._spec_percdamp = pl_module.spec.percdamp

    def target(self, block: int, layer: str, H: torch.Tensor, C: torch.Tensor | None,
               W_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W*, H_round) for one layer from the rank-summed H (in x in), C (out x in) and W_m (out x in).

        W* (out x in) is the continuous target, H_round (in x in) the Hessian GPTQ rounds it with
        (epmq.anchor.rounding_hessian: H, or H + λ''I for the weight form).
        """
        percdamp = self._spec_percdamp if self.percdamp is None else self.percdamp
        W_star = relaxed_target(H, C, W_m, self.strength, self.form, percdamp)
        shift = (W_star.double() - W_m.double()).norm() / W_m.double().norm().clamp_min(1e-30)
        self.shifts.setdefault(block, {})[layer] = shift.item()
        return W_star, rounding_hessian(H, self.strength, self.form)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        i = pl_module.block_index
        pl_module.finish_block()  # idempotent: H, C summed and W* computed before the log below
        for layer, shift in self.shifts.get(i, {}).items():  # the same on every rank
            pl_module.log(f"calib/block_{i}/{layer}/anchor_shift", shift, on_epoch=True, sync_dist=True)
