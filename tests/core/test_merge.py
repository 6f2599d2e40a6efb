import math
from collections.abc import Mapping

import pytest
import torch

from epmq.core.merge import (SimpleAverage, TaskArithmetic, TiesMerging, _kth_smallest, check_experts, simple_average,
                             task_arithmetic, ties_merging)


def state_dict(seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "embeddings.position_ids": torch.arange(6).unsqueeze(0),            # int buffer
        "layer.weight": (scale * torch.randn(4, 3, generator=g)).to(dtype),
        "layer.bias": (scale * torch.randn(4, generator=g)).to(dtype),
        "head.weight": (scale * torch.randn(2, 4, generator=g)).to(dtype),
        "logit_scale": (scale * torch.randn((), generator=g)).to(dtype),
    }


def finetuned(base, seed, scale=0.1):
    noise = state_dict(seed, scale)
    return {k: v if not v.is_floating_point() else (v + noise[k]).to(v.dtype) for k, v in base.items()}


def float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def reference_ties(base, experts, scaling_factor, threshold, merge_func):
    """TIES as the FusionBench description reads, on one T x P matrix, entry by entry."""
    keys = float_keys(base)
    flat0 = torch.cat([base[k].reshape(-1) for k in keys])
    tau = torch.stack([torch.cat([e[k].reshape(-1) for k in keys]) - flat0 for e in experts])  # T x P
    P = tau.shape[1]
    K = threshold / 100 if threshold > 1 else threshold
    n_small = P - int(P * K)
    if n_small > 0:
        cut = tau.abs().sort(dim=1).values[:, n_small - 1 : n_small]   # n_small-th smallest |τ|
        tau = tau * (tau.abs() >= cut)
    sign = torch.sign(tau.sum(0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    merged = torch.zeros(P)
    for j in range(P):
        kept = [v for v in tau[:, j].tolist() if (v > 0 if sign[j] > 0 else v < 0)]
        if kept:
            merged[j] = {"sum": sum(kept), "mean": sum(kept) / len(kept),
                         "max": max(abs(v) for v in kept) * sign[j].item()}[merge_func]
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + scaling_factor * merged[offset : offset + n].reshape(base[k].shape)
        offset += n
    return out


def test_task_arithmetic_with_one_expert_and_scaling_one_is_the_expert():
    base = state_dict(0)
    expert = finetuned(base, 1)
    merged = task_arithmetic(base, [expert], scaling_factor=1.0)
    assert list(merged) == list(base)
    for k in base:
        torch.testing.assert_close(merged[k], expert[k], rtol=0, atol=1e-6)


def test_task_arithmetic_is_base_plus_scaled_sum_of_task_vectors():
    base = state_dict(0)
    experts = {"mnist": finetuned(base, 1), "svhn": finetuned(base, 2), "dtd": finetuned(base, 3)}
    merged = TaskArithmetic(scaling_factor=0.3)(base, experts)
    for k in float_keys(base):
        expected = base[k] + 0.3 * sum(e[k] - base[k] for e in experts.values())
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(merged[k], base[k])


def test_simple_average_equals_task_arithmetic_with_scaling_one_over_t():
    base = state_dict(0)
    experts = [finetuned(base, s) for s in (1, 2, 3)]
    average = SimpleAverage()(base, experts)
    ta = task_arithmetic(base, experts, scaling_factor=1 / 3)
    for k in float_keys(base):
        torch.testing.assert_close(average[k], ta[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(average[k], torch.stack([e[k] for e in experts]).mean(0), rtol=1e-6, atol=1e-6)


def test_ties_full_keep_mean_with_agreeing_signs_is_the_average_task_vector():
    base = state_dict(0)
    signs = {k: torch.sign(torch.randn(base[k].shape, generator=torch.Generator().manual_seed(9)))
             for k in float_keys(base)}
    experts = []
    for s in (1, 2, 3):
        magnitudes = state_dict(s, 0.1)
        experts.append({k: base[k] + signs[k] * magnitudes[k].abs() if k in signs else base[k] for k in base})
    merged = ties_merging(base, experts, scaling_factor=1.0, threshold=100, merge_func="mean")
    for k in signs:
        expected = base[k] + sum(e[k] - base[k] for e in experts) / 3
        torch.testing.assert_close(merged[k], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threshold", [5, 20, 50, 0.3, 100])
def test_ties_trims_each_task_vector_to_its_top_share_over_the_whole_model(threshold):
    base = state_dict(0)
    expert = finetuned(base, 1)                      # distinct magnitudes almost surely
    merged = ties_merging(base, [expert], scaling_factor=1.0, threshold=threshold)
    keys = float_keys(base)
    tau = torch.cat([(expert[k] - base[k]).reshape(-1) for k in keys])
    kept = torch.cat([(merged[k] - base[k]).reshape(-1) for k in keys]) != 0
    P = tau.numel()
    fraction = threshold / 100 if threshold > 1 else threshold
    # FusionBench keeps |τ| >= the (P - int(P K))-th smallest: int(P K) + 1 entries, all when K = 1
    assert int(kept.sum()) == min(P, int(P * fraction) + 1)
    if not kept.all():
        assert tau[kept].abs().min() > tau[~kept].abs().max()


def test_ties_trims_globally_not_per_tensor():
    base = state_dict(0)
    expert = dict(base)
    expert["layer.weight"] = base["layer.weight"] + 1.0 + torch.rand(4, 3)   # 12 large entries
    for k in ("layer.bias", "head.weight", "logit_scale"):
        expert[k] = base[k] + 0.01                                           # 13 small entries
    merged = ties_merging(base, [expert], scaling_factor=1.0, threshold=30)  # keeps int(25*.3)+1 = 8
    assert int((merged["layer.weight"] != base["layer.weight"]).sum()) == 8
    for k in ("layer.bias", "head.weight", "logit_scale"):
        assert torch.equal(merged[k], base[k])


def test_ties_sign_election_worked_example():
    base = {"w": torch.zeros(6)}
    taus = [
        torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, 1.0]),
        torch.tensor([2.0, 1.0, -1.0, -1.0, -1.0, 1.0]),
        torch.tensor([-0.5, 0.5, -1.0, -1.0, 0.0, 1.0]),
    ]
    experts = {f"t{i}": {"w": tau} for i, tau in enumerate(taus)}
    # column sums 2.5, -0.5, -1.5, 1.0, 0.0, 3.0 -> elected +, -, -, +, ?, +; the zero-sum column
    # takes the majority of the elected signs, sign(1 - 1 - 1 + 1 + 1) = +.
    # agreeing entries per column: {1, 2}, {-2}, {-1, -1}, {3}, {1}, {1, 1, 1}
    expected = {
        "sum": [3.0, -2.0, -2.0, 3.0, 1.0, 3.0],
        "mean": [1.5, -2.0, -1.0, 3.0, 1.0, 1.0],
        "max": [2.0, -2.0, -1.0, 3.0, 1.0, 1.0],
    }
    for merge_func, values in expected.items():
        merged = ties_merging(base, experts, scaling_factor=1.0, threshold=100, merge_func=merge_func)
        torch.testing.assert_close(merged["w"], torch.tensor(values), msg=merge_func)
    # scaling multiplies the merged task vector, added to a non-zero base
    shifted = {"w": torch.full((6,), 5.0)}
    moved = {k: {"w": v["w"] + 5.0} for k, v in experts.items()}
    merged = ties_merging(shifted, moved, scaling_factor=0.5, threshold=100, merge_func="sum")
    torch.testing.assert_close(merged["w"], 5.0 + 0.5 * torch.tensor(expected["sum"]))


def test_ties_zero_sum_entry_takes_the_majority_sign():
    base = {"w": torch.zeros(4)}
    taus = [torch.tensor([1.0, 2.0, 3.0, 1.0]), torch.tensor([1.0, 2.0, -3.0, -1.0])]
    # column sums 2, 4, 0, 0: elected + + then majority (+) for the two zero-sum columns
    merged = ties_merging(base, [{"w": t} for t in taus], scaling_factor=1.0, threshold=100)["w"]
    torch.testing.assert_close(merged, torch.tensor([2.0, 4.0, 3.0, 1.0]))
    flipped = ties_merging(base, [{"w": -t} for t in taus], scaling_factor=1.0, threshold=100)["w"]
    torch.testing.assert_close(flipped, -merged)


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 60])
def test_ties_matches_a_whole_matrix_reference(merge_func, threshold):
    base = state_dict(0)
    experts = [finetuned(base, s) for s in (1, 2, 3, 4)]
    merged = TiesMerging(scaling_factor=0.3, threshold=threshold, merge_func=merge_func)(base, experts)
    expected = reference_ties(base, experts, 0.3, threshold, merge_func)
    for k in float_keys(base):
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merge", [SimpleAverage(), TaskArithmetic(0.5), TiesMerging(0.5, 20, "max")])
def test_int_buffers_copied_and_dtypes_kept(merge):
    base = state_dict(0, dtype=torch.float16)
    experts = [finetuned(base, s) for s in (1, 2)]
    merged = merge(base, experts)
    assert list(merged) == list(base)
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])
    assert merged["embeddings.position_ids"].data_ptr() != base["embeddings.position_ids"].data_ptr()
    for k, v in base.items():
        assert merged[k].dtype == v.dtype and merged[k].shape == v.shape


def test_errors_name_the_key_and_the_expert():
    base = state_dict(0)
    good = finetuned(base, 1)
    missing = {k: v for k, v in good.items() if k != "layer.bias"}
    extra = dict(good, **{"extra.weight": torch.zeros(2)})
    shape = dict(good, **{"head.weight": torch.zeros(4, 2)})
    dtype = dict(good, **{"layer.weight": good["layer.weight"].double()})
    buffer = dict(good, **{"embeddings.position_ids": torch.arange(6).flip(0).unsqueeze(0)})
    cases = [(missing, "layer.bias"), (extra, "extra.weight"), (shape, "head.weight.*shape"),
             (dtype, "layer.weight.*dtype"), (buffer, "embeddings.position_ids")]
    for merge in (simple_average, task_arithmetic, ties_merging):
        for bad, match in cases:
            with pytest.raises(ValueError, match=f"'svhn'.*{match}"):
                merge(base, {"mnist": good, "svhn": bad})
            with pytest.raises(ValueError, match=r"experts\[1\]"):
                merge(base, [good, bad])
        with pytest.raises(ValueError, match="empty"):
            merge(base, [])


@pytest.mark.parametrize("make, match", [
    (lambda: TiesMerging(threshold=0), "threshold"),
    (lambda: TiesMerging(threshold=101), "threshold"),
    (lambda: TiesMerging(threshold=-5), "threshold"),
    (lambda: TiesMerging(merge_func="median"), "merge_func"),
    (lambda: TiesMerging(scaling_factor=-0.1), "scaling_factor"),
    (lambda: TaskArithmetic(scaling_factor=-1), "scaling_factor"),
    (lambda: TaskArithmetic(scaling_factor=math.nan), "scaling_factor"),
    (lambda: ties_merging({}, [{}], threshold=200), "threshold"),
    (lambda: task_arithmetic({}, [{}], scaling_factor=-2), "scaling_factor"),
])
def test_invalid_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_readable_repr():
    assert repr(TiesMerging()) == "TiesMerging(scaling_factor=0.3, threshold=20, merge_func='sum')"
    assert repr(TaskArithmetic(0.5)) == "TaskArithmetic(scaling_factor=0.5)"
    assert repr(SimpleAverage()) == "SimpleAverage()"


class Headers(Mapping):
    """A state dict that offers spec(key) and counts reads, as a lazy view of a file would."""

    def __init__(self, sd):
        self.sd, self.reads = sd, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.sd[key].clone()

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)

    def __contains__(self, key):
        return key in self.sd

    def spec(self, key):
        return self.sd[key].shape, self.sd[key].dtype


def test_checks_of_mappings_with_headers_read_only_integer_buffers():
    base = state_dict(0)
    good, bad_shape = finetuned(base, 1), finetuned(base, 2)
    bad_shape["head.weight"] = torch.zeros(4, 2)
    bad_dtype = dict(good, **{"layer.weight": good["layer.weight"].double()})
    bad_buffer = dict(good, **{"embeddings.position_ids": torch.arange(6).flip(0).unsqueeze(0)})
    views = {"mnist": Headers(good), "svhn": Headers(finetuned(base, 3))}
    assert check_experts(Headers(base), views) == float_keys(base)
    assert all(v.reads == ["embeddings.position_ids"] for v in views.values())
    for bad, match in [(bad_shape, "head.weight.*shape"), (bad_dtype, "layer.weight.*dtype"),
                       (bad_buffer, "embeddings.position_ids")]:
        with pytest.raises(ValueError, match=f"'svhn'.*{match}"):
            check_experts(base, {"mnist": Headers(good), "svhn": Headers(bad)})


@pytest.mark.parametrize("merge", [SimpleAverage(), TaskArithmetic(0.5), TiesMerging(0.5, 20, "max")])
def test_mappings_with_headers_merge_bit_for_bit_like_dicts(merge):
    base = state_dict(0, dtype=torch.bfloat16)
    experts = {f"t{s}": finetuned(base, s) for s in (1, 2, 3)}
    expected = merge(base, experts)
    got = merge(Headers(base), {t: Headers(e) for t, e in experts.items()})
    assert list(got) == list(expected)
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_selection_is_kthvalue(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_001, generator=g).to(dtype).abs()
    x[::7] = x[3]  # many ties
    for k in (1, 2, 500, 5_000, 10_001):
        got = _kth_smallest(x.clone(), k)
        assert got.dtype == dtype and got.shape == () and torch.equal(got, x.kthvalue(k).values)
