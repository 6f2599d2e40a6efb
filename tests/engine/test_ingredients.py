"""E-PMQ's calibration ingredients (epmq.core.solvers.EPMQ: normalize, interp, extrapolate, calibrate_bias,
calibrate_norms).

Solver level on random float64 layers, each property against a brute-force computation from the raw
rows (X, Y, w): the first moments and add_scaled of LayerStatistics, the closed-form bias, the
extrapolated anchor. Engine level on the tiny CLIP zoo of conftest: block 0's inputs are the merged
model's own (the schedule is not true-sequential), so the expected statistics of its layers are
computed independently with hooks on the merged model.
"""

from __future__ import annotations

import math

import pytest
import torch

from epmq.core.anchor import relaxed_target
from epmq.core.anchor_choice import LayerwiseEPMQ
from epmq.core.gptq import gptq
from epmq.core.solvers import EPMQ, RelaxedEPMQ
from epmq.core.stats import LayerStatistics
from epmq.engine.calibration import BlockwiseCalibration
from epmq.io.pool import ExpertPool
from epmq.io.step_store import StepStore

from helpers.tiny import (ADAPTER, SPEC, SPEC_ARGS, TASKS, CalibrationData, CalibrationSet, calibration_set, load_state,
                          trainer_for)

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
QKV = LAYERS[:3]
TOKENS = 17  # tokens per CLIP sample of the tiny model (16 patches + the class token)
INF = math.inf


# -- solver level -------------------------------------------------------------------------------------


def rows(seed: int, n: int = 240, d_in: int = 32, d_out: int = 8):
    """A random layer problem: inputs X (n, in) with a mean (so that x̄ matters), targets Y (n, out) of a
    nearby linear layer plus noise, token weights w (n,), merged (W_m, b_m) and base (W_0, b_0) layers."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) + 0.5 * torch.randn(d_in, generator=g,
                                                                                    dtype=torch.float64)
    W_0 = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b_0 = torch.randn(d_out, generator=g) * 0.1
    W_m = W_0 + 0.1 * torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b_m = b_0 + 0.05 * torch.randn(d_out, generator=g)
    W_t = W_m + 0.1 * torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    Y = X @ W_t.double().T + 0.3 + 0.05 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    return X, Y, w, (W_m, b_m), (W_0, b_0)


def engine_statistics(X, Y, w, W_m, b_m, targets: bool = True, batches: int = 3) -> LayerStatistics:
    """Statistics as the engine gathers them for calibrate_bias: residual targets Y − (X W_mᵀ + b_m),
    first moments, in a few batches; H only (not residual) when the solver needs no targets (λ = inf)."""
    stats = LayerStatistics(X.shape[1], Y.shape[1] if targets else None, residual=targets, means=True)
    residual = Y - (X @ W_m.double().T + b_m.double())
    for part in torch.arange(len(X)).chunk(batches):
        stats.add(X[part], residual[part] if targets else None, weight=w[part])
    return stats


def test_first_moments_are_the_weighted_sums_of_the_rows():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 5, 16, generator=g, dtype=torch.float64)
    Y = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    w = torch.rand(4, 5, generator=g, dtype=torch.float64)  # per token
    stats = LayerStatistics(16, 8, means=True)
    stats.add(X[:1], Y[:1], weight=w[:1])
    stats.add(X[1:], Y[1:], weight=w[1:])
    Xr, Yr, wr = X.reshape(-1, 16), Y.reshape(-1, 8), w.reshape(-1)
    torch.testing.assert_close(stats.x, (wr[:, None] * Xr).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.y, (wr[:, None] * Yr).sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.S, wr.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.H, Xr.T @ (wr[:, None] * Xr), rtol=1e-12, atol=1e-12)
    assert stats.tokens == 20

    v = torch.rand(4, generator=g, dtype=torch.float64)  # per sample, then a plain number
    per_sample = LayerStatistics(16, None, means=True)
    per_sample.add(X, weight=v)
    per_sample.add(X, weight=0.5)
    assert per_sample.y is None
    torch.testing.assert_close(per_sample.x, (v[:, None, None] * X).sum((0, 1)) + 0.5 * X.sum((0, 1)))
    torch.testing.assert_close(per_sample.S, 5 * v.sum() + 0.5 * 20)
    # without means nothing of the kind is kept (and a bias cannot be solved from it)
    plain = LayerStatistics(16, 8)
    plain.add(X, Y)
    assert plain.x is None and plain.y is None and plain.S is None
    with pytest.raises(ValueError, match="means=True"):
        EPMQ(strength=1.0, calibrate_bias=True, **SPEC_ARGS).bias_for(torch.zeros(8, 16), torch.zeros(8, 16),
                                                                      torch.zeros(8), plain)


def test_add_scaled_equals_adding_the_scaled_batches_and_counts_tokens_once():
    X, Y, w, _, _ = rows(1, n=60, d_in=16, d_out=8)

    def gathered(parts):
        stats = LayerStatistics(16, 8, means=True)
        for part, scale in parts:
            stats.add(X[part], Y[part], weight=scale * w[part])
        return stats

    first, second = torch.arange(0, 25), torch.arange(25, 60)
    total, other = gathered([(first, 1.0)]), gathered([(second, 1.0)])
    assert total.add_scaled(other, 0.37) is total
    reference = gathered([(first, 1.0), (second, 0.37)])
    for name in ("H", "C", "x", "y", "S"):
        torch.testing.assert_close(getattr(total, name), getattr(reference, name), rtol=1e-12, atol=1e-12)
    assert total.tokens == 60  # the count is of rows, not scaled
    assert other.tokens == 35 and torch.equal(other.S, w[second].sum())  # the added object is left as it was
    with pytest.raises(ValueError, match="means"):
        LayerStatistics(16, 8, means=True).add_scaled(LayerStatistics(16, 8), 1.0)
    with pytest.raises(ValueError, match="means"):
        plain = LayerStatistics(16, 8)
        plain += LayerStatistics(16, 8, means=True)


# (form, strength, ρ): the λ = 0 and λ = inf ends, a finite λ of each form, with and without an extrapolated anchor
CASES = [("output", 0.0, 1.0), ("output", 0.7, 1.0), ("output", 0.7, 2.0), ("output", INF, 1.0),
         ("output", INF, 1.5), ("weight", 0.3, 1.0), ("weight", 0.3, -0.5)]


@pytest.mark.parametrize("form,strength,rho", CASES)
def test_calibrated_bias_minimises_the_anchored_objective_for_the_rounded_weight(form, strength, rho):
    X, Y, w, (W_m, b_m), (W_0, b_0) = rows(2)
    solver = EPMQ(strength=strength, form=form, extrapolate=rho, calibrate_bias=True, **SPEC_ARGS)
    stats = engine_statistics(X, Y, w, W_m, b_m, targets=not math.isinf(strength))
    solution = solver.solve(W_m, stats, bias=b_m, base=(W_0, b_0))
    assert solution.bias is not None and solution.bias.dtype == torch.float32 and solution.bias.shape == (8,)
    b = solution.bias.double()

    # everything below from the raw rows, in float64
    Q = solution.result.weight.double()
    W_a = W_0.double() + rho * (W_m.double() - W_0.double())
    b_a = b_0.double() + rho * (b_m.double() - b_0.double())
    S = w.sum()
    fit = (w[:, None] * (Y - X @ Q.T)).sum(0)              # Σ w (Y − X Qᵀ): b's pull toward the targets
    anchor = (w[:, None] * (b_a - X @ (Q - W_a).T)).sum(0)  # Σ w (b_a − X (Q − W_a)ᵀ): toward the anchor
    if math.isinf(strength):
        # the mean output error against the anchor layer is gone
        error = (w[:, None] * (X @ Q.T + b - X @ W_a.T - b_a)).sum(0) / S
        assert error.abs().max() < 1e-5, error
        expected = anchor / S
    elif form == "output":
        # argmin_b Σ w ‖X Qᵀ + b − Y‖² + λ Σ w ‖X (Q − W_a)ᵀ + b − b_a‖²
        expected = (fit + strength * anchor) / ((1 + strength) * S)
    else:
        # argmin_b Σ w ‖X Qᵀ + b − Y‖² + λ'' ‖(Q − W_a) x̄ + b − b_a‖², λ'' = λ' mean(diag H) (as in W*'s anchor)
        lam = strength * (X.T @ (w[:, None] * X)).diagonal().mean()
        expected = (fit + lam * anchor / S) / (S + lam)
    torch.testing.assert_close(b, expected, rtol=1e-5, atol=1e-6)
    if strength == 0:
        torch.testing.assert_close(b, fit / S, rtol=1e-5, atol=1e-6)  # the plain least-squares bias
    # the bias is a real correction: the rounded layer's mean error was not already zero
    assert (b - b_m.double()).abs().max() > 1e-3


def test_calibrated_bias_lowers_the_weighted_output_error_of_the_rounded_layer():
    X, Y, w, (W_m, b_m), _ = rows(3)
    solver = EPMQ(strength=0.0, calibrate_bias=True, **SPEC_ARGS)
    solution = solver.solve(W_m, engine_statistics(X, Y, w, W_m, b_m), bias=b_m)
    Q = solution.result.weight.double()

    def error(b):
        return float((w[:, None] * (X @ Q.T + b - Y).square()).sum())

    b = solution.bias.double()
    assert error(b) < error(b_m.double())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert error(b) <= error(b + 1e-3 * torch.randn(8, generator=g, dtype=torch.float64))
    # without a bias to calibrate (a linear without one) nothing is returned
    assert solver.solve(W_m, engine_statistics(X, Y, w, W_m, b_m)).bias is None
    assert EPMQ(strength=0.0, **SPEC_ARGS).solve(W_m, engine_statistics(X, Y, w, W_m, b_m), bias=b_m).bias is None


def test_extrapolated_anchor_at_inf_is_gptq_of_the_extrapolated_weights():
    X, Y, w, (W_m, b_m), (W_0, b_0) = rows(4)
    stats = engine_statistics(X, Y, w, W_m, b_m, targets=False)
    for rho in (0.0, 1.7):
        got = EPMQ(strength="inf", extrapolate=rho, **SPEC_ARGS).solve(W_m, stats, base=(W_0, b_0))
        W_a = W_0 + rho * (W_m - W_0)
        assert torch.equal(got.result.weight, gptq(W_a, stats.H, SPEC).weight), rho
        assert not torch.equal(got.result.weight, gptq(W_m, stats.H, SPEC).weight), rho
    # ρ = 1 is the default bit for bit, the base model's layer given or not
    residual = engine_statistics(X, Y, w, W_m, b_m)
    default = EPMQ(strength=0.5, **SPEC_ARGS).solve(W_m, residual)
    same = EPMQ(strength=0.5, extrapolate=1, **SPEC_ARGS).solve(W_m, residual, base=(W_0, b_0))
    assert torch.equal(same.result.weight, default.result.weight)
    assert same.metrics == default.metrics


@pytest.mark.parametrize("form,strength", [("output", 0.0), ("output", 2.0), ("weight", 0.5)])
def test_extrapolated_anchor_target_is_the_minimiser_anchored_at_the_extrapolated_weights(form, strength):
    """W* of the extrapolated anchor W_a, from the normal equations of the raw rows: the fit to the
    targets (bias b_m), the anchor λ toward W_a (output: Σ w ‖X(W − W_a)ᵀ‖², weight: λ''‖W − W_a‖²)
    and the damping δ‖W − W_a‖²."""
    X, Y, w, (W_m, b_m), (W_0, b_0) = rows(5)
    rho = 1.8
    stats = engine_statistics(X, Y, w, W_m, b_m)
    got = RelaxedEPMQ(strength=strength, form=form, extrapolate=rho, **SPEC_ARGS).solve(W_m, stats, base=(W_0, b_0))
    W_a = (W_0 + rho * (W_m - W_0)).double()
    H = X.T @ (w[:, None] * X)
    delta = SPEC.percdamp * H.diagonal().mean()
    B = (w[:, None] * (Y - b_m.double())).T @ X  # Σ w (Y − b_m)ᵀ X
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    if form == "output":
        A, B = (1 + strength) * H + delta * eye, B + strength * W_a @ H + delta * W_a
    else:
        lam = strength * H.diagonal().mean()
        A, B = H + (lam + delta) * eye, B + (lam + delta) * W_a
    expected = torch.linalg.solve(A, B.T).T  # W* A = B, A symmetric
    torch.testing.assert_close(got.result.weight.double(), expected, rtol=1e-5, atol=1e-6)
    # ... which is not the target anchored at the merged weights (at λ = 0 only the damping δ tells them apart)
    plain = RelaxedEPMQ(strength=strength, form=form, **SPEC_ARGS).solve(W_m, stats).result.weight
    assert (plain.double() - expected).abs().max() > (1e-3 if strength else 1e-4)


def test_extrapolate_needs_the_base_layer_and_residual_statistics():
    X, Y, w, (W_m, b_m), (W_0, b_0) = rows(6)
    solver = EPMQ(strength=1.0, extrapolate=2.0, **SPEC_ARGS)
    assert solver.requirements.base and not EPMQ(strength=1.0, extrapolate=1.0, **SPEC_ARGS).requirements.base
    with pytest.raises(ValueError, match="extrapolate"):
        solver.solve(W_m, engine_statistics(X, Y, w, W_m, b_m))
    not_residual = LayerStatistics(32, 8)
    not_residual.add(X, Y, weight=w)
    with pytest.raises(ValueError, match="residual"):
        solver.solve(W_m, not_residual, base=(W_0, b_0))


@pytest.mark.parametrize("option,value", [
    ("interp", -0.1), ("interp", 1.5), ("interp", True), ("interp", "0.5"), ("interp", math.nan),
    ("normalize", 1), ("normalize", "true"), ("calibrate_bias", 0), ("calibrate_bias", None),
    ("extrapolate", math.inf), ("extrapolate", math.nan), ("extrapolate", True), ("extrapolate", "2")])
def test_bad_ingredient_values_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        EPMQ(strength=1.0, **{option: value})


def test_ingredients_are_described_and_the_per_layer_choice_refuses_them():
    solver = EPMQ(strength=1.0, normalize=True, interp=0, extrapolate=-1, calibrate_bias=True)
    assert solver.interp == 0.0 and solver.extrapolate == -1.0
    assert {k: solver.describe()[k] for k in ("normalize", "interp", "extrapolate", "calibrate_bias")} == \
        {"normalize": True, "interp": 0.0, "extrapolate": -1.0, "calibrate_bias": True}
    assert "interp=0.0" in repr(solver) and "interp" not in repr(EPMQ(strength=1.0))
    for option, value in (("normalize", True), ("interp", 0.5), ("extrapolate", 2.0), ("calibrate_bias", True)):
        with pytest.raises(ValueError, match="ingredients"):
            LayerwiseEPMQ(**{option: value})
    assert LayerwiseEPMQ(normalize=False, interp=1.0, extrapolate=1.0, calibrate_bias=False).folds == 2


# -- engine level (the tiny CLIP zoo) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(zoo):
    return ExpertPool(zoo["root"] / "base", zoo["paths"])


@pytest.fixture(scope="module")
def data():
    return calibration_set((5, 4))  # interleaved: batches mix tasks


@pytest.fixture(scope="module")
def sorted_data():
    """6 mnist samples then 3 svhn ones, batches of 3: one task per batch, each task's batches together.
    The svhn images are a faint common pattern plus a little noise, so its features differ in size."""
    g = torch.Generator().manual_seed(7)
    pattern = torch.randn(1, 16, 16, generator=g)
    pixel_values = torch.cat([torch.randn(6, 1, 16, 16, generator=g),
                              3 * pattern + 0.3 * torch.randn(3, 1, 16, 16, generator=g)])
    return CalibrationSet(pixel_values, torch.tensor([0] * 6 + [1] * 3))


def fit(state: dict, solver, data: CalibrationSet, pool=None, task_names=TASKS, **kwargs) -> BlockwiseCalibration:
    module = BlockwiseCalibration(load_state(state), ADAPTER, solver, task_names, targets=pool, **kwargs)
    trainer_for(module, max_epochs=module.remaining_steps).fit(module, datamodule=CalibrationData(data))
    return module


def linears(module: BlockwiseCalibration, block: int) -> dict:
    return {name: module.model.encoder.layers[block].get_submodule(name) for name in LAYERS}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def block0_inputs(state: dict, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """layer -> (samples, tokens, in) float64 inputs of block 0's linears in the model holding `state`."""
    model = load_state(state)
    seen = {}
    layer = model.encoder.layers[0]
    def keep(name):
        return lambda linear, args, output: seen.__setitem__(name, args[0].double())

    handles = [layer.get_submodule(n).register_forward_hook(keep(n)) for n in LAYERS]
    with torch.no_grad():
        layer(model.pre_layrnorm(model.embeddings(pixel_values)), None)
    for h in handles:
        h.remove()
    return seen


def token_weights(tasks: torch.Tensor, task_weights=(1.0, 1.0)) -> torch.Tensor:
    """(samples,) w_t / n_t of each sample's tokens, n_t the task's token count (the engine's weights)."""
    n_t = torch.bincount(tasks, minlength=len(TASKS)).double() * TOKENS
    return (torch.tensor(task_weights, dtype=torch.float64) / n_t)[tasks]


def test_default_ingredients_set_explicitly_change_nothing(zoo, pool, data):
    default = fit(zoo["merged"], EPMQ(strength=1.0, **SPEC_ARGS), data, pool)
    explicit = fit(zoo["merged"], EPMQ(strength=1.0, normalize=False, interp=1, extrapolate=1.0,
                                       calibrate_bias=False, **SPEC_ARGS), data, pool)
    assert len(default.quant_results) == 12
    for key, record in default.quant_results.items():
        assert torch.equal(explicit.quant_results[key].weight(), record.weight()), key
        assert record.bias is None and explicit.quant_results[key].bias is None
    assert explicit.layer_metrics == default.layer_metrics


def test_normalize_with_one_task_is_a_scale_the_relaxed_target_ignores(zoo, pool, sorted_data):
    """One task: its statistics all enter divided by ‖H‖_F; W* (and the calibrated bias) are invariant
    to scaling H, C and the moments together, so normalize changes only float rounding."""
    one = CalibrationSet(sorted_data.pixel_values[:6], sorted_data.tasks[:6])
    runs = [fit(zoo["merged"], RelaxedEPMQ(strength=0.3, normalize=flag, calibrate_bias=True, **SPEC_ARGS), one,
                pool, task_names=TASKS[:1]) for flag in (False, True)]
    merged = load_state(zoo["merged"])
    for block in (0, 1):
        plain, normalized = linears(runs[0], block), linears(runs[1], block)
        for name in LAYERS:
            torch.testing.assert_close(normalized[name].weight, plain[name].weight, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(normalized[name].bias, plain[name].bias, rtol=1e-4, atol=1e-5)
            original = merged.encoder.layers[block].get_submodule(name)
            assert relative(plain[name].weight, original.weight) > 1e-3, (block, name)  # W* is not W_m


def test_normalize_weighs_each_task_by_the_norm_of_its_gram(zoo, pool, sorted_data):
    """Two tasks: normalize=true equals, at the layers reading block 0's first input (q, k, v: one H),
    the plain calibration with task weights 1 / ‖H̄_t‖_F of that input (H̄_t = Σ_t XᵀX / n_t)."""
    X = block0_inputs(zoo["merged"], sorted_data.pixel_values)["self_attn.q_proj"]  # samples, tokens, in
    w = token_weights(sorted_data.tasks)
    norms = [torch.linalg.matrix_norm(torch.einsum("s,sti,stj->ij", w[sel], X[sel], X[sel])).item()
             for sel in (sorted_data.tasks == t for t in range(len(TASKS)))]
    assert max(norms) > 1.2 * min(norms), norms  # the tasks' features differ in size: weighing matters

    solver = lambda normalize: RelaxedEPMQ(strength=0.0, normalize=normalize, **SPEC_ARGS)  # noqa: E731
    normalized = fit(zoo["merged"], solver(True), sorted_data, pool)
    reweighted = fit(zoo["merged"], solver(False), sorted_data, pool, task_weights=[1 / n for n in norms])
    plain = fit(zoo["merged"], solver(False), sorted_data, pool)
    for name in QKV:
        W = linears(normalized, 0)[name].weight
        same, other = linears(reweighted, 0)[name].weight, linears(plain, 0)[name].weight
        assert relative(W, same) < 1e-5, name
        assert relative(W, other) > 100 * relative(W, same), name


def test_normalize_refuses_batches_that_mix_tasks_or_tasks_that_come_back(zoo, pool, data, sorted_data):
    with pytest.raises(ValueError, match="one task"):
        fit(zoo["merged"], EPMQ(strength=1.0, normalize=True, **SPEC_ARGS), data, pool)
    order = torch.tensor([0, 1, 2, 6, 7, 8, 3, 4, 5])  # mnist, svhn, mnist again
    back = CalibrationSet(sorted_data.pixel_values[order], sorted_data.tasks[order])
    with pytest.raises(ValueError, match="'mnist' comes back at calibration batch 2"):
        fit(zoo["merged"], EPMQ(strength=1.0, normalize=True, **SPEC_ARGS), back, pool)
    fit(zoo["merged"], EPMQ(strength=1.0, normalize=False, **SPEC_ARGS), back, pool)  # without normalize: fine


def test_interp_mixes_the_targets_linearly_and_at_0_they_are_the_experts_layers_on_merged_inputs(zoo, pool, data):
    """Block 0 at λ = 0 (RelaxedEPMQ): interp = 0 gives the W* of targets X̂W_tᵀ + b_t (each sample's
    expert layer on the merged inputs X̂, computed here from hooks); W* is linear in the targets, so
    interp = 0.5 is the midpoint of interp = 0 and interp = 1, which differ."""
    runs = {alpha: fit(zoo["merged"], RelaxedEPMQ(strength=0.0, interp=alpha, **SPEC_ARGS), data, pool)
            for alpha in (0.0, 0.5, 1.0)}
    X = block0_inputs(zoo["merged"], data.pixel_values)
    w = token_weights(data.tasks)
    merged = load_state(zoo["merged"]).encoder.layers[0]
    experts = {task: expert.encoder.layers[0] for task, expert in zoo["experts"].items()}
    for name in LAYERS:
        W_m, b_m = merged.get_submodule(name).weight.double(), merged.get_submodule(name).bias.double()
        H, R = 0, 0
        for t, task in enumerate(TASKS):
            sel = data.tasks == t
            expert = experts[task].get_submodule(name)
            Xt = X[name][sel]                                                   # samples, tokens, in
            residual = Xt @ (expert.weight.double() - W_m).T + (expert.bias.double() - b_m)  # Ỹ − X̂W_mᵀ − b_m
            H = H + torch.einsum("s,sti,stj->ij", w[sel], Xt, Xt)
            R = R + torch.einsum("s,sto,sti->oi", w[sel], residual, Xt)
        expected = relaxed_target(H, R, W_m, 0.0, percdamp=SPEC.percdamp, residual=True)
        got = {alpha: linears(run, 0)[name].weight.double() for alpha, run in runs.items()}
        assert relative(got[0.0] - W_m, expected - W_m) < 1e-3, name
        midpoint = (got[0.0] + got[1.0]) / 2
        assert relative(got[0.5] - W_m, midpoint - W_m) < 1e-3, name
        assert relative(got[0.0] - W_m, got[1.0] - W_m) > 0.05, name


def test_interp_0_with_experts_equal_to_the_merged_model_keeps_every_layer(zoo, data, tmp_path):
    """Experts = the merged model: at interp = 0 the targets are the merged layers' own outputs on X̂,
    so W* = W_m in every block; at interp = 1 block 1's targets come from the full-precision path, which
    the rounded block 0 has left, and W* moves there."""
    merged = load_state(zoo["merged"])
    for task in TASKS:
        merged.save_pretrained(tmp_path / task)
    same = ExpertPool(tmp_path / TASKS[0], {t: tmp_path / t for t in TASKS})
    shift = {}
    for alpha in (0.0, 1.0):
        module = fit(zoo["merged"], EPMQ(strength=0.0, interp=alpha, **SPEC_ARGS), data, same)
        shift[alpha] = {key: m["anchor_shift"] for key, m in module.layer_metrics.items()}
    assert len(shift[0.0]) == 12 and max(shift[0.0].values()) < 1e-4, shift[0.0]
    block1 = [k for k in shift[1.0] if k.startswith("encoder.layers.1.")]
    assert max(shift[1.0][k] for k in block1) > 100 * max(shift[0.0][k] for k in block1)


def test_calibrated_bias_at_inf_removes_the_rounding_mean_error_of_block_0(zoo, data):
    """λ = inf: the weights are GPTQ's (block 0 bit for bit, its inputs are the same) and each bias is
    b_m − (Q − W_m) x̄, x̄ the task-weighted mean input from hooks on the merged model."""
    biased = fit(zoo["merged"], EPMQ(strength="inf", calibrate_bias=True, **SPEC_ARGS), data)
    plain = fit(zoo["merged"], EPMQ(strength="inf", **SPEC_ARGS), data)
    X = block0_inputs(zoo["merged"], data.pixel_values)
    w = token_weights(data.tasks)
    merged = load_state(zoo["merged"]).encoder.layers[0]
    for name in LAYERS:
        key = f"encoder.layers.0.{name}"
        Q = biased.quant_results[key].weight()
        assert torch.equal(Q, plain.quant_results[key].weight()), name
        x_bar = torch.einsum("s,sti->i", w, X[name]) / (w.sum() * TOKENS)
        original = merged.get_submodule(name)
        expected = original.bias.double() - (Q.double() - original.weight.double()) @ x_bar
        torch.testing.assert_close(linears(biased, 0)[name].bias.double(), expected, rtol=1e-5, atol=1e-6)
        assert (linears(biased, 0)[name].bias - original.bias).abs().max() > 1e-5, name
        assert torch.equal(linears(plain, 0)[name].bias, original.bias), name


def test_calibrated_biases_are_kept_in_the_step_files_and_resumed(zoo, pool, data, tmp_path):
    solver = lambda: EPMQ(strength=1.0, calibrate_bias=True, **SPEC_ARGS)  # noqa: E731
    whole = fit(zoo["merged"], solver(), data, pool)
    merged = load_state(zoo["merged"])
    for key, record in whole.quant_results.items():
        linear = whole.model.get_submodule(key)
        assert record.bias is not None and torch.equal(record.bias, linear.bias.detach()), key
        assert not torch.equal(linear.bias, merged.get_submodule(key).bias), key
        assert torch.equal(record.weight(), linear.weight.detach()), key

    store = StepStore(tmp_path / "steps", {"run": "bias"})
    for step in whole.finished:
        store.save(step)
    loaded = StepStore(tmp_path / "steps", {"run": "bias"}).load()
    for key, record in whole.quant_results.items():
        again = next(s for s in loaded if key in s.results).results[key]
        assert again.bias is not None and torch.equal(again.bias, record.bias), key

    # a fresh merged model takes the saved weights and biases ...
    applied = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver(), TASKS, targets=pool)
    applied.apply_finished(loaded)
    # ... and a run resumed after block 0 calibrates block 1 through the calibrated block 0 as the whole run did
    resumed = fit(zoo["merged"], solver(), data, pool, resume=loaded[:1])
    for key in whole.quant_results:
        linear = whole.model.get_submodule(key)
        for module in (applied, resumed):
            assert torch.equal(module.model.get_submodule(key).weight, linear.weight), key
            assert torch.equal(module.model.get_submodule(key).bias, linear.bias), key


def test_extrapolated_relaxed_anchor_at_inf_is_the_scaled_task_vector_in_every_layer(zoo, pool, data):
    """RelaxedEPMQ at λ = inf writes the anchor itself: W_0 + ρ (W_m − W_0) read from the pool's base,
    and with calibrate_bias the bias b_0 + ρ (b_m − b_0) (Q = W_a: no mean error to remove)."""
    rho = 1.5
    module = fit(zoo["merged"], RelaxedEPMQ(strength="inf", extrapolate=rho, calibrate_bias=True, **SPEC_ARGS),
                 data, pool)
    merged = load_state(zoo["merged"])
    for block in (0, 1):
        for name, linear in linears(module, block).items():
            key = f"encoder.layers.{block}.{name}"
            m, b = merged.get_submodule(key), zoo["base"].get_submodule(key)
            torch.testing.assert_close(linear.weight, b.weight + rho * (m.weight - b.weight), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(linear.bias, b.bias + rho * (m.bias - b.bias), rtol=1e-6, atol=1e-7)
            assert relative(linear.weight, m.weight) > 1e-3, key


# -- calibrate_norms (epmq.core.norm_affine) on the tiny CLIP zoo ---------------------------------------------

NORMS = ("layer_norm1", "layer_norm2")


def norm_params(module_or_model, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """norm name -> (γ, β) of block `block` (a BlockwiseCalibration's model or a CLIP model)."""
    model = getattr(module_or_model, "model", module_or_model)
    layer = model.encoder.layers[block]
    return {name: (layer.get_submodule(name).weight.detach(), layer.get_submodule(name).bias.detach())
            for name in NORMS}


def block0_norm_rows(model, pixel_values: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """norm -> (input, output), each (samples, tokens, 32), of block 0's LayerNorms in `model` (float32)."""
    seen = {}
    layer = model.encoder.layers[0]
    handles = [layer.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0].detach(), out.detach()))) for n in NORMS]
    with torch.no_grad():
        layer(model.pre_layrnorm(model.embeddings(pixel_values)), None)
    for h in handles:
        h.remove()
    return seen


def test_calibrated_norms_of_block_0_are_the_anchored_fit_to_each_samples_expert_norm(zoo, pool, data):
    """Block 0, λ = 1: each LayerNorm's (γ, β) is solve_norm_affine of its merged inputs (hooks on the merged
    model: block 0 reads the merged model's own inputs, and its norms come before any rounding there) and of
    each sample's own expert's norm output on the expert's path, tokens weighted w_t / n_t."""
    from epmq.core.norm_affine import NormStatistics, solve_norm_affine

    module = fit(zoo["merged"], EPMQ(strength=1.0, calibrate_norms=True, **SPEC_ARGS), data, pool)
    merged = load_state(zoo["merged"])
    rows = block0_norm_rows(merged, data.pixel_values)
    targets = {n: torch.empty_like(rows[n][1]) for n in NORMS}
    for t, task in enumerate(TASKS):
        sel = data.tasks == t
        own = block0_norm_rows(zoo["experts"][task], data.pixel_values[sel])
        for n in NORMS:
            targets[n][sel] = own[n][1]
    w = token_weights(data.tasks)
    for n in NORMS:
        norm = merged.encoder.layers[0].get_submodule(n)
        stats = NormStatistics(32, norm.eps)
        stats.add(rows[n][0], targets[n], w)
        gamma, beta = solve_norm_affine(stats, norm.weight.detach(), norm.bias.detach(), 1.0, "output",
                                        percdamp=SPEC.percdamp)
        got = norm_params(module, 0)[n]
        torch.testing.assert_close(got[0], gamma, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], beta, rtol=1e-4, atol=1e-5)
        assert (got[0] - norm.weight).abs().max() > 1e-3 and (got[1] - norm.bias).abs().max() > 1e-3, n


def test_calibrated_norms_are_recorded_kept_in_the_step_files_and_resumed(zoo, pool, data, tmp_path):
    solver = lambda: EPMQ(strength=1.0, calibrate_norms=True, **SPEC_ARGS)  # noqa: E731
    whole = fit(zoo["merged"], solver(), data, pool)
    merged = load_state(zoo["merged"])
    assert len(whole.finished) == 2  # one step per block: each calibrates its block's norms
    for block, step in enumerate(whole.finished):
        assert set(step.norms) == {f"encoder.layers.{block}.{n}" for n in NORMS}
        for n, (gamma, beta) in norm_params(whole, block).items():
            record = step.norms[f"encoder.layers.{block}.{n}"]
            assert torch.equal(record["weight"], gamma) and torch.equal(record["bias"], beta), (block, n)
            original = norm_params(merged, block)[n]
            assert not torch.equal(gamma, original[0]) and not torch.equal(beta, original[1]), (block, n)

    store = StepStore(tmp_path / "steps", {"run": "norms"})
    for step in whole.finished:
        store.save(step)
    loaded = StepStore(tmp_path / "steps", {"run": "norms"}).load()
    for step, again in zip(whole.finished, loaded):
        assert set(again.norms) == set(step.norms)
        for key, params in step.norms.items():
            for p in ("weight", "bias"):
                assert torch.equal(again.norms[key][p], params[p]), (key, p)

    # a fresh merged model takes the saved norms (and weights) ...
    applied = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, solver(), TASKS, targets=pool)
    applied.apply_finished(loaded)
    # ... and a run resumed after block 0 calibrates block 1 through the calibrated block 0 as the whole run did
    resumed = fit(zoo["merged"], solver(), data, pool, resume=loaded[:1])
    for module in (applied, resumed):
        for key, value in whole.model.state_dict().items():
            assert torch.equal(module.model.state_dict()[key], value), key
    for key, params in whole.finished[1].norms.items():
        for p in ("weight", "bias"):
            assert torch.equal(resumed.finished[1].norms[key][p], params[p]), (key, p)


def test_calibrated_norms_stay_merged_with_merged_experts_and_at_inf(zoo, data, tmp_path):
    """Experts = the merged model: block 0's targets are the merged norms' own outputs on the same inputs, so
    the fit is the anchor. λ = inf needs no targets: the norms are not touched (nor recorded)."""
    merged = load_state(zoo["merged"])
    for task in TASKS:
        merged.save_pretrained(tmp_path / task)
    same = ExpertPool(tmp_path / TASKS[0], {t: tmp_path / t for t in TASKS})
    module = fit(zoo["merged"], EPMQ(strength=1.0, calibrate_norms=True, **SPEC_ARGS), data, same)
    assert set(module.finished[0].norms) == {f"encoder.layers.0.{n}" for n in NORMS}
    for n, (gamma, beta) in norm_params(module, 0).items():
        torch.testing.assert_close(gamma, norm_params(merged, 0)[n][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(beta, norm_params(merged, 0)[n][1], rtol=1e-4, atol=1e-5)

    at_inf = fit(zoo["merged"], EPMQ(strength="inf", calibrate_norms=True, **SPEC_ARGS), data)
    for block in (0, 1):
        recorded = at_inf.finished[block].norms  # the anchor (here the merged norms), recorded for resume
        assert set(recorded) == {f"encoder.layers.{block}.{n}" for n in NORMS}
        for n, (gamma, beta) in norm_params(at_inf, block).items():
            assert torch.equal(recorded[f"encoder.layers.{block}.{n}"]["weight"], gamma), (block, n)
            assert torch.equal(gamma, norm_params(merged, block)[n][0]), (block, n)
            assert torch.equal(beta, norm_params(merged, block)[n][1]), (block, n)


def test_kept_expert_targets_are_recorded_again_when_the_norms_join_them(zoo, data, monkeypatch):
    """A kept-target cache first filled by a fit without calibrate_norms has no norm targets: a fit with it
    records anew (the layout names the targets) and gives a fresh cache's norms; a third fit replays them."""
    from epmq.engine.targets import ExpertTargets

    def norms_fit(cache, calibrate_norms=True):
        module = BlockwiseCalibration(load_state(zoo["merged"]), ADAPTER, EPMQ(strength=1.0, calibrate_norms=calibrate_norms, **SPEC_ARGS), TASKS,
                                      targets=cache)
        trainer_for(module).fit(module, datamodule=CalibrationData(data))
        return module

    pool = ExpertPool(zoo["root"] / "base", zoo["paths"])
    reference = norms_fit(ExpertTargets(pool))
    cache = ExpertTargets(pool, keep=True)
    plain = norms_fit(cache, calibrate_norms=False)
    assert all(set(batches[0]) == set(LAYERS) for batches in cache.recorded.values())
    second = norms_fit(cache)
    assert all(set(batches[0]) == set(LAYERS + NORMS) for batches in cache.recorded.values())
    calls = []
    monkeypatch.setattr(pool, "expert_subset", lambda *a, **k: calls.append(a) or {})
    third = norms_fit(cache)  # replayed: the pool is never read
    assert calls == []
    for module in (second, third):
        for block in (0, 1):
            for n, (gamma, beta) in norm_params(reference, block).items():
                assert torch.equal(norm_params(module, block)[n][0], gamma), (block, n)
                assert torch.equal(norm_params(module, block)[n][1], beta), (block, n)
        for key, value in reference.model.state_dict().items():
            assert torch.equal(module.model.state_dict()[key], value), key
    assert not torch.equal(norm_params(plain, 0)["layer_norm1"][0], norm_params(reference, 0)["layer_norm1"][0])


def test_true_sequential_calibrates_the_norms_once_on_each_blocks_first_step(zoo, pool, data):
    """Four steps per block: the norms are fitted (and recorded) on the block's first step only, there from the
    same merged inputs and expert targets as a one-step block, so block 0's norms are the same."""
    solver = lambda: EPMQ(strength=1.0, calibrate_norms=True, **SPEC_ARGS)  # noqa: E731
    sequential = fit(zoo["merged"], solver(), data, pool, true_sequential=True)
    whole = fit(zoo["merged"], solver(), data, pool)
    assert [bool(step.norms) for step in sequential.finished] == [True, False, False, False] * 2
    for n, (gamma, beta) in norm_params(whole, 0).items():
        torch.testing.assert_close(norm_params(sequential, 0)[n][0], gamma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm_params(sequential, 0)[n][1], beta, rtol=1e-5, atol=1e-6)
    for key, params in sequential.finished[4].norms.items():
        assert torch.equal(params["weight"], sequential.model.get_submodule(key).weight), key


def test_calibrated_norms_anchor_at_the_extrapolated_norms_read_from_the_base(zoo, pool, data):
    """extrapolate ρ: the anchor is γ_0 + ρ (γ_m − γ_0) with the pool's base norm; a very large λ gives it."""
    rho = 1.5
    module = fit(zoo["merged"], EPMQ(strength=1e8, extrapolate=rho, calibrate_norms=True, **SPEC_ARGS), data, pool)
    merged = load_state(zoo["merged"])
    for block in (0, 1):
        for n, (gamma, beta) in norm_params(module, block).items():
            (g_m, b_m), (g_0, b_0) = norm_params(merged, block)[n], norm_params(zoo["base"], block)[n]
            torch.testing.assert_close(gamma, g_0 + rho * (g_m - g_0), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(beta, b_0 + rho * (b_m - b_0), rtol=1e-5, atol=1e-6)
            assert (gamma - g_m).abs().max() > 1e-3, (block, n)
