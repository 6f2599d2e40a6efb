"""Solvers: how one linear layer becomes its quantized version, chosen by `_target_` (conf/quant).

The calibration engine gathers a layer's statistics (H from the merged model's inputs, C from the
experts' targets when the solver asks for them) and hands them to `solver.solve(W_m, stats)`. What the
engine gathers is what the solver declares in one value, `solver.requirements` (a Requirements): the
engine reads that, never the solver's type or its options.

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

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from epmq.core.anchor import FORMS, parse_strength, relaxed_target, rounding_hessian
from epmq.core.gptq import QuantResult, gptq, rtn
from epmq.core.norm_affine import NormStatistics, solve_norm_affine
from epmq.core.overrides import ModuleOverrides
from epmq.core.quant import QuantSpec
from epmq.core.stats import LayerStatistics

INGREDIENTS = ("normalize", "interp", "extrapolate", "calibrate_bias", "calibrate_norms")  # EPMQ's options beyond the paper's


@dataclass
class Solution:
    """A quantized layer and what is logged about it (floats, keyed by metric name)."""

    result: QuantResult
    metrics: dict[str, float] = field(default_factory=dict)
    bias: torch.Tensor | None = None  # (out,) float32: the layer's new bias (calibrate_bias), else None


@dataclass(frozen=True)
class Requirements:
    """What a solver needs the engine to gather and pass for each layer.

    statistics: H = Σ w X̂ᵀX̂ of the merged model's inputs (RTN needs none)
    targets:    C = Σ w ỸᵀX̂ from the experts' outputs, streamed block by block (E-PMQ below λ = ∞)
    base:       the base model's layers, passed to solve as `base` (an extrapolated anchor)
    folds:      K > 0: the statistics gathered in K folds of samples (cross-validation); 0: one sum
    normalize:  each task's (H_t, C_t) folded into the sums scaled by w_t / ‖H_t‖_F as its batches end
    interp:     α: the targets taken at inputs α X^e + (1−α) X̂ (1: the experts' own path)
    bias:       the layer's bias passed to solve as `bias`, and input means gathered (calibrate_bias)
    norms:      the block's LayerNorms calibrated (statistics of their outputs; norm_affine solves them)
    codes:      the solution is a quantized layer whose codes the engine keeps (False: an FP target)
    per_step_choice: no single solve: the engine solves `candidates` through `at(λ)` at every step and
                keeps the one the selection samples score best (epmq.engine.block_choice)
    head:       the model's head (the adapter's head_stages, e.g. a causal LM's lm_head) is quantized too, as a
                last stage whose inputs are the final hidden states
    """

    statistics: bool = True
    targets: bool = False
    base: bool = False
    folds: int = 0
    normalize: bool = False
    interp: float = 1.0
    bias: bool = False
    norms: bool = False
    codes: bool = True
    per_step_choice: bool = False
    head: bool = False


class RTN:
    """Round-to-nearest on min-max grids (epmq.core.quant); no calibration data.

    Args: the QuantSpec fields (bits, group_size, sym, ...); act_order, static_groups, percdamp
    and blocksize are accepted for a uniform config and play no role.
        overrides: per-module rules, module-name regex -> {bits, group_size} or {skip: true}; the first rule
            whose pattern matches a module's whole name decides (epmq.core.overrides).
        lm_head: quantize the model's head too (GPTQModel's lm_head=True); off by default.
    """

    name = "rtn"
    REQUIREMENTS = Requirements(statistics=False)

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, act_order: bool = False,
                 static_groups: bool = False, percdamp: float = 0.01, blocksize: int = 128,
                 overrides: Mapping | None = None, lm_head: bool = False):
        self.spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                              static_groups=static_groups, percdamp=percdamp, blocksize=blocksize)
        self.overrides = ModuleOverrides(overrides)
        if not isinstance(lm_head, bool):
            raise ValueError(f"lm_head must be true or false, got {lm_head!r}")
        self.lm_head = lm_head

    @property
    def requirements(self) -> Requirements:
        return dataclasses.replace(self.REQUIREMENTS, head=self.lm_head)

    def for_module(self, name: str):
        """The solver of module `name` (full name in the model): this one, or a copy at the QuantSpec the first
        matching override gives; None when an override leaves the module in float."""
        spec = self.overrides.spec_for(name, self.spec)
        if spec is None or spec == self.spec:
            return None if spec is None else self
        clone = copy.copy(self)
        clone.spec = spec
        return clone

    def check_modules(self, names) -> None:
        """ValueError naming every override that matches none of the modules `names` (all the model's quantizable
        layers), before any work."""
        self.overrides.check_used(names)

    def solve(self, W_m: torch.Tensor, stats: LayerStatistics | None = None) -> Solution:
        """W_m (out, in) rounded; loss = ‖Q − W_m‖² (there is no H)."""
        result = rtn(W_m, self.spec)
        return Solution(result, {"loss": result.loss})

    def describe(self) -> dict:
        return {"method": self.name, "spec": self.spec.__dict__,
                **({"overrides": self.overrides.describe()} if self.overrides else {}),
                **({"lm_head": True} if self.lm_head else {})}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class GPTQ(RTN):
    """GPTQ of the merged weights under H = Σ_t w_t X̂_tᵀX̂_t / n_t (epmq.core.gptq)."""

    name = "gptq"
    REQUIREMENTS = Requirements()

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
        if self.lm_head and (not math.isinf(self.strength) or self.needs_base):
            # The targets provider reads each expert's layers by stack and block ('<stack>.<i>.'); a head sits
            # outside every stack, and experts with tied embeddings (Llama 3.2) store it as the embedding.
            raise ValueError(f"lm_head=true takes no expert targets: E-PMQ at strength={self.strength:g}"
                             f"{f', extrapolate={self.extrapolate:g}' if self.needs_base else ''} would need the "
                             f"experts' head outputs, which the targets provider does not read; use strength=inf "
                             f"(GPTQ of the merged head) or quant=gptq")

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=not math.isinf(self.strength), base=self.needs_base, normalize=self.normalize,
                            interp=self.interp, bias=self.calibrate_bias, norms=self.calibrate_norms,
                            head=self.lm_head)

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


def module_solver(solver, name: str):
    """The solver of module `name`: solver.for_module(name) (None: the module stays in float); a solver without
    per-module options (a stand-in of a test) solves every module itself."""
    for_module = getattr(solver, "for_module", None)
    return solver if for_module is None else for_module(name)


class RelaxedEPMQ(EPMQ):
    """E-PMQ's continuous target W* written as it is, not rounded: the FP calibrated merge.

    The same calibration as EPMQ at the same strength and form (the experts' targets, the merged
    weights as anchor); beside the quantized E-PMQ it shows apart what the calibration repairs in the
    merge and what rounding costs. Nothing is quantized: the engine keeps no
    codes for it (its requirements say codes=False), so it is neither exported nor resumed.
    """

    name = "epmq_fp"

    @property
    def requirements(self) -> Requirements:
        return dataclasses.replace(super().requirements, codes=False)

    def finish(self, W_star: torch.Tensor, H: torch.Tensor, metrics: dict) -> Solution:
        none = W_star.new_empty(0)
        return Solution(QuantResult(W_star.float(), none.to(torch.uint8), none, none, none.long(), 0.0), metrics)


def anchor_shift(W_star: torch.Tensor, W_m: torch.Tensor) -> float:
    """‖W* − W_m‖ / ‖W_m‖ (0 when W* is W_m itself)."""
    if W_star is W_m:
        return 0.0
    W64 = W_m.double()
    return ((W_star.double() - W64).norm() / W64.norm().clamp_min(1e-30)).item()
