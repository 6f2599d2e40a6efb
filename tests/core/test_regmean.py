"""RegMean: closed-form properties on random data, Gram collection by hooks, and a tiny CLIP merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from epmq.core.merge import simple_average
from epmq.core.regmean import RegMeanSums, gram_matrices, reduce_non_diagonal, regmean

OUT, IN = 5, 7
KEY = "layer.weight"


def inputs(n: int, seed: int) -> torch.Tensor:
    """n tokens (n x IN, float64) with correlated features, so off-diagonal Gram entries matter."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=gen, dtype=torch.float64)
    return torch.randn(n, IN, generator=gen, dtype=torch.float64) @ mix + 0.5


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def weights(T: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(OUT, IN, generator=gen, dtype=torch.float64) for _ in range(T)]


def pool(Ws, Gs, extra=None):
    """base/experts/grams for one linear weight (plus optional extra entries per expert)."""
    tasks = [f"task{t}" for t in range(len(Ws))]
    experts = {t: {KEY: W, **(extra[i] if extra else {})} for i, (t, W) in enumerate(zip(tasks, Ws))}
    base = {k: torch.zeros_like(v) for k, v in experts[tasks[0]].items()}
    grams = {t: {KEY: G} for t, G in zip(tasks, Gs)}
    return base, experts, grams


def objective(W, Ws, Gs, alpha):
    """Σ_t tr((W − W_t) G̃_t (W − W_t)ᵀ), the quadratic RegMean minimises."""
    return sum(torch.trace((W - W_t) @ reduce_non_diagonal(G, alpha) @ (W - W_t).T) for W_t, G in zip(Ws, Gs))


# ---------------------------------------------------------------- closed form

def test_reduce_non_diagonal_keeps_diagonal_and_scales_the_rest():
    G = gram(inputs(50, 0))
    off = ~torch.eye(IN, dtype=torch.bool)
    for alpha in (0.0, 0.6, 1.0):
        G_tilde = reduce_non_diagonal(G, alpha)
        assert torch.equal(G_tilde.diagonal(), G.diagonal())
        torch.testing.assert_close(G_tilde[off], alpha * G[off])
    assert torch.count_nonzero(G[off]) == off.sum()  # the check above could fail


def test_one_expert_gives_its_own_weights():
    (W,) = weights(1)
    merged = regmean(*pool([W], [gram(inputs(40, 1))]), alpha=0.6)
    torch.testing.assert_close(merged[KEY], W, rtol=0, atol=1e-10)


def test_equal_grams_give_the_plain_mean():
    Ws = weights(3)
    G = gram(inputs(40, 2))
    merged = regmean(*pool(Ws, [G, G.clone(), G.clone()]), alpha=0.6)
    torch.testing.assert_close(merged[KEY], torch.stack(Ws).mean(0), rtol=0, atol=1e-10)


def test_alpha_one_solves_the_stacked_least_squares_problem():
    """Each task has fewer tokens than inputs (singular G_t), together they determine W."""
    Ws = weights(3)
    Xs = [inputs(n, 10 + t) for t, n in enumerate((4, 5, 6))]
    assert all(torch.linalg.matrix_rank(gram(X)) < IN for X in Xs)
    merged = regmean(*pool(Ws, [gram(X) for X in Xs]), alpha=1.0)[KEY]

    # min_W Σ_t (1/N_t) ||X_t Wᵀ − X_t W_tᵀ||²: rows of task t scaled by 1/sqrt(N_t)
    A = torch.cat([X / X.shape[0] ** 0.5 for X in Xs])                  # ΣN x IN
    Y = torch.cat([X @ W.T / X.shape[0] ** 0.5 for X, W in zip(Xs, Ws)])  # ΣN x OUT
    expected = torch.linalg.lstsq(A, Y).solution.T
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-8)
    simple = torch.stack(Ws).mean(0)
    assert not torch.allclose(merged, simple, atol=1e-3)  # the regression is not the mean here


def test_alpha_zero_weights_each_column_by_its_diagonal():
    Ws = weights(3)
    Gs = [gram(inputs(30, 20 + t) * (t + 1)) for t in range(3)]  # different scales per task
    merged = regmean(*pool(Ws, Gs), alpha=0.0)[KEY]
    d = torch.stack([G.diagonal() for G in Gs])                   # T x IN
    expected = (torch.stack(Ws) * d[:, None, :]).sum(0) / d.sum(0)  # OUT x IN
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_merged_weight_minimises_the_shrunk_objective(alpha):
    Ws = weights(3, seed=5)
    Gs = [gram(inputs(30, 30 + t)) for t in range(3)]
    W = regmean(*pool(Ws, Gs), alpha=alpha)[KEY]
    best = objective(W, Ws, Gs, alpha)
    assert best < objective(torch.stack(Ws).mean(0), Ws, Gs, alpha)
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        nudge = 1e-3 * torch.randn(W.shape, generator=gen, dtype=W.dtype)
        assert objective(W + nudge, Ws, Gs, alpha) > best


def test_dead_input_column_is_ridged_toward_the_mean(caplog):
    Ws = weights(2)
    Xs = [inputs(30, 40 + t) for t in range(2)]
    for X in Xs:
        X[:, 3] = 0  # feature 3 never fires on any task
    Gs = [gram(X) for X in Xs]
    with caplog.at_level("WARNING", logger="epmq.core.regmean"):
        merged = regmean(*pool(Ws, Gs), alpha=1.0)[KEY]
    assert "singular" in caplog.text
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 3], torch.stack(Ws).mean(0)[:, 3])
    # the live columns solve the problem restricted to them
    live = [j for j in range(IN) if j != 3]
    reduced = regmean(*pool([W[:, live] for W in Ws], [G[live][:, live] for G in Gs]), alpha=1.0)[KEY]
    torch.testing.assert_close(merged[:, live], reduced, rtol=1e-5, atol=1e-6)


def test_other_keys_averaged_int_buffers_copied_and_dtypes_kept():
    Ws = [W.float() for W in weights(2)]
    gen = torch.Generator().manual_seed(7)
    extra = [{"layer.bias": torch.randn(OUT, generator=gen), "norm.weight": torch.randn(IN, generator=gen),
              "position_ids": torch.arange(IN)} for _ in range(2)]
    base, experts, grams = pool(Ws, [gram(inputs(30, 50 + t)) for t in range(2)], extra)
    base["position_ids"] = torch.arange(IN)
    merged = regmean(base, experts, grams)
    assert list(merged) == list(base)
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in base.items()}
    for key in ("layer.bias", "norm.weight"):
        torch.testing.assert_close(merged[key], (experts["task0"][key] + experts["task1"][key]) / 2)
    assert torch.equal(merged["position_ids"], base["position_ids"])
    assert merged["position_ids"] is not base["position_ids"]
    assert not torch.allclose(merged[KEY], simple_average(base, experts)[KEY], atol=1e-4)


# ---------------------------------------------------------------- errors

def good_pool():
    return pool(weights(2), [gram(inputs(30, 60 + t)) for t in range(2)])


def test_mismatched_task_sets_named():
    base, experts, grams = good_pool()
    grams["task9"] = grams.pop("task1")
    with pytest.raises(ValueError, match="task1.*task9"):
        regmean(base, experts, grams)


def test_missing_expert_key_named():
    base, experts, grams = good_pool()
    base["other.bias"] = torch.zeros(3)
    experts["task0"]["other.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"task1.*other\.bias"):
        regmean(base, experts, grams)


def test_wrong_expert_shape_named():
    base, experts, grams = good_pool()
    experts["task1"][KEY] = experts["task1"][KEY][:, :-1]
    with pytest.raises(ValueError, match=r"task1.*layer\.weight.*shape"):
        regmean(base, experts, grams)


def test_gram_key_sets_must_agree():
    base, experts, grams = good_pool()
    base["b.weight"] = torch.zeros(2, 3, dtype=torch.float64)
    for sd in experts.values():
        sd["b.weight"] = torch.zeros(2, 3, dtype=torch.float64)
    grams["task0"]["b.weight"] = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grams\['task1'\].*b\.weight"):
        regmean(base, experts, grams)


def test_wrong_gram_shape_named():
    base, experts, grams = good_pool()
    grams["task1"][KEY] = torch.eye(OUT, dtype=torch.float64)  # out x out instead of in x in
    with pytest.raises(ValueError, match=r"task1.*layer\.weight.*shape"):
        regmean(base, experts, grams)


def test_nan_gram_named():
    base, experts, grams = good_pool()
    grams["task0"][KEY][2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"task0.*layer\.weight.*non-finite"):
        regmean(base, experts, grams)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        regmean(*good_pool(), alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        reduce_non_diagonal(torch.eye(3), alpha)


# ---------------------------------------------------------------- Gram collection

class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(IN, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x, shift=0.0):
        return self.fc2(torch.relu(self.fc1(x + shift)))


def test_gram_matrices_match_hand_computation_and_remove_hooks():
    model = TwoLayers().train()
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(2, 3, IN, generator=gen), "shift": 0.5},
               {"x": torch.randn(4, 5, IN, generator=gen), "shift": 0.5}]
    layers = {"fc1.weight": model.fc1, "fc2.weight": model.fc2}
    G = gram_matrices(model, layers, batches)

    X1 = torch.cat([b["x"].reshape(-1, IN) + 0.5 for b in batches]).double()  # 26 tokens x IN
    with torch.no_grad():
        X2 = torch.relu(model.fc1(X1.float())).double()
    assert X1.shape[0] == 2 * 3 + 4 * 5
    assert G["fc1.weight"].dtype == torch.float64
    torch.testing.assert_close(G["fc1.weight"], X1.T @ X1 / X1.shape[0])
    torch.testing.assert_close(G["fc2.weight"], X2.T @ X2 / X2.shape[0], rtol=1e-5, atol=1e-6)
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
    assert model.training  # mode restored


def test_gram_matrices_on_sequential_and_errors_remove_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, 4), nn.Tanh(), nn.Linear(4, 2))
    X = torch.randn(9, IN)

    class Seq(nn.Module):  # model(**batch) needs a keyword
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input):
            return self.net(input)

    wrapped = Seq()
    G = gram_matrices(wrapped, {"net.0.weight": model[0]}, [{"input": X[:4]}, {"input": X[4:]}])
    torch.testing.assert_close(G["net.0.weight"], gram(X.double()))

    with pytest.raises(ValueError, match="layers is empty"):
        gram_matrices(wrapped, {}, [{"input": X}])
    with pytest.raises(ValueError, match="batch 1"):
        gram_matrices(wrapped, {"net.0.weight": model[0]}, [{"input": X}, {}])
    with pytest.raises(ValueError, match="batch 0.*input"):
        gram_matrices(wrapped, {"net.0.weight": model[0]}, [{"input": X[:0]}])
    with pytest.raises(ValueError, match="no token"):
        gram_matrices(wrapped, {"net.0.weight": model[0]}, [])
    with pytest.raises(TypeError):  # a forward error still removes the hooks
        gram_matrices(wrapped, {"net.0.weight": model[0]}, [{"wrong": X}])
    assert not model[0]._forward_hooks


class SharedInput(nn.Module):
    """Two layers read one tensor (as query and key projections do), a third its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(IN, 4), nn.Linear(IN, 4), nn.Linear(IN, IN)

    def forward(self, x):
        h = self.a(x) + self.b(x)
        return self.c(x + 1.0) + h.sum()


def test_layers_reading_one_tensor_share_one_gram_in_the_asked_dtype():
    model = SharedInput()
    X = inputs(12, seed=3).float()
    layers = {"a.weight": model.a, "b.weight": model.b, "c.weight": model.c}
    G = gram_matrices(model, layers, [{"x": X[:5]}, {"x": X[5:]}], dtype=torch.float32)
    assert G["a.weight"] is G["b.weight"] and G["c.weight"] is not G["a.weight"]
    assert G["a.weight"].dtype == torch.float32
    torch.testing.assert_close(G["a.weight"], gram(X.double()).float())
    torch.testing.assert_close(G["c.weight"], gram(X.double() + 1).float())


def test_sums_hold_one_gram_per_distinct_input_whatever_the_number_of_tasks():
    model = SharedInput()
    layers = {"a.weight": model.a, "b.weight": model.b, "c.weight": model.c}
    sizes = []
    for T in (1, 4):
        sums = RegMeanSums(alpha=0.5)
        for t in range(T):
            grams = gram_matrices(model, layers, [{"x": inputs(9, seed=t).float()}], dtype=torch.float32)
            sums.add(f"task{t}", {k: layer.weight + 0.1 * t for k, layer in layers.items()}, grams)
        sizes.append((len(sums.S), len(sums.B)))
        solved = dict(sums.solutions(mean_weight=lambda key: None))
        assert set(solved) == set(layers) and not sums.S and not sums.B  # each sum freed once solved
    assert sizes == [(2, 3), (2, 3)]


def test_float32_sums_solve_as_float64_sums_do():
    Ws, Gs = weights(6, seed=4), [gram(inputs(40, seed=10 + t)) for t in range(6)]
    solved = {}
    for dtype in (torch.float64, torch.float32):
        sums = RegMeanSums(alpha=0.8, dtype=dtype)
        for t, (W, G) in enumerate(zip(Ws, Gs)):
            sums.add(f"task{t}", {KEY: W.float()}, {KEY: G.float()})
        assert sums.S[KEY].dtype == sums.B[KEY].dtype == dtype
        solved[dtype] = dict(sums.solutions(mean_weight=lambda key: None))[KEY]
        assert solved[dtype].dtype == torch.float64  # the solve itself runs in float64
    error = (solved[torch.float32] - solved[torch.float64]).norm() / solved[torch.float64].norm()
    assert 0 < error < 1e-5


def test_sums_refuse_a_task_whose_grams_are_shared_differently():
    model = SharedInput()
    layers = {"a.weight": model.a, "b.weight": model.b, "c.weight": model.c}
    weights = {k: layer.weight for k, layer in layers.items()}
    grams = gram_matrices(model, layers, [{"x": inputs(9, seed=0).float()}])
    sums = RegMeanSums()
    sums.add("task0", weights, grams)
    with pytest.raises(ValueError, match=r"grams\['task1'\]\['b.weight'\] shares its Gram differently"):
        sums.add("task1", weights, {k: G.clone() for k, G in grams.items()})
    with pytest.raises(ValueError, match=r"grams\['task1'\] must have the same keys.*lacks \['c.weight'\]"):
        sums.add("task1", weights, {k: G for k, G in grams.items() if k != "c.weight"})
    with pytest.raises(ValueError, match="no task was added"):
        next(RegMeanSums().solutions(mean_weight=lambda key: None))


# ---------------------------------------------------------------- tiny CLIP end to end

LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def tiny_clip() -> CLIPVisionModel:
    config = CLIPVisionConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                              intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(0)
    return CLIPVisionModel(config).eval()


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{name}.weight": module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS}


def test_regmean_merges_a_tiny_clip_tower():
    base = tiny_clip()
    tasks = ["a", "b"]
    experts, grams = {}, {}
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(100 + i)
        expert = tiny_clip()
        expert.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                                for k, v in base.state_dict().items()})
        batches = [{"pixel_values": torch.randn(4, 1, 8, 8, generator=gen) + i} for _ in range(2)]
        layers = linear_layers(expert)
        grams[task] = gram_matrices(expert, layers, batches)
        experts[task] = expert.state_dict()
    assert len(layers) == 12 and set(layers) <= set(base.state_dict())

    merged = regmean(base.state_dict(), experts, grams, alpha=0.6)
    model = tiny_clip()
    model.load_state_dict(merged, strict=True)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 1, 8, 8)).last_hidden_state
    assert torch.isfinite(out).all()

    average = simple_average(base.state_dict(), experts)
    key = "encoder.layers.0.mlp.fc1.weight"
    Ws = [experts[t][key].double() for t in tasks]
    Gs = [grams[t][key] for t in tasks]
    assert objective(merged[key].double(), Ws, Gs, 0.6) < objective(average[key].double(), Ws, Gs, 0.6)
    bias = "encoder.layers.0.mlp.fc1.bias"
    torch.testing.assert_close(merged[bias], average[bias])
