"""GPTQ (Frantar et al., 2023) and round-to-nearest for one linear layer.

GPTQ minimises tr((Q - W) H (Q - W)^T) over grid-valued Q one column at a time: it rounds
column j, then moves the columns not yet rounded to compensate. The reference implementation
(IST-DASLab/gptq, gptq.py fasterquant) uses the upper Cholesky factor U of the damped inverse,

    H_d = H + damp I,   damp = percdamp * mean(diag H),   H_d^-1 = U^T U,
    e_j = (w'_j - q_j) / U[j, j],   w'_k = w_k - sum_{j<k} e_j U[j, k],

where w_k is column k of W and w'_k the same column once the earlier ones are rounded.
Here we use V = U^-1 instead, the upper triangular factor with H_d = V V^T (a Cholesky
factorisation of H_d in reversed index order, so no inverse is ever formed). Since
W - Q = E U, i.e. E = (W - Q) V, the same updated column is

    w'_k = w_k + sum_{j<k} (w_j - q_j) Vs[j, k],   Vs = V / diag(V)  (unit diagonal),

and rounding w'_k gives the reference's Q. The sums are collected lazily: one matrix product
per block of `blocksize` columns for all later columns, one per sub-block of _SUBBLOCK columns
for the rest of its block, and one matrix-vector product per column for its own sub-block.
The reference refits groups on its partially updated columns, which differ from ours; they
are recovered with one triangular solve per block (_reference_state). Dead inputs, act-order,
static groups and the loss follow the reference.

Columns are stored as contiguous rows (W transposed), everything is float32, and the
per-column loop allocates no tensor memory.
"""

import logging
from dataclasses import dataclass

import torch

from epmq.core.quant import QuantSpec, dequantize, find_params, group_params, quantize

log = logging.getLogger(__name__)

_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23
# Columns per sub-block of the inner loop. Within a block of B columns the loop reads about
# B * b / 2 columns for its matrix-vector products and B^2 / b for the sub-block updates, least
# near b = sqrt(2 B) = 16 for B = 128. Only float rounding depends on it.
_SUBBLOCK = 16
# How many times damping may be raised x10 when the Cholesky factorisation fails.
_MAX_DAMP_TRIES = 12


@dataclass
class QuantResult:
    """A quantized linear layer.

    weight:  (out, in) float32, the grid values, weight == (qweight - zeros[:, g_idx]) * scales[:, g_idx].
    qweight: (out, in) uint8 integer codes in 0 .. 2^bits - 1.
    scales:  (out, n_groups) float32 grid steps.
    zeros:   (out, n_groups) float32 zero points (integer-valued codes of 0.0).
    g_idx:   (in,) int64 group of each input column, in the original column order.
    loss:    tr((weight - W) H (weight - W)^T) with the caller's undamped H (for rtn without H:
             the squared error ||weight - W||^2).
    damp:    the damping actually added to diag H (0 for rtn).
    """

    weight: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    loss: float
    damp: float = 0.0


def _all_finite(X):
    # min and max propagate NaN; one reduction instead of a boolean copy of X.
    return bool(torch.isfinite(torch.stack(torch.aminmax(X))).all())


def _check_W(W):
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a 2-D float tensor (out x in), got {getattr(W, 'shape', type(W))}")
    if W.numel() == 0:
        raise ValueError(f"W must not be empty, got shape {tuple(W.shape)}")
    if not _all_finite(W):
        raise ValueError("W contains NaN or infinite values")


def _check_H(H, columns):
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or tuple(H.shape) != (columns, columns):
        raise ValueError(
            f"H must be a ({columns} x {columns}) tensor matching W's input features, "
            f"got {getattr(H, 'shape', type(H))}"
        )
    if not _all_finite(H):
        raise ValueError("H contains NaN or infinite values")


def layer_loss(Q, W, H=None, product_dtype=torch.float64):
    """tr((Q - W) H (Q - W)^T), or ||Q - W||^2 when H is None; a Python float.

    Q, W: (out, in); H: (in, in). The (out x in x in) product D H is formed in product_dtype
    (float64 by default; float32 is several times faster and about 1e-6 relative, enough for a
    logged baseline) and everything is summed in float64 so that small losses stay accurate.
    """
    D = (Q.double() - W.double())
    if H is None:
        return D.square().sum().item()
    Dp = D.to(product_dtype)
    return ((Dp @ H.to(Dp)).double() * D).sum().item()


def damped_cholesky(H, percdamp):
    """V^T for the upper triangular V with H + damp I = V V^T, raising damp x10 until it exists.

    H: (n, n) symmetric with a positive mean diagonal. Starts at damp = percdamp * mean(diag H);
    each failed factorisation multiplies damp by 10, and a raised value is logged as a warning.
    V is the inverse of the reference's upper Cholesky factor U of (H + damp I)^-1
    (U^T U = (V V^T)^-1 and U = V^-1). It is the lower Cholesky factor K of J (H + damp I) J,
    J the order reversal, reversed back: V = J K J; no inverse is formed.
    Returns V^T (n, n, lower triangular, contiguous) and damp (float).
    """
    mean_diag = torch.diagonal(H).mean().item()
    if not mean_diag > 0:
        raise ValueError(f"H must have a positive mean diagonal, got {mean_diag}")
    damp = first = percdamp * mean_diag
    for _ in range(_MAX_DAMP_TRIES):
        Hd = H.flip(0, 1)  # J H J, a fresh copy
        Hd.diagonal().add_(damp)
        K, info = torch.linalg.cholesky_ex(Hd)  # J (H + damp I) J = K K^T
        if info.item() == 0 and _all_finite(K):
            if damp != first:
                log.warning(
                    "GPTQ: Cholesky of the damped H failed at damp=%.3g (percdamp=%g); "
                    "succeeded after raising damp to %.3g (%.3g x mean diag H)",
                    first, percdamp, damp, damp / mean_diag,
                )
            return K.t().flip(0, 1), damp  # V^T = J K^T J
        damp *= 10
    raise ValueError(
        f"H: Cholesky factorisation failed even with damp={damp / 10:.3g} "
        f"({damp / 10 / mean_diag:.3g} x mean diag H); is H a Gram matrix?"
    )


def _reference_state(W0t, Wt, Vs, p, end):
    """Columns p..end-1 as the reference holds them once the columns before p are quantized.

    The reference moves later columns through U = V^-1, we through Vs = V / diag(V); after
    the columns < p are done the two differ by the unit upper triangular block Vs[p:end, p:end]:
    theirs = W0 + (ours - W0) Vs[p:end, p:end]^-1. W0t, Wt: (cols, rows) original and our
    updated weights, transposed. Returns (end - p, rows).
    """
    Vb = Vs[p:end, p:end]
    # Solved from the right on the transposes, which matches LAPACK's column-major layout
    # (about 3x faster here than the same solve from the left).
    step = torch.linalg.solve_triangular(
        Vb, (Wt[p:end] - W0t[p:end]).t(), upper=True, left=False, unitriangular=True
    )
    return W0t[p:end] + step.t()


def _fit_group_rows(Wt, start, group_size, bits, sym):
    """Grids of the column groups starting at `start`, `start + group_size`, ... of Wt (cols x rows).

    Returns scale, zero: (n, rows) for the n groups; a short last group is padded with zeros,
    which leave min(., 0) and max(., 0) unchanged.
    """
    cols, rows = Wt.shape
    n = -(-(cols - start) // group_size)
    slab = Wt[start:]
    if n * group_size != cols - start:
        slab = torch.cat([slab, slab.new_zeros(n * group_size - (cols - start), rows)])
    return find_params(slab.view(n, group_size, rows), bits, sym, dim=1)


def gptq(W, H, spec=QuantSpec()):
    """Quantize W with GPTQ given the layer's input Hessian H.

    W: (out, in) weights, any float dtype, on any device.
    H: (in, in) input Hessian, e.g. 2/n X X^T summed over calibration tokens (moved to W's device).
    spec: QuantSpec (bits, group_size, sym, act_order, static_groups, percdamp, blocksize).

    Follows the reference fasterquant: columns whose diag H is 0 (dead inputs) are zeroed and get
    H[i, i] = 1; act_order processes columns by descending diag H; without static_groups a group's
    grid is fitted when the block holding its first column starts, on the weights updated by all
    earlier blocks (so when group_size is a multiple of blocksize, on the fully updated weights);
    with static_groups all grids are fitted up front on W. Computes in float32.
    Returns QuantResult; .loss is tr((Q - W) H (Q - W)^T) with the undamped H as given.
    """
    _check_W(W)
    rows, cols = W.shape
    _check_H(H, cols)
    dev = W.device
    bits, maxq, g = spec.bits, spec.maxq, spec.group_size
    H_in = H
    H = H.to(device=dev, dtype=torch.float32, copy=True)
    # Columns of W as contiguous rows (cols x rows), the layout of the whole computation.
    W0t = W.to(torch.float32).t().contiguous()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1  # diagonal entries only (paired index lists)
    W0t[dead] = 0

    grouped = g != -1 and g < cols
    static = grouped and spec.static_groups
    n_groups = -(-cols // g) if grouped else 1
    if not grouped:
        St, Zt = (x.unsqueeze(0) for x in find_params(W0t, bits, spec.sym, dim=0))  # (1, rows)
    elif static:
        St, Zt = _fit_group_rows(W0t, 0, g, bits, spec.sym)  # (n_groups, rows), W's column order
    else:
        St, Zt = W0t.new_ones(n_groups, rows), W0t.new_zeros(n_groups, rows)  # fitted in the loop
    if spec.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W0t = W0t.index_select(0, perm)
        H = H.index_select(0, perm).index_select(1, perm)
    # Group of each column in processing order.
    if static:
        gp = torch.arange(cols, device=dev) // g
        gp = (gp[perm] if spec.act_order else gp).tolist()
    else:
        gp = [j // g if grouped else 0 for j in range(cols)]

    VsT, damp = damped_cholesky(H, spec.percdamp)  # V^T with H + damp I = V V^T
    del H
    v = torch.diagonal(VsT).clone()  # (cols,)
    VsT /= v.unsqueeze(1)  # Vs^T, unit lower triangular: row k holds Vs[:, k]

    # Wt[k] starts at w_k and collects sum_j (w_j - q_j) Vs[j, k] over the columns j < k done.
    Wt = W0t.clone()
    T = torch.empty_like(Wt)  # codes - zero, in processing order
    D = torch.empty_like(Wt)  # w_j - q_j (original weights minus grid values)
    LOt = -Zt  # clamp bounds on round(w / scale): codes 0 .. maxq, minus zero
    HIt = maxq - Zt
    s_rows, lo_rows, hi_rows = St.unbind(0), LOt.unbind(0), HIt.unbind(0)
    w_rows, w0_rows, t_rows, d_rows = Wt.unbind(0), W0t.unbind(0), T.unbind(0), D.unbind(0)
    # round(x) as (x + 1.5 * 2^23) - 1.5 * 2^23: IEEE float32 rounds half to even as torch.round
    # does, exactly for |x| < 2^22 (larger values end up clamped anyway). Unlike torch.round it
    # never starts a thread pool for a single column, which costs milliseconds on a busy CPU.
    magic = Wt.new_full((rows,), _ROUND_MAGIC)

    B = spec.blocksize
    for i1 in range(0, cols, B):
        i2 = min(i1 + B, cols)
        if grouped and not static:
            first, last = -(-i1 // g), (i2 - 1) // g  # groups that start in this block
            if first <= last:
                end = min(cols, (last + 1) * g)
                Wg = _reference_state(W0t, Wt, VsT.t(), i1, end)
                s, z = _fit_group_rows(Wg, first * g - i1, g, bits, spec.sym)
                St[first : last + 1] = s
                Zt[first : last + 1] = z
                torch.neg(z, out=LOt[first : last + 1])
                torch.sub(maxq, z, out=HIt[first : last + 1])
        for j1 in range(i1, i2, _SUBBLOCK):
            j2 = min(j1 + _SUBBLOCK, i2)
            for j in range(j1, j2):
                w, t, k = w_rows[j], t_rows[j], gp[j]
                s = s_rows[k]
                if j > j1:  # the updates from this sub-block's earlier columns, pulled in now
                    w.addmv_(D[j1:j].t(), VsT[j, j1:j])
                torch.addcdiv(magic, w, s, out=t)
                t.sub_(_ROUND_MAGIC).clamp_(lo_rows[k], hi_rows[k])  # codes - zero
                torch.addcmul(w0_rows[j], t, s, value=-1, out=d_rows[j])  # w_j - q_j
            if j2 < i2:
                Wt[j2:i2].addmm_(VsT[j2:i2, j1:j2], D[j1:j2])
        if i2 < cols:
            Wt[i2:].addmm_(VsT[i2:, i1:i2], D[i1:i2])

    # The loss under the damped H is sum_j ||e_j||^2 with the reference's error terms
    # e_j = (w'_j - q_j) / U[j, j] = V[j, j] (w'_j - q_j); removing the damping's share
    # damp ||Q - W||^2 leaves tr((Q - W) H (Q - W)^T) without another (out x in x in) product.
    R = Wt.sub_(W0t).add_(D)  # w'_j - q_j = (w'_j - w_j) + (w_j - q_j)
    damped_loss = (torch.linalg.vector_norm(R, dim=1).double().square() * v.double().square()).sum().item()
    loss = damped_loss - damp * torch.linalg.vector_norm(D).double().item() ** 2
    del W0t, Wt, R, D

    # Integer codes back in W's layout and column order; the weights follow from them exactly.
    gp_t = torch.tensor(gp, device=dev)
    T += Zt[gp_t] if grouped else Zt  # codes
    codes_t = T.to(torch.uint8)
    del T
    if spec.act_order:
        invperm = torch.argsort(perm)
        codes_t, gp_t = codes_t.index_select(0, invperm), gp_t[invperm]
    qweight = codes_t.t().contiguous()
    scales, zeros = St.t().contiguous(), Zt.t().contiguous()
    weight = dequantize(qweight, scales.index_select(1, gp_t), zeros.index_select(1, gp_t))
    if not loss > 0.1 * damped_loss:
        # Most of the damped loss is the damping's own share (H nearly singular, or damp raised):
        # the difference would lose too many digits, so take the trace itself.
        loss = layer_loss(weight, W, H_in.to(dev))
    return QuantResult(weight, qweight, scales, zeros, gp_t, loss, damp)


def rtn(W, spec=QuantSpec(), H=None, loss_dtype=torch.float64):
    """Round W to the nearest point of its min-max grids (no error feedback).

    W: (out, in), any float dtype; groups are consecutive columns (act_order and static_groups
    play no role). H: optional (in, in) Hessian, only used for .loss (its product formed in
    loss_dtype, see layer_loss).
    Returns QuantResult; .loss is tr((Q - W) H (Q - W)^T), or ||Q - W||^2 when H is None.
    """
    _check_W(W)
    rows, cols = W.shape
    if H is not None:
        _check_H(H, cols)
    W32 = W.to(torch.float32)
    g = spec.group_size
    scales, zeros = group_params(W32, g, spec.bits, spec.sym)  # (rows, n_groups)
    if g == -1 or g >= cols:
        g_idx = torch.zeros(cols, dtype=torch.long, device=W.device)
    else:
        g_idx = torch.arange(cols, device=W.device) // g
    s, z = scales[:, g_idx], zeros[:, g_idx]
    codes = quantize(W32, s, z, spec.maxq)
    weight = dequantize(codes, s, z)
    loss = layer_loss(weight, W, None if H is None else H.to(W.device), loss_dtype)
    return QuantResult(weight, codes.to(torch.uint8), scales, zeros, g_idx, loss)
