"""The anchor strength chosen per layer in one pass (LayerwiseEPMQ, `anchor.select=layer`).

On synthetic layers whose expert targets differ systematically from the merged layer's outputs,
with independent test tokens as the oracle: plentiful, clean data makes the choice beat GPTQ of the
merged weights (λ = inf) on the test tokens; scarce, noisy data makes it anchor at least as hard.
The run-level wiring is checked on the micro suite.
"""

from __future__ import annotations

import math

import pytest
import torch

from epmq.core.anchor_choice import LayerwiseEPMQ
from epmq.core.stats import FoldedStatistics, LayerStatistics
from epmq.jobs.run import run
from epmq.jobs.steps import solvers

from helpers.config import make_cfg

IN, OUT = 24, 8
SPEC = dict(bits=3, group_size=-1)


def layer(seed: int):
    """(W_m, W_e, input mixing): the merged weights, the experts' effective weights, correlated inputs."""
    gen = torch.Generator().manual_seed(seed)
    W_m = torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    W_e = W_m + 0.3 * torch.randn(OUT, IN, generator=gen, dtype=torch.float64)
    mix = torch.randn(IN, IN, generator=gen, dtype=torch.float64) / IN**0.5 + torch.eye(IN, dtype=torch.float64)
    return W_m, W_e, mix


def tokens(n: int, W_e, mix, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, IN, generator=gen, dtype=torch.float64) @ mix
    return X, X @ W_e.T + noise * torch.randn(n, OUT, generator=gen, dtype=torch.float64)


def folded(X, Y, W_m, folds=2) -> FoldedStatistics:
    stats = FoldedStatistics(IN, OUT, residual=True, folds=folds)
    stats.add(X[:, None].float(), (Y - X @ W_m.T)[:, None].float(), weight=1.0 / len(X),
              folds=torch.arange(len(X)) % folds)
    return stats


def test_folds_sum_to_the_unfolded_statistics():
    W_m, W_e, mix = layer(0)
    X, Y = tokens(50, W_e, mix, 0.1, 1)
    stats = folded(X, Y, W_m, folds=3)
    whole = LayerStatistics(IN, OUT, residual=True)
    whole.add(X[:, None].float(), (Y - X @ W_m.T)[:, None].float(), weight=1.0 / len(X))
    # float32 batch products over other row sets: equal up to their rounding
    torch.testing.assert_close(stats.H, whole.H, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.C, whole.C, rtol=1e-6, atol=1e-6)
    assert [f.tokens for f in stats.folds] == [17, 17, 16] and stats.tokens == 50


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_choice_beats_gptq_on_test_tokens_and_anchors_harder_on_scarce_data(seed):
    W_m, W_e, mix = layer(seed)
    X_test, Y_test = tokens(4000, W_e, mix, 0.0, 100 + seed)
    solver = LayerwiseEPMQ(candidates=[0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, "inf"], **SPEC)

    def test_error(Q):
        return ((X_test @ Q.double().T - Y_test) ** 2).sum(1).mean().item()

    plenty = solver.solve(W_m.float(), folded(*tokens(3000, W_e, mix, 0.05, seed), W_m))
    scarce = solver.solve(W_m.float(), folded(*tokens(16, W_e, mix, 3.0, seed), W_m))
    gptq = LayerwiseEPMQ(candidates=["inf"], **SPEC).solve(W_m.float(), folded(*tokens(3000, W_e, mix, 0.05, seed), W_m))
    assert gptq.metrics["anchor_strength"] == math.inf
    assert test_error(plenty.result.weight) < 0.8 * test_error(gptq.result.weight)
    assert scarce.metrics["anchor_strength"] > plenty.metrics["anchor_strength"]


def test_experts_equal_to_the_merged_layer_keep_the_strongest_anchor():
    W_m, _, mix = layer(3)
    X, Y = tokens(200, W_m, mix, 0.0, 4)
    chosen = LayerwiseEPMQ(candidates=[0.0, 1.0, "inf"], **SPEC).solve(W_m.float(), folded(X, Y, W_m))
    # the residual targets are float32 rounding only: every candidate rounds the same W_m, a tie
    assert chosen.metrics["anchor_strength"] == math.inf


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        LayerwiseEPMQ(folds=1)
    with pytest.raises(ValueError, match="strength must be"):
        LayerwiseEPMQ(candidates=[-1.0])
    with pytest.raises(ValueError, match="FoldedStatistics"):
        LayerwiseEPMQ(**SPEC).solve(torch.randn(OUT, IN), _plain())


def _plain():
    stats = LayerStatistics(IN, OUT, residual=True)
    stats.add(torch.randn(10, IN), torch.randn(10, OUT))
    return stats


def test_select_layer_runs_one_calibration_and_reports_each_layers_strength(tmp_path, zoo_cache, capsys):
    cfg = make_cfg(tmp_path, zoo_cache, "anchor.select=layer", "quant.form=output",
                   "anchor.candidates.strength=[0.0,1.0,.inf]", "evaluate_references=false", "save_model=false")
    assert [type(s).__name__ for s in solvers(cfg.quant, cfg.anchor)] == ["LayerwiseEPMQ"]
    report = run(cfg)
    assert report["selection"] == [] and report["quant"]["select"] == "layer"
    strengths = report["quant"]["layer_strengths"]
    assert len(strengths) >= 12 and set(strengths.values()) <= {0.0, 1.0, math.inf}
    assert "strength chosen per layer by 2-fold cross-validation" in capsys.readouterr().out
    with pytest.raises(ValueError, match="anchor.select=layer chooses the strength only"):
        bad = make_cfg(tmp_path / "bad", zoo_cache, "anchor.select=layer")
        solvers(bad.quant, bad.anchor)
