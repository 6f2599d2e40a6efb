"""epmq.io.packing: pack then unpack returns exactly the codes, scales, zeros and g_idx (2, 3, 4 and 8
bits, grouped and per-row, act-order and static groups, odd shapes), and the words are the ones
the GPTQ format describes, checked by hand-made examples and by a bit-stream reference written
here from the format's description (not from the packer). pack_bits writes the same stream for
5, 6 and 7 bits too."""

from __future__ import annotations

import pytest
import torch

from epmq.core.gptq import gptq, rtn
from epmq.core.quant import QuantSpec
from epmq.io.packing import (dequantize_layer, pack_bits, pack_cols, pack_layer, pack_rows, pack_zeros, packed_length,
                             unpack_bits, unpack_cols, unpack_layer, unpack_rows, unpack_zeros)

ODD = [(1, 1), (7, 3), (31, 5), (33, 2), (100, 17), (64, 64)]


def reference_unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """From the description: each column's words, word k at bits 32k.., form one little-endian bit
    stream; code j is stream bits j*bits .. j*bits + bits - 1. Python integers, one column at a time."""
    cols = words.shape[1]
    out = torch.empty(n, cols, dtype=torch.int64)
    for c in range(cols):
        stream = 0
        for k, w in enumerate(words[:, c].tolist()):
            stream |= (w & 0xFFFFFFFF) << (32 * k)
        for j in range(n):
            out[j, c] = (stream >> (j * bits)) & ((1 << bits) - 1)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", ODD)
def test_pack_then_unpack_is_exact_on_odd_shapes(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + shape[0])
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_length(shape[0], bits), shape[1])
    assert torch.equal(unpack_rows(packed, bits, shape[0]), codes)
    assert torch.equal(reference_unpack(packed, bits, shape[0]), codes)
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits, shape[0]), codes.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", ODD)
def test_the_bit_stream_of_any_width_is_exact_and_as_described(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + shape[0] + 7)
    codes = torch.randint(0, 2**bits, shape, generator=gen)
    packed = pack_bits(codes, bits)
    n = shape[0]
    # whole words when bits divides 32, else `bits` words per 32 codes
    assert packed.dtype == torch.int32 and packed.shape == (packed_length(n, bits), shape[1])
    assert packed_length(n, bits) == (-(-n * bits // 32) if 32 % bits == 0 else bits * -(-n // 32))
    unpacked = unpack_bits(packed, bits, n)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked.long(), codes)
    assert torch.equal(reference_unpack(packed, bits, n), codes)
    if bits in (2, 3, 4, 8):  # the GPTQ layout is this stream
        assert torch.equal(pack_rows(codes, bits), packed)


def test_words_hold_codes_little_endian_along_the_input_axis():
    # 4 bits: row r holds inputs 8r .. 8r + 7, input 8r + j at bit 4j
    codes = torch.arange(1, 17).remainder(16).view(16, 1)  # 1, 2, ..., 15, 0
    assert pack_rows(codes, 4).view(-1).tolist() == [0x87654321 - (1 << 32), 0x0FEDCBA9]  # int32: two's complement
    # 2 bits: 16 codes per word; 8 bits: 4 codes per word (the top code sets the sign bit)
    assert pack_rows(torch.tensor([[3]] + [[0]] * 15), 2).item() == 3
    assert pack_rows(torch.tensor([[0]] * 15 + [[3]]), 2).item() == -(1 << 30)  # 0b11 << 30 as int32
    assert pack_rows(torch.tensor([[0x01], [0x02], [0x03], [0xFF]]), 8).item() == 0xFF030201 - (1 << 32)
    # sizes: in * bits / 32 rows, rounded up to whole words (3 bits: to whole 3-word blocks)
    assert [packed_length(n, 4) for n in (8, 9, 128)] == [1, 2, 16]
    assert [packed_length(n, 3) for n in (32, 33, 128)] == [3, 6, 12]


def test_three_bits_pack_32_codes_into_three_words_as_gptqmodel():
    """10 codes, then code 10 split 2 + 1 bits, 10 codes, code 21 split 1 + 2 bits, 10 codes."""
    one = lambda j: torch.zeros(32, 1, dtype=torch.int64).index_fill_(0, torch.tensor([j]), 7)  # noqa: E731
    words = lambda j: [w & 0xFFFFFFFF for w in pack_rows(one(j), 3).view(-1).tolist()]  # noqa: E731
    assert words(0) == [0b111, 0, 0]
    assert words(9) == [0b111 << 27, 0, 0]
    assert words(10) == [0b11 << 30, 0b1, 0]
    assert words(11) == [0, 0b111 << 1, 0]
    assert words(21) == [0, 1 << 31, 0b11]
    assert words(22) == [0, 0, 0b111 << 2]
    assert words(31) == [0, 0, 0b111 << 29]


def test_v1_zero_points_are_stored_minus_one_as_loaders_add_them_back():
    # symmetric 4-bit grids have zero 8: v1 stores 7 in every field, v2 stores 8
    z = torch.full((2, 8), 8)
    assert pack_zeros(z, 4, "gptq").view(-1).tolist() == [0x77777777] * 2
    assert pack_zeros(z, 4, "gptq_v2").view(-1).tolist() == [0x88888888 - (1 << 32)] * 2
    # GPTQModel undoes the offset by adding 0x11111111 (0x01010101, 0x55555555) to each word; that
    # restores every zero point exactly, 0 included (stored with a borrow from the next field)
    for bits, ones in ((2, 0x55555555), (4, 0x11111111), (8, 0x01010101)):
        gen = torch.Generator().manual_seed(bits)
        z = torch.randint(0, 2**bits, (3, 37), generator=gen)
        z[:, :5] = 0
        z[:, 5:9] = 2**bits - 1
        stored = pack_zeros(z, bits, "gptq")
        added = ((stored.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        assert torch.equal(reference_unpack(added.t(), bits, 37).t(), z)
        assert torch.equal(unpack_zeros(stored, bits, 37, "gptq"), z)
        assert torch.equal(unpack_zeros(pack_zeros(z, bits, "gptq_v2"), bits, 37, "gptq_v2"), z)
    # 3 bits: field by field, modulo 8
    z = torch.randint(0, 8, (2, 64), generator=torch.Generator().manual_seed(3))
    z[:, 10] = 0  # a split field
    stored = pack_zeros(z, 3, "gptq")
    assert torch.equal(reference_unpack(stored.t(), 3, 64).t(), (z - 1) % 8)
    assert torch.equal(unpack_zeros(stored, 3, 64, "gptq"), z)


SPECS = {
    "grouped": QuantSpec(bits=4, group_size=16),
    "per-row": QuantSpec(bits=3, group_size=-1),
    "act-order": QuantSpec(bits=2, group_size=16, act_order=True),
    "static-groups": QuantSpec(bits=8, group_size=16, act_order=True, static_groups=True, sym=True),
    "odd": QuantSpec(bits=3, group_size=7, act_order=True),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_layers_round_trip_exactly(name, checkpoint_format):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(len(name))
    rows, cols = (37, 45) if name == "odd" else (48, 64)
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(4 * cols, cols, generator=gen) * torch.linspace(0.1, 2, cols)
    r = gptq(W, X.t() @ X, spec)
    if spec.act_order and not spec.static_groups and spec.group_size != -1:
        assert not torch.equal(r.g_idx, torch.arange(cols) // spec.group_size)  # a real permutation
    scales16 = r.scales.to(torch.float16)
    tensors = pack_layer(r.qweight, r.scales, r.zeros, r.g_idx, spec.bits, checkpoint_format)
    assert tensors["qweight"].shape == (packed_length(cols, spec.bits), rows)
    assert tensors["qzeros"].shape == (r.scales.shape[1], packed_length(rows, spec.bits))
    assert tensors["scales"].dtype == torch.float16 and tensors["g_idx"].dtype == torch.int32
    codes, scales, zeros, g_idx = unpack_layer(tensors, spec.bits, cols, rows, checkpoint_format)
    assert torch.equal(codes, r.qweight)
    assert torch.equal(scales, scales16)
    assert torch.equal(zeros, r.zeros.long())
    assert torch.equal(g_idx, r.g_idx)
    # the weight with float16 scales, and its distance to epmq's float32 one (fp16 rounding only)
    weight = dequantize_layer(tensors, spec.bits, cols, rows, checkpoint_format)
    g = r.g_idx
    assert torch.equal(weight, (r.qweight.float() - r.zeros[:, g]) * scales16.float()[:, g])
    assert bool(((weight - r.weight).abs() <= r.weight.abs() * 2**-11 + 1e-12).all())


def test_rtn_and_all_zero_layers_pack():
    W = torch.zeros(5, 9)
    W[0, 0] = 15.0  # a non-negative group: asymmetric zero point 0, scale 1
    r = rtn(W, QuantSpec(bits=4, group_size=4))
    assert bool((r.zeros == 0).any())
    for fmt in ("gptq", "gptq_v2"):
        t = pack_layer(r.qweight, r.scales, r.zeros, r.g_idx, 4, fmt)
        # scale 1 is exact in fp16, and the all-zero groups stay 0
        assert torch.equal(dequantize_layer(t, 4, 9, 5, fmt), r.weight)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        pack_rows(torch.zeros(8, 1, dtype=torch.long), 5)  # GPTQ loaders read 2, 3, 4, 8 bits only
    with pytest.raises(ValueError, match="bits"):
        unpack_rows(pack_bits(torch.zeros(8, 1, dtype=torch.long), 5), 5, 8)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(8, 1, dtype=torch.long), 9)
    with pytest.raises(ValueError, match="0 .. 15"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_rows(torch.zeros(8, 1), 4)
    with pytest.raises(ValueError, match="take 2 words"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 9)
    with pytest.raises(ValueError, match="checkpoint_format"):
        pack_zeros(torch.zeros(1, 8, dtype=torch.long), 4, "gptq_v3")
    codes, s, z = torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="g_idx"):
        pack_layer(codes, s, z, torch.tensor([0, 0, 0, 1]), 4)
    with pytest.raises(ValueError, match="zero or infinite in float16"):
        pack_layer(codes, s * 1e-9, z, torch.zeros(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integers"):
        pack_layer(codes, s, z + 0.5, torch.zeros(4, dtype=torch.long), 4)
