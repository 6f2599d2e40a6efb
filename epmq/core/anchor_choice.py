"""Choosing E-PMQ's anchor strength λ among candidates, four ways (`anchor.select`):

    run    one whole calibration per candidate (strength, form), each model scored on the held-out
           selection samples by the task heads; the best score wins (the jobs do the runs; `candidate_grid`
           lists them, `selection_key` orders their scores)
    staged rounds that score the candidates at low fidelity (OpenLoopEPMQ: all of them solved from one pass's
           statistics; or calibrations on a share of the samples) and keep the best few, which are then
           calibrated in full as `run` does (epmq.jobs.staged_choice)
    block  one calibration: at every step the engine solves each candidate from the same statistics and
           keeps the one whose model scores best on the selection samples (BlockChoiceEPMQ declares it,
           epmq.engine.block_choice does it)
    layer  one calibration: per layer, the candidate with the least K-fold cross-validated error against the
           experts' targets (LayerwiseEPMQ, a solver)

Candidates come strongest first everywhere, so that a tie keeps the anchor closest to GPTQ (λ = inf).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from epmq.core.anchor import parse_strength
from epmq.core.gptq import QuantResult, gptq
from epmq.core.solvers import EPMQ, INGREDIENTS, Requirements, Solution, anchor_shift

SELECT = ("run", "staged", "block", "layer")  # how `strength: auto` chooses
SELECT_BY = ("nll", "acc")          # what a run-level or per-step choice compares on the selection samples


def check_share(value, name: str) -> float:
    """A share of the calibration or selection samples, in (0, 1]; ValueError naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def candidate_grid(strengths, forms) -> list[tuple[float, str]]:
    """(strength, form) pairs to calibrate, strongest first. λ = inf (W* = W_m) and λ = 0 are the same model
    whatever the form: tried once, in the first form. ValueError on an empty list or a bad strength."""
    forms = list(forms)
    if not list(strengths) or not forms:
        raise ValueError("the candidates' strength and form lists must not be empty")
    values = sorted({parse_strength(s) for s in strengths}, reverse=True)
    return [(s, f) for s in values for f in forms if f == forms[0] or 0 < s < math.inf]


def selection_key(scores: dict[str, float], select_by: str, higher_is_better: bool = True) -> float:
    """Higher is better: -cross-entropy ("nll") or the suite's metric ("acc": accuracy, exact match; negated
    for a metric where lower is better, such as perplexity) on the selection samples."""
    if select_by == "nll":
        return -scores["select_avg_nll"]
    return scores["select_avg_acc"] if higher_is_better else -scores["select_avg_acc"]


class ChosenEPMQ:
    """E-PMQ whose anchor strength is chosen among `candidates` as the calibration goes (no single value:
    `strength` is nan). The shared part of LayerwiseEPMQ and BlockChoiceEPMQ: the candidates, strongest first
    so that ties keep the stronger anchor, the plain E-PMQ of one candidate (`at`), and the refusal of the
    calibration ingredients.

    Class attributes: select (the anchor.select value naming the choice), unit (what one choice covers).
    """

    name = "epmq"
    select = unit = ""

    def __init__(self, candidates, form: str = "output", **spec):
        ingredients = {k: spec.pop(k) for k in INGREDIENTS if k in spec}
        per_module = {k: v for k, v in spec.items() if k in ("overrides", "lm_head") and v}
        if per_module:  # each candidate would need its per-module solvers (not built for the choice)
            raise ValueError(f"the {self.unit} anchor choice (anchor.select={self.select}) takes no per-module "
                             f"options {sorted(per_module)}: choose a strength (or anchor.select=run), or drop them")
        self.plain = EPMQ(0.0, form, **spec)  # checks the form and the grid options
        if any(v != getattr(self.plain, k) for k, v in ingredients.items()):
            raise ValueError(f"the {self.unit} anchor choice (anchor.select={self.select}) takes none of E-PMQ's "
                             f"calibration ingredients; got {ingredients}")
        self.candidates = sorted({parse_strength(c) for c in candidates}, reverse=True)
        if not self.candidates:
            raise ValueError("candidates must list at least one anchor strength")
        self.form, self.spec, self.strength = form, self.plain.spec, math.nan

    def at(self, strength: float) -> EPMQ:
        """The plain E-PMQ solver of one candidate."""
        return EPMQ(strength, self.form, **self.spec.__dict__)

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=any(not math.isinf(c) for c in self.candidates))

    def describe(self) -> dict:
        return {**self.plain.describe(), "strength": None, "candidates": self.candidates, "select": self.select}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(candidates={self.candidates}, form={self.form!r}, {self.spec})"


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

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=super().requirements.targets, folds=self.folds)

    def solve(self, W_m: torch.Tensor, stats) -> Solution:
        if stats is None or stats.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        if not getattr(stats, "residual", False) or not hasattr(stats, "fold"):
            raise ValueError("LayerwiseEPMQ needs FoldedStatistics of residual targets (the engine gathers them "
                             "when the solver's requirements have folds)")
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
                Q = gptq(*self.plain.anchored(W_m, H_rest, R_rest, True, lam), self.spec).weight
                D = Q.double() - W64
                error += float(((D @ part.H) * D).sum() - 2 * (D * part.C).sum())
            errors[lam] = error
        best = min(self.candidates, key=lambda lam: errors[lam])  # candidates strongest first: ties keep it
        W_star, H_round = self.plain.anchored(W_m, H, R, True, best)
        return self.plain.quantize_target(W_star, H_round, {"anchor_shift": anchor_shift(W_star, W_m),
                                                            "anchor_strength": best})

    def describe(self) -> dict:
        return {**super().describe(), "folds": self.folds}

    def __repr__(self) -> str:
        return f"LayerwiseEPMQ(candidates={self.candidates}, folds={self.folds}, form={self.form!r}, {self.spec})"


class BlockChoiceEPMQ(ChosenEPMQ):
    """E-PMQ whose anchor strength is chosen per calibration step (a block; a layer group when calibrating
    true-sequentially) by the task heads' loss on the held-out selection samples, in one calibration.

    Not a solver: its requirements say `per_step_choice`, and the engine (epmq.engine.block_choice) solves
    and rounds the step's layers at every candidate λ through `at(λ)` from the same statistics (H, C), writes
    each candidate in turn into the model (the steps before it at their chosen λ, the layers after it still
    the FP merge) and keeps the one whose model has the least mean cross-entropy on the selection samples;
    ties keep the stronger anchor. The engine asks for that loss through the `selection` function a run gives
    it (epmq.jobs.steps.calibrate).

    Compared with the run-level choice (one whole calibration per candidate) it calibrates once, but scores
    every candidate of every step: K·S forwards of the selection samples for K candidates and S steps (the
    blocks before the step's replayed). Two options cut that: `neighbours` k scores, after the first step, only
    the previous step's choice and its k nearest candidates on either side of it in the grid; `select_share`
    scores on the first share of each task's selection samples.

    Args:
        candidates: the anchor strengths to choose from (numbers >= 0 or inf).
        form, spec: as EPMQ. The calibration ingredients are not taken (each would need its own study here).
        neighbours: None (every candidate at every step) or k >= 1.
        select_share: in (0, 1]: the share of the selection samples each candidate is scored on.
    """

    select, unit = "block", "per-block"

    def __init__(self, candidates=(math.inf, 10.0, 3.0, 1.0, 0.3, 0.0), form: str = "output",
                 neighbours: int | None = None, select_share: float = 1.0, **spec):
        super().__init__(candidates, form, **spec)
        if neighbours is not None and (isinstance(neighbours, bool) or not isinstance(neighbours, int)
                                       or neighbours < 1):
            raise ValueError(f"neighbours must be null or an integer >= 1, got {neighbours!r}")
        self.neighbours, self.select_share = neighbours, check_share(select_share, "select_share")

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=super().requirements.targets, per_step_choice=True)

    def step_candidates(self, previous: float | None) -> list[float]:
        """The candidates one step scores (strongest first): all of them, or with `neighbours` k and the previous
        step's choice, that choice and the k candidates on either side of it."""
        if self.neighbours is None or previous is None:
            return list(self.candidates)
        k = self.candidates.index(previous)
        return self.candidates[max(0, k - self.neighbours):k + self.neighbours + 1]

    def describe(self) -> dict:
        return {**super().describe(), "neighbours": self.neighbours, "select_share": self.select_share}


class OpenLoopEPMQ(ChosenEPMQ):
    """The shared pass of the staged anchor choice: every candidate solved from the same statistics.

    The engine gathers each layer's statistics as for plain E-PMQ and calls `solve` once per layer, which solves
    every candidate from them and keeps each one's quantized layer in `solutions` (one dict λ -> keep(QuantResult)
    per solved layer, in the engine's solve order); the caller assembles each candidate's model and scores it.
    What `solve` writes into the model decides where the next block's inputs come from:

        pivot None   the merged weight W_m itself (an FP result, no codes): every block's inputs are the FP
                     merged model's, the open loop
        pivot λ0     plain E-PMQ at λ0, exactly: the pass is that calibration (its codes kept), and every other
                     candidate is solved from the statistics of the model quantized at λ0

    Two shortcuts, both exact at λ = 0 and λ = inf, make a candidate cost little more than its rounding:

        W*(λ) = W_m + (W*(0) − W_m) / (1+λ)
            one relaxed solve per layer; the exact target damps with δ/(1+λ) where this one keeps δ (output
            form; the weight form solves each λ exactly)
        GPTQ of all candidates at once
            the W*(λ) stacked along the output axis and rounded under the one H: in GPTQ each row has its own
            grids and its own error feedback, so stacking changes no row (output form, whose H is shared)

    Args:
        candidates, form, spec: as ChosenEPMQ.
        pivot: None (open loop) or the candidate λ0 the pass calibrates at.
        keep: what is kept of each candidate's QuantResult (default: all of it; the jobs keep the packed
            epmq.io.quantized_layer.QuantizedLayer, a quarter of the float32 weight at 8 bits or less).
    """

    select, unit = "staged", "shared-pass"

    def __init__(self, candidates=(math.inf, 10.0, 3.0, 1.0, 0.3, 0.0), form: str = "output",
                 pivot: float | str | None = None, keep: Callable[[QuantResult], object] | None = None, **spec):
        super().__init__(candidates, form, **spec)
        self.pivot = None if pivot is None else parse_strength(pivot)
        if self.pivot is not None and self.pivot not in self.candidates:
            raise ValueError(f"the pivot λ0 = {self.pivot:g} must be one of the candidates {self.candidates}")
        self.keep = keep or (lambda result: result)
        self.solutions: list[dict[float, object]] = []
        self.seconds = 0.0  # spent in solve: where a pass's time goes besides its forwards

    @property
    def requirements(self) -> Requirements:
        return Requirements(targets=super().requirements.targets, codes=self.pivot is not None)

    def targets(self, W_m: torch.Tensor, stats) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W*(λ) (out, in), H to round it under (in, in)) per candidate, in candidate order."""
        H, C, residual = stats.H, stats.C, stats.residual
        if self.form != "output" or all(math.isinf(c) for c in self.candidates):
            return [self.plain.anchored(W_m, H, C, residual, lam) for lam in self.candidates]
        W0 = self.plain.anchored(W_m, H, C, residual, 0.0)[0]
        delta = W0 - W_m.to(W0)
        return [(W_m, H) if math.isinf(lam) else (W0 if lam == 0 else W_m.to(W0) + delta / (1 + lam), H)
                for lam in self.candidates]

    def solve(self, W_m: torch.Tensor, stats=None) -> Solution:
        if stats is None or stats.tokens == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer")
        t0 = time.perf_counter()
        others = [lam for lam in self.candidates if lam != self.pivot]
        targets = [t for lam, t in zip(self.candidates, self.targets(W_m, stats)) if lam != self.pivot]
        out = W_m.shape[0]
        if not targets:
            results = []
        elif all(H is stats.H for _, H in targets):  # one GPTQ over the stacked rows
            stacked = gptq(torch.cat([W.to(torch.float32) for W, _ in targets]), stats.H, self.spec)
            results = [rows_of(stacked, k * out, (k + 1) * out) for k in range(len(targets))]
        else:
            results = [gptq(W, H, self.spec) for W, H in targets]
        kept = dict(zip(others, results))
        if self.pivot is None:
            none = W_m.new_empty(0)
            solution = Solution(QuantResult(W_m.detach().float(), none.to(torch.uint8), none, none, none.long(), 0.0))
        else:  # plain E-PMQ at the pivot, exactly as its own calibration solves it
            solution = self.at(self.pivot).solve(W_m, stats)
            kept[self.pivot] = solution.result
        self.solutions.append({lam: self.keep(kept[lam]) for lam in self.candidates})
        self.seconds += time.perf_counter() - t0
        return solution

    def describe(self) -> dict:
        return {**super().describe(), "pivot": self.pivot}


def rows_of(result: QuantResult, start: int, stop: int) -> QuantResult:
    """Rows start..stop of a QuantResult (its loss is the whole result's: not split)."""
    return QuantResult(result.weight[start:stop], result.qweight[start:stop], result.scales[start:stop],
                       result.zeros[start:stop], result.g_idx, math.nan, result.damp)
