"""The GPTQ checkpoint layout in pure torch: integer codes packed into int32 words, and back.

A run of n codes of `bits` bits is a little-endian bit stream, code j at stream bits
j*bits .. j*bits + bits - 1, cut into 32-bit words: word k holds stream bits 32k .. 32k + 31.

- 2, 4 and 8 bits: 32/bits whole codes per word (word r holds codes r*f .. r*f + f - 1, code
  r*f + i at bit i*bits);
- 3 bits: 32 codes in three words, codes 10 and 21 straddling a word boundary (10 codes, 2 + 1
  bits of code 10, 10 codes, 1 + 2 bits of code 21, 10 codes): GPTQModel's 3-bit layout.

The stream is padded with zero codes to whole words (2/4/8 bits) or whole 3-word blocks (3 bits),
so n codes take packed_length(n, bits) words.

pack_bits / unpack_bits write the same stream for every width in CODE_BITS (2..8): 5, 6 and 7 bits,
which GPTQ loaders do not read, take `bits` words per 32 codes like 3 bits. epmq keeps its own
quantized layers in this form (epmq.io.quantized_layer); pack_rows / unpack_rows are the GPTQ layout,
2, 3, 4 and 8 bits only.

One quantized linear layer (out x in, n_groups grids per row) in the GPTQ layout:

    qweight  int32 [packed_length(in), out]        the codes, packed along the input axis
    qzeros   int32 [n_groups, packed_length(out)]  the zero points, packed along the output axis
    scales   fp16  [n_groups, out]
    g_idx    int32 [in]                            the group of each input column

    weight[o, i] = (code[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]

Zero points: checkpoint_format "gptq_v2" stores them as they are; "gptq" (v1, the historical
AutoGPTQ layout) stores them minus one, which loaders add back. The v1 offset is applied exactly
as GPTQModel converts between the two (so that GPTQModel reads our files back bit for bit): for 2,
4 and 8 bits by subtracting 0x...0101 (a one in every field) from each packed int32 word, modulo
2^32, and for 3 bits field by field, modulo 2^3. A zero point of 0 (asymmetric grids only) thus
borrows from the next field of its word; loaders that undo the offset word by word (GPTQModel)
read it back exactly, loaders that add one to each unpacked field do not (gptq_v2 has no offset).
"""

from __future__ import annotations

import torch

WORD_BITS = 32
BITS = (2, 3, 4, 8)  # what the GPTQ layout (and its loaders) take
CODE_BITS = (2, 3, 4, 5, 6, 7, 8)  # what pack_bits takes: every width QuantSpec allows
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_MASK32 = (1 << WORD_BITS) - 1


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"the GPTQ layout packs {BITS} bits per code, got {bits!r}")
    return bits


def check_code_bits(bits) -> int:
    """`bits` if pack_bits takes it (one of CODE_BITS), else ValueError naming it."""
    if isinstance(bits, bool) or bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS} (the code widths pack_bits takes), got {bits!r}")
    return bits


def check_format(checkpoint_format: str) -> str:
    """`checkpoint_format` if it is one of CHECKPOINT_FORMATS, else ValueError naming the option."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return checkpoint_format


def packed_length(n: int, bits: int) -> int:
    """How many int32 words hold n codes of `bits` bits: padded to whole words when bits divides 32
    (2, 4, 8), else to whole blocks of 32 codes in `bits` words (3, 5, 6, 7)."""
    check_code_bits(bits)
    if WORD_BITS % bits:
        return bits * -(-n // WORD_BITS)
    return -(-n // (WORD_BITS // bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words).to(torch.int32)


def _to_uint(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> their unsigned values in int64."""
    return words.to(torch.int64) & _MASK32


def _layout(bits: int):
    """Per code j of a 32-code block (bits words): (word, shift, spills into the next word)."""
    return [(j * bits // WORD_BITS, j * bits % WORD_BITS, j * bits % WORD_BITS + bits > WORD_BITS)
            for j in range(WORD_BITS)]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (n, cols) integer codes in 0 .. 2^bits - 1 along dim 0, any bits in CODE_BITS:
    int32 (packed_length(n, bits), cols), each column one little-endian bit stream."""
    check_code_bits(bits)
    if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be a 2-D integer tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    n, cols = codes.shape
    c = codes.to(torch.int64).contiguous()  # contiguous rows: the loop below reads 32 of them per block
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in 0 .. {(1 << bits) - 1} for {bits} bits, "
                         f"got {int(c.min())} .. {int(c.max())}")
    blocks = -(-n // WORD_BITS)
    if blocks * WORD_BITS != n:
        c = torch.cat([c, c.new_zeros(blocks * WORD_BITS - n, cols)])
    c = c.view(blocks, WORD_BITS, cols)
    words = c.new_zeros(blocks, bits, cols)
    for j, (k, shift, spill) in enumerate(_layout(bits)):
        if spill:
            words[:, k] |= (c[:, j] << shift) & _MASK32
            words[:, k + 1] |= c[:, j] >> (WORD_BITS - shift)
        else:  # codes < 2^bits stay within the word
            words[:, k] |= c[:, j] << shift
    return _to_int32(words.view(blocks * bits, cols)[:packed_length(n, bits)])


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The n codes of each column of `packed` (pack_bits's layout): uint8 (n, cols)."""
    check_code_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.shape[0] != packed_length(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_length(n, bits)} words, "
                         f"got {packed.shape[0]} rows")
    cols = packed.shape[1]
    blocks = -(-n // WORD_BITS)
    u = _to_uint(packed)
    if blocks * bits != u.shape[0]:  # 2/4/8 bits: the last block's words past the codes were not stored
        u = torch.cat([u, u.new_zeros(blocks * bits - u.shape[0], cols)])
    u = u.view(blocks, bits, cols)
    codes = torch.empty(blocks, WORD_BITS, cols, dtype=torch.uint8, device=packed.device)  # 1 byte a code
    mask = (1 << bits) - 1
    for j, (k, shift, spill) in enumerate(_layout(bits)):
        v = u[:, k] >> shift
        if spill:
            v = v | (u[:, k + 1] << (WORD_BITS - shift))
        codes[:, j] = v & mask
    return codes.view(blocks * WORD_BITS, cols)[:n]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (n, cols) integer codes in 0 .. 2^bits - 1 along dim 0 in the GPTQ layout (2, 3, 4, 8 bits):
    int32 (packed_length(n, bits), cols)."""
    return pack_bits(codes, _check_bits(bits))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The n codes of each column of `packed` (pack_rows's layout): int64 (n, cols)."""
    return unpack_bits(packed, _check_bits(bits), n).to(torch.int64)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (rows, n) integer codes along dim 1: int32 (rows, packed_length(n, bits))."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The n codes of each row of `packed` (pack_cols's layout): int64 (rows, n)."""
    return unpack_rows(packed.t(), bits, n).t().contiguous()


def _v1_offset(bits: int) -> int:
    """One in every field of a 32-bit word (2, 4, 8 bits): 0x55555555, 0x11111111, 0x01010101."""
    return sum(1 << (i * bits) for i in range(WORD_BITS // bits))


def pack_zeros(zeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros from (n_groups, out) integer zero points: int32 (n_groups, packed_length(out, bits))."""
    _check_bits(bits)
    check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq_v2":
        return pack_cols(z, bits)
    if bits == 3:  # field by field, as GPTQModel does for 3 bits
        return pack_cols((z - 1) & 0b111, bits)
    return _to_int32((_to_uint(pack_cols(z, bits)) - _v1_offset(bits)) & _MASK32)


def unpack_zeros(qzeros: torch.Tensor, bits: int, n: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """The zero points in qzeros (pack_zeros's layout): int64 (n_groups, n)."""
    _check_bits(bits)
    check_format(checkpoint_format)
    if checkpoint_format == "gptq_v2":
        return unpack_cols(qzeros, bits, n)
    if bits == 3:
        return (unpack_cols(qzeros, bits, n) + 1) & 0b111
    if qzeros.dim() != 2 or qzeros.dtype != torch.int32:
        raise ValueError(f"qzeros must be a 2-D int32 tensor, got {qzeros.dtype} of shape {tuple(qzeros.shape)}")
    return unpack_cols(_to_int32((_to_uint(qzeros) + _v1_offset(bits)) & _MASK32), bits, n)


def pack_layer(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """One quantized linear layer in the GPTQ layout, from epmq's (out, in) codes and (out, n_groups) grids.

    qweight: (out, in) integer codes; scales, zeros: (out, n_groups) (zeros integer-valued);
    g_idx: (in,) group of each input column. Returns {"qweight", "qzeros", "scales", "g_idx"} (CPU).
    Raises ValueError when a scale is not finite and non-zero in float16.
    """
    out_features, in_features = qweight.shape
    if scales.dim() != 2 or scales.shape[0] != out_features:
        raise ValueError(f"scales and zeros must both be (out={out_features}, n_groups), "
                         f"got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"g_idx must be ({in_features},), got {tuple(g_idx.shape)}")
    grids = pack_grids(scales, zeros, g_idx, bits, checkpoint_format)
    return {"qweight": pack_rows(qweight.detach().cpu().t(), bits), **grids}


def pack_grids(scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """A layer's grids in the GPTQ layout: {"qzeros", "scales", "g_idx"} (CPU), from (out, n_groups)
    scales and integer zeros and the (in,) g_idx; pack_layer without the codes (for codes already in
    qweight's layout, e.g. epmq.io.quantized_layer's). ValueError as pack_layer."""
    _check_bits(bits)
    if scales.shape != zeros.shape or scales.dim() != 2:
        raise ValueError(f"scales and zeros must both be (out, n_groups), "
                         f"got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if g_idx.dim() != 1:
        raise ValueError(f"g_idx must be (in,), got {tuple(g_idx.shape)}")
    n_groups = scales.shape[1]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise ValueError(f"g_idx must index the {n_groups} groups, got {int(g_idx.min())} .. {int(g_idx.max())}")
    zf = zeros.detach().cpu().to(torch.float64)  # float or integer zeros (uint8 would wrap 1 << 8 to 0)
    if not torch.equal(zf, zf.round()) or zf.numel() and (zf.min() < 0 or zf.max() >= 1 << bits):
        raise ValueError(f"zeros must be integers in 0 .. {(1 << bits) - 1}")
    scales16 = scales.detach().cpu().t().to(torch.float16).contiguous()
    if not bool(torch.isfinite(scales16).all()) or bool((scales16 == 0).any()):
        raise ValueError("a scale is zero or infinite in float16 (the GPTQ layout stores scales as float16)")
    return {"qzeros": pack_zeros(zf.t().to(torch.int64), bits, checkpoint_format),
            "scales": scales16,
            "g_idx": g_idx.detach().cpu().to(torch.int32).contiguous()}


def unpack_layer(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                 checkpoint_format: str = "gptq") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """epmq's view of a GPTQ layer: codes (out, in) uint8, scales (out, n_groups) as stored (float16),
    zeros (out, n_groups) int64, g_idx (in,) int64."""
    codes = unpack_bits(tensors["qweight"], _check_bits(bits), in_features).t()
    zeros = unpack_zeros(tensors["qzeros"], bits, out_features, checkpoint_format).t()
    return codes.contiguous(), tensors["scales"].t().contiguous(), zeros.contiguous(), tensors["g_idx"].to(torch.int64)


def dequantize_layer(tensors: dict[str, torch.Tensor], bits: int, in_features: int, out_features: int,
                     checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight of a GPTQ layer: (code - zero[g_idx]) * scale[g_idx], computed in `dtype`."""
    codes, scales, zeros, g_idx = unpack_layer(tensors, bits, in_features, out_features, checkpoint_format)
    return (codes.to(dtype) - zeros.to(dtype)[:, g_idx]) * scales.to(dtype)[:, g_idx]
