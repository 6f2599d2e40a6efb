import pytest
import torch

from epmq.core.stats import LayerStatistics


def reference(batches):
    """H and C summed directly in float64 from (X, Y, w) with w per token row."""
    H = sum((w[:, None] * X).T @ X for X, Y, w in batches)
    C = sum(Y.T @ (w[:, None] * X) for X, Y, w in batches)
    return H, C


def random_batches(n_batches, n, d_in, d_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        X = torch.randn(n, d_in, generator=g) + 0.5
        Y = torch.randn(n, d_out, generator=g)
        w = torch.rand(n, generator=g)
        out.append((X, Y, w))
    return out


def test_matches_float64_reference_with_token_weights():
    batches = random_batches(4, 37, 12, 5)
    stats = LayerStatistics(12, 5)
    for X, Y, w in batches:
        stats.add(X, Y, weight=w)
    H, C = reference([(X.double(), Y.double(), w.double()) for X, Y, w in batches])
    assert stats.H.dtype == torch.float64 and stats.C.dtype == torch.float64
    assert stats.H.shape == (12, 12) and stats.C.shape == (5, 12)
    torch.testing.assert_close(stats.H, H, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.C, C, rtol=1e-6, atol=1e-5)
    assert stats.tokens == 4 * 37


def test_wide_layers_multiply_H_by_panels_with_the_full_products_sums():
    """Inputs wider than a Gram panel (two full panels and a narrow one): H from the blocks on and above the
    diagonal, mirrored, matches the float64 reference as closely as a full product does, and is symmetric."""
    from epmq.core.stats import _GRAM_PANEL

    d_in = 2 * _GRAM_PANEL + 7
    batches = random_batches(2, 64, d_in, 3)
    stats = LayerStatistics(d_in)
    for X, _, w in batches:
        stats.add(X, weight=w)
    H, _ = reference([(X.double(), Y.double(), w.double()) for X, Y, w in batches])
    full = sum(((w[:, None] * X).T @ X).double() for X, _, w in batches)  # the float32 product in one piece
    assert (stats.H - H).abs().max() <= 2 * (full - H).abs().max() + 1e-6
    torch.testing.assert_close(stats.H, stats.H.T, rtol=1e-6, atol=1e-5)


def test_float64_inputs_are_multiplied_in_float64():
    X, Y, w = random_batches(1, 50, 9, 3)[0]
    X, Y, w = X.double(), Y.double(), w.double()
    stats = LayerStatistics(9, 3)
    stats.add(X, Y, weight=w)
    H, C = reference([(X, Y, w)])
    torch.testing.assert_close(stats.H, H, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(stats.C, C, rtol=1e-13, atol=1e-12)


def test_leading_dims_are_tokens_and_per_sample_weights_expand():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 7, 6, generator=g)            # batch x seq x in
    Y = torch.randn(3, 7, 4, generator=g)
    w_sample = torch.tensor([0.5, 2.0, 1.0])
    nested = LayerStatistics(6, 4)
    nested.add(X, Y, weight=w_sample)
    flat = LayerStatistics(6, 4)
    flat.add(X.reshape(21, 6), Y.reshape(21, 4), weight=w_sample.repeat_interleave(7))
    torch.testing.assert_close(nested.H, flat.H, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nested.C, flat.C, rtol=1e-12, atol=1e-12)
    assert nested.tokens == flat.tokens == 21
    # Y may be laid out differently as long as the token count agrees
    other = LayerStatistics(6, 4)
    other.add(X, Y.reshape(21, 4), weight=w_sample)
    torch.testing.assert_close(other.C, nested.C, rtol=1e-12, atol=1e-12)


def test_scalar_weight_scales_linearly_and_H_only_mode():
    X = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    one, half = LayerStatistics(8), LayerStatistics(8)
    one.add(X)
    half.add(X, weight=0.5)
    assert one.C is None and half.C is None
    torch.testing.assert_close(half.H, 0.5 * one.H, rtol=1e-12, atol=1e-12)
    assert torch.linalg.eigvalsh(one.H).min() > 0  # 40 generic tokens in 8 dims: positive definite


def test_float64_buffer_beats_float32_buffer_over_many_batches():
    # many small batches with a non-zero mean: the running sum grows and float32 drifts
    g = torch.Generator().manual_seed(3)
    X = torch.rand(3000, 16, 4, generator=g) + 1.0
    stats64 = LayerStatistics(4, dtype=torch.float64)
    stats32 = LayerStatistics(4, dtype=torch.float32)
    for batch in X:
        stats64.add(batch)
        stats32.add(batch)
    flat = X.reshape(-1, 4).double()
    H = flat.T @ flat
    err64 = ((stats64.H - H).norm() / H.norm()).item()
    err32 = ((stats32.H.double() - H).norm() / H.norm()).item()
    assert err64 < 1e-7
    assert err64 < err32 / 10
    assert stats64.tokens == 3000 * 16


def test_shards_summed_equal_one_pass_and_buffers_reduce_in_place():
    batches = random_batches(6, 20, 10, 3, seed=4)
    whole = LayerStatistics(10, 3)
    for X, Y, w in batches:
        whole.add(X, Y, weight=w)
    shards = [LayerStatistics(10, 3) for _ in range(3)]
    for i, (X, Y, w) in enumerate(batches):
        shards[i % 3].add(X, Y, weight=w)

    summed = LayerStatistics(10, 3)
    for s in shards:
        summed += s
    torch.testing.assert_close(summed.H, whole.H, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(summed.C, whole.C, rtol=1e-12, atol=1e-10)
    assert summed.tokens == whole.tokens == 120

    # what an all-reduce(sum) does: every rank's raw buffers replaced by the elementwise sum
    reduced = [sum(parts) for parts in zip(*(s.buffers() for s in shards))]
    for s in shards:
        for buf, total in zip(s.buffers(), reduced):
            buf.copy_(total)
    for s in shards:
        torch.testing.assert_close(s.H, whole.H, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(s.C, whole.C, rtol=1e-12, atol=1e-10)
        assert s.tokens == whole.tokens


def test_reset_zeroes_in_place():
    stats = LayerStatistics(5, 2)
    H_buf, C_buf = stats.H, stats.C
    stats.add(torch.randn(9, 5), torch.randn(9, 2))
    assert stats.H.abs().sum() > 0 and stats.tokens == 9
    stats.reset()
    assert stats.H is H_buf and stats.C is C_buf
    assert stats.H.abs().sum() == 0 and stats.C.abs().sum() == 0 and stats.tokens == 0


@pytest.mark.parametrize("call, match", [
    (lambda s: s.add(torch.randn(4, 7), torch.randn(4, 3)), "in_features"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(4, 2)), "out_features"),
    (lambda s: s.add(torch.randn(4, 6)), "Y"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(5, 3)), "same number of tokens"),
    (lambda s: s.add(torch.tensor([[float("nan")] * 6]), torch.randn(1, 3)), "X contains NaN"),
    (lambda s: s.add(torch.randn(1, 6), torch.tensor([[float("inf")] * 3])), "Y contains NaN or Inf"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(4, 3), weight=-1.0), "weight"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(4, 3), weight=float("nan")), "weight"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(4, 3), weight=torch.ones(5)), "weight shape"),
    (lambda s: s.add(torch.randn(4, 6), torch.randn(4, 3), weight=-torch.ones(4)), "weight"),
    (lambda s: s.add(torch.ones(4, 6, dtype=torch.int64), torch.randn(4, 3)), "floating"),
])
def test_bad_batches_raise_naming_the_field(call, match):
    stats = LayerStatistics(6, 3)
    with pytest.raises(ValueError, match=match):
        call(stats)
    assert stats.tokens == 0 and stats.H.abs().sum() == 0  # nothing half-added


def test_y_given_without_out_features_raises():
    with pytest.raises(ValueError, match="out_features=None"):
        LayerStatistics(6).add(torch.randn(3, 6), torch.randn(3, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=0), "in_features"),
    (dict(in_features=4, out_features=-2), "out_features"),
    (dict(in_features=4, dtype=torch.float16), "dtype"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerStatistics(**kwargs)


def test_adding_statistics_of_another_layer_raises():
    a = LayerStatistics(4, 2)
    with pytest.raises(ValueError, match="cannot add"):
        a += LayerStatistics(4, 3)


def test_products_stay_float32_under_autocast():
    """A block forward under bfloat16 autocast must not turn the statistics' products into bfloat16
    ones: the sums equal those of the same inputs added outside autocast, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    X, Y = torch.randn(4, 50, 64, generator=gen), torch.randn(4, 50, 16, generator=gen)
    inside, outside = LayerStatistics(64, 16), LayerStatistics(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (X @ X.transpose(1, 2)).dtype == torch.bfloat16  # autocast is really on here
        inside.add(X, Y)
    outside.add(X, Y)
    assert torch.equal(inside.H, outside.H) and torch.equal(inside.C, outside.C)


def test_shared_H_is_one_buffer_added_once():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(30, 8, generator=gen)
    q = LayerStatistics(8, 3)
    k = LayerStatistics(8, 5, share_H_with=q)
    q.add(X, torch.randn(30, 3, generator=gen))
    k.add(X, torch.randn(30, 5, generator=gen), with_H=False)
    assert k.H is q.H and not k.owns_H
    torch.testing.assert_close(q.H, (X.T @ X).double())  # once, not twice
    assert [t.shape for t in k.buffers()] == [(5, 8), ()]  # the borrowed H is not reduced again
    with pytest.raises(ValueError, match="share_H_with must be a LayerStatistics with in_features=9"):
        LayerStatistics(9, 2, share_H_with=q)
