"""Solvers: how one linear layer becomes its quantized version, chosen by `_target_` (conf/quant).

The calibration engine gathers a layer's statistics (H from the merged model's inputs, C from the
experts' targets when the solver asks for them) and hands them to `solver.solve(W_m, stats)`:

    RTN    round W_m to the nearest point of its grids; needs no data
    GPTQ   GPTQ of W_m under H (the merged model's own outputs are the targets)
    EPMQ   GPTQ of W* = relaxed_target(H, C, W_m, λ, form) under H (epmq.core.anchor): the experts
           supply the targets and the merged weights anchor the solution; λ = inf is GPTQ exactly

Each returns a Solution: the QuantResult (codes, grids, dequantized weight) and a few numbers per
layer that the engine logs (`loss` = the solver's own objective at Q, `rtn_loss` = that of
round-to-nearest of the same target under the same H, `anchor_shift` = ‖W* − W_m‖ / ‖W_m‖), and,
when E-PMQ calibrates biases, the layer's new bias.

E-PMQ's calibration ingredients beyond the paper (FeatCal-style, DESIGN §1; each off by default):

    normalize       each task's terms (H_t, C_t) enter divided by ‖H̄_t‖_F, H̄_t its per-token Gram, so no
                    task dominates a layer by the size of its features (the engine folds task by task)
    interp  α       the experts' targets are taken at inputs α X^e + (1−α) X̂ (expert path and merged path
                    mixed; α = 1 is the expert path alone, the paper's targets)
    extrapolate ρ   the anchor is W_a = W_0 + ρ (W_m − W_0), the merge's task vector scaled by ρ
                    (ρ = 1: the merged weights; W_0 the base model's layer)
    calibrate_bias  after rounding, the bias is solved in closed form for the rounded Q (the same
                    anchored objective, the bias a free parameter): it takes up the mean of the error
    calibrate_norms the block's LayerNorms' γ, β fitted channel by channel to the experts' norm outputs
                    (epmq.core.norm_affine), anchored the same way; they stay in float
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from epmq.core.anchor import FORMS, relaxed_target, rounding_hessian
from epmq.core.gptq import QuantResult, gptq, rtn
from epmq.core.norm_affine import NormStatistics, solve_norm_affine
from epmq.core.quant import QuantSpec
from epmq.core.stats import LayerStatistics


INGREDIENTS = ("normalize", "interp", "extrapolate", "calibrate_bias", "calibrate_norms")  # EPMQ's options beyond the paper's


@dataclass
class Solution:
    """A quantized layer and what is logged about it (floats, keyed by metric name)."""

    result: QuantResult
    metrics: dict[str, float] = field(default_factory=dict)
    bias: torch.Tensor | None = None  # (out,) float32: the layer's new bias (calibrate_bias), else None


class RTN:
    """Round-to-nearest on min-max grids (epmq.core.quant); no calibration data.

    Args: the QuantSpec fields (bits, group_size, sym, ...); act_order, static_groups, percdamp
    and blocksize are accepted for a uniform config and play no role.
    """

    name = "rtn"
    needs_statistics = False
    needs_targets = False

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = False,
                 static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128):
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                              static_groups=static_groups, percdamp=percdamp, blocksize=blocksize)

    def solve(self, W_m: torch.Tensor, stats: LayerStatistics | None = None) -> Solution:
        """W_m (out, in) rounded; loss = ‖Q − W_m‖² (there is no H)."""
        result = rtn(W_m, self.spec)
        return Solution(result, {"loss": result.loss})

    def describe(self) -> dict:
        return {"method": self.name, "spec": self.spec.__dict__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class GPTQ(RTN):
    """GPTQ of the merged weights under H = Σ_t w_t X̂_tᵀX̂_t / n_t (epmq.core.gptq)."""

    name = "gptq"
    needs_statistics = True

    def target(self, W_m: torch.Tensor, stats: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(W to round (out, in), H to round it with (in, in), extra metrics)."""
        return W_m, stats.H, {}

    def solve(self, W_m: torch.Tensor, stats: LayerStatistics | None = None) -> Solution:
        if stats is None or stats.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        return self.quantize_target(*self.target(W_m, stats))

    def quantize_target(self, W: torch.Tensor, H: torch.Tensor, metrics: dict) -> Solution:
        """GPTQ of W (out, in) under H (in, in); `loss` and `rtn_loss` logged beside `metrics`."""
        result = gptq(W, H, self.spec)
        # the baseline GPTQ must beat: round the same W to nearest, scored under the same H (a logged
        # number: its product in float32, which costs a fraction of float64's)
        rtn_loss = rtn(W, self.spec, H=H, loss_dtype=torch.float32).loss
        return Solution(result, {"loss": result.loss, "rtn_loss": rtn_loss, **metrics})


class EPMQ(GPTQ):
    """E-PMQ: GPTQ of the anchored expert-guided target W* (DESIGN §1, epmq.core.anchor).

    Args:
        strength: anchor strength λ >= 0 (output form) or λ' (weight form); inf (or "inf") is plain
            GPTQ of the merged model, exactly, and then no expert targets are needed.
        form: "output" (anchor in output space) or "weight" (in weight space).
        Others: the QuantSpec fields; percdamp is also the δ of the relaxation.
    """

    name = "epmq"

    def __init__(self, strength: float | str = 1.0, form: str = "output", normalize: bool = False,
                 interp: float = 1.0, extrapolate: float = 1.0, calibrate_bias: bool = False,
                 calibrate_norms: bool = False, **spec):
        super().__init__(**spec)
        self.strength = parse_strength(strength)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form = form
        for name, value in (("normalize", normalize), ("calibrate_bias", calibrate_bias),
                            ("calibrate_norms", calibrate_norms)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if isinstance(interp, bool) or not isinstance(interp, (int, float)) or not 0 <= interp <= 1:
            raise ValueError(f"interp (the expert path's share α of the targets' inputs) must be in [0, 1], "
                             f"got {interp!r}")
        if isinstance(extrapolate, bool) or not isinstance(extrapolate, (int, float)) or not math.isfinite(extrapolate):
            raise ValueError(f"extrapolate (ρ of the anchor W_0 + ρ (W_m − W_0)) must be a finite number, "
                             f"got {extrapolate!r}")
        self.normalize, self.interp = normalize, float(interp)
        self.extrapolate, self.calibrate_bias = float(extrapolate), calibrate_bias
        self.calibrate_norms = calibrate_norms

    @property
    def needs_targets(self) -> bool:
        return not math.isinf(self.strength)

    @property
    def needs_base(self) -> bool:
        """Whether solve needs the base model's layer (the extrapolated anchor)."""
        return self.extrapolate != 1.0

    def target(self, W_m, stats, base=None):
        W_a = self.anchor(W_m, None if base is None else base[0])
        R = stats.C
        if R is not None and W_a is not W_m:
            if not stats.residual:
                raise ValueError("an extrapolated anchor needs residual statistics (the engine's)")
            R = R - (W_a.double() - W_m.double()) @ stats.H  # C − W_a H = (C − W_m H) − (W_a − W_m) H
        W_star, H = self.anchored(W_a, stats.H, R, stats.residual, self.strength)
        return W_star, H, {"anchor_shift": anchor_shift(W_star, W_m)}

    def anchor(self, merged: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The anchor base + ρ (merged − base) of one parameter (a weight, bias, γ or β, any shape, in
        merged's dtype); `merged` itself when ρ = 1. base: the base model's same parameter."""
        if not self.needs_base:
            return merged
        if base is None:
            raise ValueError(f"extrapolate={self.extrapolate:g} needs the base model's layer (base=(W_0, b_0))")
        base = base.to(merged)
        return base + self.extrapolate * (merged - base)

    def anchored(self, W_m: torch.Tensor, H: torch.Tensor, C: torch.Tensor | None, residual: bool,
                 strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """W* (out, in) at `strength` from the statistics (H, C) and the Hessian (in, in) GPTQ rounds it
        under; strength inf gives W_m and H themselves (C is not read)."""
        if math.isinf(strength):
            return W_m, H
        W_star = relaxed_target(H, C, W_m, strength, self.form, self.spec.percdamp, residual=residual)
        return W_star, rounding_hessian(H, strength, self.form)

    def solve(self, W_m: torch.Tensor, stats: LayerStatistics | None = None, bias: torch.Tensor | None = None,
              base=None) -> Solution:
        """Q of W_m (out, in); with calibrate_bias, also the new bias (out,) from the old one `bias`."""
        if stats is None or stats.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        W_star, H, metrics = self.target(W_m, stats, base)
        solution = self.finish(W_star, H, metrics)
        if self.calibrate_bias and bias is not None:
            solution.bias = self.bias_for(solution.result.weight, W_m, bias, stats, base)
        return solution

    def norm_affine(self, stats: NormStatistics, gamma_m: torch.Tensor, beta_m: torch.Tensor,
                    base=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A LayerNorm's new (γ, β), each (features,), from its statistics (epmq.core.norm_affine), anchored at the
        merged (γ_m, β_m) or, with extrapolate ρ, at base + ρ (merged − base); base: (γ_0, β_0) or None."""
        gamma_0, beta_0 = (None, None) if base is None else base
        return solve_norm_affine(stats, self.anchor(gamma_m, gamma_0), self.anchor(beta_m, beta_0), self.strength,
                                 self.form, self.spec.percdamp)

    def finish(self, W_star: torch.Tensor, H: torch.Tensor, metrics: dict) -> Solution:
        """The layer's Solution from its target W*: GPTQ-rounded here (RelaxedEPMQ keeps it as it is)."""
        return self.quantize_target(W_star, H, metrics)

    def bias_for(self, Q: torch.Tensor, W_m: torch.Tensor, b_m: torch.Tensor, stats: LayerStatistics,
                 base=None) -> torch.Tensor:
        """The bias (out,) minimising the anchored objective for the fixed weight Q (out, in).

        With d = b − b_m, D = Q − W_m, the anchor's shifts Δ = W_a − W_m and β = b_a − b_m, the means
        x̄ = Σ w X̂ / S and ē = Σ w (Ỹ − X̂W_mᵀ) / S of the inputs and of the residual targets:

            output form:  d = (ē + λ (β + Δ x̄)) / (1 + λ) − D x̄
            weight form:  d = (S (ē − D x̄) + λ'' (β + Δ x̄ − D x̄)) / (S + λ''),  λ'' = λ' mean(diag H)

        λ = inf gives d = β − (Q − W_a) x̄: the rounding's (and the anchor's) mean error removed.
        """
        if stats.x is None:
            raise ValueError("calibrate_bias needs statistics with means=True")
        S = float(stats.S)
        if not S > 0:
            return b_m.detach().float().clone()
        x_bar = stats.x / S                                                   # in
        W64 = W_m.double()
        W_0, b_0 = (None, None) if base is None else base
        W_a = self.anchor(W_m, W_0).double()
        b_a = self.anchor(b_m.double(), b_0)
        anchor_d = (b_a - b_m.double()) - (Q.double() - W_a) @ x_bar          # β − (Q − W_a) x̄, the λ = inf answer
        lam = self.strength
        if math.isinf(lam):
            d = anchor_d
        else:
            fit_d = stats.y / S - (Q.double() - W64) @ x_bar                    # ē − D x̄, the λ = 0 answer
            weight = lam if self.form == "output" else lam * float(stats.H.diagonal().mean()) / S
            d = (fit_d + weight * anchor_d) / (1 + weight)
        return (b_m.double() + d).float()

    def describe(self) -> dict:
        return {**super().describe(), "strength": self.strength, "form": self.form,
                **{k: getattr(self, k) for k in INGREDIENTS}}

    def __repr__(self) -> str:
        extras = "".join(f", {k}={v!r}" for k, v, default in (("normalize", self.normalize, False),
                         ("interp", self.interp, 1.0), ("extrapolate", self.extrapolate, 1.0),
                         ("calibrate_bias", self.calibrate_bias, False),
                         ("calibrate_norms", self.calibrate_norms, False)) if v != default)
        return f"EPMQ(strength={self.strength:g}, form={self.form!r}{extras}, {self.spec})"


class RelaxedEPMQ(EPMQ):
    """E-PMQ's continuous target W* written as it is, not rounded: the FP calibrated merge.

    The same calibration as EPMQ at the same strength and form (the experts' targets, the merged
    weights as anchor); beside the quantized E-PMQ it shows apart what the calibration repairs in the
    merge and what rounding costs. Nothing is quantized (`quantizes` is False): the engine keeps no
    codes for it, so it is neither exported nor resumed.
    """

    name = "epmq_fp"
    quantizes = False

    def finish(self, W_star: torch.Tensor, H: torch.Tensor, metrics: dict) -> Solution:
        none = W_star.new_empty(0)
        return Solution(QuantResult(W_star.float(), none.to(torch.uint8), none, none, none.long(), 0.0), metrics)


class ChosenEPMQ(EPMQ):
    """E-PMQ whose anchor strength is chosen among `candidates` as the calibration goes (no single value:
    `strength` is nan). The shared part of LayerwiseEPMQ and BlockChoiceEPMQ: the candidates, strongest first
    so that ties keep the stronger anchor, and the refusal of the calibration ingredients.

    Class attributes: select (the quant.select value naming the choice), unit (what one choice covers).
    """

    name = "epmq"
    select = unit = ""

    def __init__(self, candidates, form: str = "output", **spec):
        ingredients = {k: spec.pop(k) for k in INGREDIENTS if k in spec}
        super().__init__(strength=0.0, form=form, **spec)
        if any(v != getattr(self, k) for k, v in ingredients.items()):
            raise ValueError(f"the {self.unit} anchor choice (quant.select={self.select}) takes none of E-PMQ's "
                             f"calibration ingredients; got {ingredients}")
        values = sorted({parse_strength(c) for c in candidates}, reverse=True)  # strongest first
        if not values:
            raise ValueError("candidates must list at least one anchor strength")
        self.candidates = values
        self.strength = math.nan

    @property
    def needs_targets(self) -> bool:
        return any(not math.isinf(c) for c in self.candidates)

    def describe(self) -> dict:
        return {**super().describe(), "strength": None, "candidates": self.candidates, "select": self.select}


class LayerwiseEPMQ(ChosenEPMQ):
    """E-PMQ whose anchor strength is chosen per layer, in the same pass, by K-fold cross-validation.

    The engine gathers the layer's statistics in K folds of samples (epmq.core.stats.FoldedStatistics).
    For every candidate λ and fold k, W*(λ) is fitted on the other folds and rounded by GPTQ under
    their H; its error on fold k against the experts' targets,

        E_k(Q) = Σ_{fold k} w ‖X̂Qᵀ − Ỹ‖² = tr(D H_k Dᵀ) − 2 tr(D R_kᵀ) + const,   D = Q − W_m,

    is summed over the folds. The λ with the least error (ties: the stronger anchor) is then fitted
    on all folds. λ = inf (GPTQ of the merged weights) is a candidate like the others.

    Measured on the offline suite (4 bits, seed 0): it picks λ ≈ 0-0.3 and scores below GPTQ
    (TA 0.3: 76.15 vs 76.44; TIES: 75.92 vs 80.24; TA 0.1: 78.12 vs 82.10), while the run-level
    choice scores 78.77 / 81.09 / 82.01: a layer's own held-out error does not see what its error
    does to the blocks after it. Kept as an experimental option and a baseline for better criteria.

    Args:
        candidates: the anchor strengths to choose from (numbers >= 0 or inf).
        folds: K >= 2.
        form, spec: as EPMQ.
    """

    select, unit = "layer", "per-layer"

    def __init__(self, candidates=(0.0, 0.3, 1.0, 3.0, 10.0, "inf"), folds: int = 2, form: str = "output", **spec):
        super().__init__(candidates, form, **spec)
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        self.folds = folds

    def solve(self, W_m: torch.Tensor, stats) -> Solution:
        if stats is None or stats.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        if not getattr(stats, "residual", False) or not hasattr(stats, "fold"):
            raise ValueError("LayerwiseEPMQ needs FoldedStatistics of residual targets (the engine gathers them "
                             "when the solver has `folds`)")
        H, R = stats.H, stats.C
        W64 = W_m.double()
        errors = {}
        for lam in self.candidates:
            error = 0.0
            for k in range(self.folds):
                part = stats.fold(k)
                if part.tokens == 0:
                    continue
                H_rest, R_rest = H - part.H, R - part.C
                if not H_rest.diagonal().mean() > 0:
                    continue  # every token of this layer is in fold k: nothing to fit on
                Q = gptq(*self.anchored(W_m, H_rest, R_rest, True, lam), self.spec).weight
                D = Q.double() - W64
                error += float(((D @ part.H) * D).sum() - 2 * (D * part.C).sum())
            errors[lam] = error
        best = min(self.candidates, key=lambda lam: errors[lam])  # candidates strongest first: ties keep it
        W_star, H_round = self.anchored(W_m, H, R, True, best)
        return self.quantize_target(W_star, H_round, {"anchor_shift": anchor_shift(W_star, W_m),
                                                      "anchor_strength": best})

    def describe(self) -> dict:
        return {**super().describe(), "folds": self.folds}

    def __repr__(self) -> str:
        return f"LayerwiseEPMQ(candidates={self.candidates}, folds={self.folds}, form={self.form!r}, {self.spec})"


class BlockChoiceEPMQ(ChosenEPMQ):
    """E-PMQ whose anchor strength is chosen per calibration step (a block; a layer group when calibrating
    true-sequentially) by the task heads' loss on the held-out selection samples, in one calibration.

    At the end of each step the engine solves and rounds the step's layers at every candidate λ from the
    same statistics (H, C), writes each candidate in turn into the model (the steps before it at their
    chosen λ, the layers after it still the FP merge) and keeps the one whose model has the least mean
    cross-entropy on the selection samples; ties keep the stronger anchor. The engine asks for that loss
    through the `selection` function a run gives it (epmq.jobs.steps.calibrate).

    Compared with the run-level choice (one whole calibration per candidate) it calibrates once, but scores
    every candidate of every step: K·S full forwards of the selection samples for K candidates and S steps.

    Args:
        candidates: the anchor strengths to choose from (numbers >= 0 or inf).
        form, spec: as EPMQ. The calibration ingredients are not taken (each would need its own study here).
    """

    select, unit = "block", "per-block"
    chooses_by_selection = True

    def __init__(self, candidates=(math.inf, 10.0, 3.0, 1.0, 0.3, 0.0), form: str = "output", **spec):
        super().__init__(candidates, form, **spec)

    def at(self, strength: float) -> EPMQ:
        """The plain E-PMQ solver of one candidate."""
        return EPMQ(strength, self.form, **self.spec.__dict__)

    def solve(self, W_m: torch.Tensor, stats=None, **context) -> Solution:
        raise RuntimeError("BlockChoiceEPMQ is solved through its candidates (`at`) by the calibration engine, "
                           "which scores each on the selection samples; give BlockwiseCalibration a `selection`")

    def __repr__(self) -> str:
        return f"BlockChoiceEPMQ(candidates={self.candidates}, form={self.form!r}, {self.spec})"


def anchor_shift(W_star: torch.Tensor, W_m: torch.Tensor) -> float:
    """‖W* − W_m‖ / ‖W_m‖ (0 when W* is W_m itself)."""
    if W_star is W_m:
        return 0.0
    W64 = W_m.double()
    return ((W_star.double() - W64).norm() / W64.norm().clamp_min(1e-30)).item()


def parse_strength(value) -> float:
    """An anchor strength: a number >= 0, or inf (YAML's .inf, the command line's inf)."""
    if isinstance(value, str) and value.strip().lower() in (".inf", "inf", "infinity"):
        return math.inf
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number >= 0 or inf, got {value!r}") from None
    if math.isnan(s) or s < 0:
        raise ValueError(f"strength must be >= 0 (inf allowed), got {value!r}")
    return s
