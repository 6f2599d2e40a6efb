"""One step's solve: each layer's statistics to its quantized weight, written into the block (and the block's
calibrated LayerNorms), as the solver's Requirements say."""

from __future__ import annotations

import torch
from torch import nn

from epmq.core.solvers import module_solver
from epmq.engine.accumulate import StepStatistics
from epmq.engine.schedule import Step
from epmq.engine.targets import ExpertTargets
from epmq.io.quantized_layer import QuantizedLayer


def solve_layers(step: Step, block: nn.Module, solver, statistics: StepStatistics | None,
                 targets: ExpertTargets | None) -> tuple[dict, dict]:
    """Solve the step's layers with `solver` (each at its per-module options: module_solver) from `statistics`
    (None: a solver that needs none) and write Q (and a calibrated bias) into the block. Returns (full layer
    name -> QuantizedLayer, full layer name -> metrics); a solver whose requirements keep no codes (the FP
    target) gives no QuantizedLayer."""
    needs = solver.requirements
    sums = statistics.sums if statistics is not None else {}
    results, metrics = {}, {}
    for name in step.layers:
        linear = block.get_submodule(name)
        layer_solver = module_solver(solver, step.prefix + name)  # the schedule holds no layer left in float
        context = {}
        if needs.bias and linear.bias is not None:
            context["bias"] = linear.bias.detach()
        if needs.base:  # the calibration made sure there is a provider
            context["base"] = targets.layer("base", step.prefix + name, linear.weight.device)
        solution = layer_solver.solve(linear.weight.detach(), sums.get(name), **context)
        linear.weight.copy_(solution.result.weight.to(linear.weight.dtype))
        if solution.bias is not None:
            linear.bias.copy_(solution.bias.to(linear.bias))
        if needs.codes:
            results[step.prefix + name] = QuantizedLayer.from_result(solution.result, layer_solver.spec.bits,
                                                                     bias=solution.bias)
        metrics[step.prefix + name] = solution.metrics
    return results, metrics


def solve_norms(step: Step, block: nn.Module, solver, statistics: StepStatistics | None,
                targets: ExpertTargets | None) -> dict[str, dict[str, torch.Tensor]]:
    """The block's calibrated LayerNorms' new (γ, β), each (features,), from their statistics, written into the
    block (anchored at the merged ones, or the extrapolated anchor); full name -> {"weight": γ, "bias": β}."""
    norms = {}
    for name, stats in (statistics.norms if statistics is not None else {}).items():
        norm = block.get_submodule(name)
        base = targets.layer("base", step.prefix + name, norm.weight.device) if solver.requirements.base else None
        gamma, beta = solver.norm_affine(stats, norm.weight.detach(), norm.bias.detach(), base)
        norm.weight.copy_(gamma.to(norm.weight))
        norm.bias.copy_(beta.to(norm.bias))
        norms[step.prefix + name] = {"weight": gamma.cpu(), "bias": beta.cpu()}
    return norms
