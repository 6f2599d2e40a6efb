"""Model merging over state dicts: simple average, task arithmetic, TIES.

Notation: base θ₀, experts θ₁..θ_T, task vectors τ_t = θ_t − θ₀ over every floating-point entry.

    simple average   θ_m = (1/T) Σ_t θ_t
    task arithmetic  θ_m = θ₀ + s Σ_t τ_t
    TIES             θ_m = θ₀ + s · merge(trim(τ_1) .. trim(τ_T))

The semantics follow FusionBench's implementations for CLIP (tanganke/fusion_bench:
method/simple_average.py, method/task_arithmetic, method/ties_merging/ties_merging_utils.py):

- Sums run in the experts' order: simple average adds θ_t then divides by T; task arithmetic adds
  τ_t one at a time, scales by s and adds θ₀. Arithmetic is in float32 at least (FusionBench works
  in the checkpoint's dtype, the same thing for float32 checkpoints) and the result is cast back.
- TIES trims each task vector over the whole model (all floating entries flattened as one vector
  of P entries): with K = threshold/100 when threshold > 1, else threshold itself as a fraction,
  it keeps entries whose |τ| is >= the (P − int(P·K))-th smallest |τ| (1-based, as kthvalue).
  Without ties at the cut that keeps int(P·K) + 1 entries, and ties at the cut are all kept.
  When int(P·K) = P (threshold 100) everything is kept (FusionBench's kthvalue(0) would fail).
- Signs are elected per entry as sign(Σ_t trimmed τ_t); entries whose sum is exactly 0 take the
  majority sign, sign(Σ over all entries of the elected signs). An expert's entry is kept where
  it agrees: τ > 0 where the elected sign is positive, τ < 0 elsewhere (so zeros never count).
  "sum" adds the kept entries, "mean" divides by their number (at least 1), "max" takes the
  largest kept magnitude times the elected sign.
- Differences, all deliberate: non-floating entries (integer buffers such as position_ids) are
  checked equal across models and copied from θ₀, and P counts floating entries only
  (FusionBench would flatten such buffers as zeros into P); the majority sign is counted in int64
  (exact) rather than in a float sum.
- Memory: FusionBench stacks all T task vectors as one T x P matrix. Here one flattened task
  vector (P entries) exists at a time, to find its cut-off, and the rest runs key by key on a
  T x (entries of one tensor) buffer.

Lazy inputs: base and experts may be any Mapping name -> tensor. Every merge reads `sd[key]` only
when it works on that key and drops it before the next key, so a lazy mapping that reads one
tensor from disk per access (epmq.io.pool.LazyStateDict, from ExpertPool.lazy_expert / lazy_base;
ExpertPool.merge wires it) never has a whole expert in memory. A mapping that also offers
`spec(key) -> (torch.Size, torch.dtype)` is checked from those headers: of its tensors the checks
read only the non-floating ones (integer buffers, compared for equality). Simple average and task
arithmetic read every expert tensor once, TIES three times (cut-off, sign vote, merge). The result
does not depend on how the inputs are held: lazy views and loaded state dicts give the same
tensors, bit for bit.

Peak memory. P floating entries per model, T experts, b bytes per stored entry (4 for float32, 2
for bfloat16), c bytes per entry of the arithmetic (4: float32; 8 for float64 models), n entries
of the largest tensor. Every merge returns a new state dict of P·b bytes. Loaded state dicts cost
the caller (T + 1)·P·b before the merge starts; lazy views hold at most one tensor of each model
(n·b), of the key being merged. The merge's own working memory comes on top:

    simple average   about n·c          the running sum (each θ_t in float32 for a moment)
    task arithmetic  about 3·n·c        θ₀, Σ τ and τ_t
    TIES             max(P·c + a few n·c, T·n·(c + 3) + a few n·c)
                     first the cut-offs, before the output exists: one flattened |τ_t| of P
                     entries at a time, partitioned in place (torch.kthvalue, still used off the
                     CPU, adds a copy and an int64 index per entry: P·(c + 8) bytes more); then,
                     key by key, one T x n buffer of trimmed τ (filled row by row, in place) and
                     three T x n boolean masks for the sign vote and the disjoint merge.

In real models T·n is well below P (ViT-L/14: n = 4.2M of P = 304M), so with lazy views TIES needs
one float32 copy of a model beyond its output, whatever T, and the other two merges a few copies
of the largest tensor. Measured by benchmarks/merge_memory.py (Llama-shaped, bfloat16, P = 24.8M,
n = 4.1M, T = 3; peak RSS growth in MiB, the 47 MiB output included), loaded vs lazy: simple
average 198 vs 63, task arithmetic 245 vs 95, TIES 338 vs 156.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

StateDict = Mapping[str, torch.Tensor]
Experts = Sequence[StateDict] | Mapping[str, StateDict]

MERGE_FUNCS = ("sum", "mean", "max")


@torch.no_grad()
def simple_average(base: StateDict, experts: Experts) -> dict[str, torch.Tensor]:
    """θ_m = (1/T) Σ_t θ_t over floating entries; base supplies checks and integer buffers.

    Args:
        base: θ₀, name -> tensor.
        experts: θ_1..θ_T as a list of state dicts or a dict task -> state dict.
    Returns:
        a new state dict with base's keys, order and dtypes.
    """
    named = _named_experts(experts)
    float_keys = _check_pool(base, named)

    def average(key):
        like = _like(base, key)  # base's device and dtype; θ₀'s values are not needed
        total = None
        for _, sd in named:
            theta = _as_compute(sd[key], like)
            total = theta if total is None else total + theta
        return total / len(named)

    return _assemble(base, float_keys, average)


@torch.no_grad()
def task_arithmetic(base: StateDict, experts: Experts, scaling_factor: float = 0.3) -> dict[str, torch.Tensor]:
    """θ_m = θ₀ + scaling_factor · Σ_t (θ_t − θ₀) over floating entries.

    Args:
        base: θ₀; experts: list or dict task -> state dict; scaling_factor: s >= 0.
    Returns:
        a new state dict with base's keys, order and dtypes.
    """
    scaling_factor = _check_scaling(scaling_factor)
    named = _named_experts(experts)
    float_keys = _check_pool(base, named)

    def merge(key):
        raw0 = base[key]  # read once per key (a lazy base reads from disk on every access)
        theta0 = _as_compute(raw0, raw0)
        tau_sum = None
        for _, sd in named:
            tau = _as_compute(sd[key], raw0) - theta0
            tau_sum = tau if tau_sum is None else tau_sum + tau
        return theta0 + scaling_factor * tau_sum

    return _assemble(base, float_keys, merge)


@torch.no_grad()
def ties_merging(base: StateDict, experts: Experts, scaling_factor: float = 0.3,
                 threshold: float = 20, merge_func: str = "sum") -> dict[str, torch.Tensor]:
    """TIES merging (trim, elect sign, disjoint merge), FusionBench's conventions (module doc).

    Args:
        base: θ₀; experts: list or dict task -> state dict.
        scaling_factor: s >= 0 applied to the merged task vector.
        threshold: share of each task vector's entries kept, in (0, 100]; > 1 means percent
            (20 keeps the top 20%), <= 1 a fraction (FusionBench's rule, so 1 keeps everything).
        merge_func: "sum", "mean" or "max" over the entries that agree with the elected sign.
    Returns:
        a new state dict with base's keys, order and dtypes.
    """
    scaling_factor = _check_scaling(scaling_factor)
    keep = _check_threshold(threshold)
    merge_func = _check_merge_func(merge_func)
    named = _named_experts(experts)
    float_keys = _check_pool(base, named)
    if not float_keys:
        return _assemble(base, float_keys, None)

    # 1. trim: one cut-off per task vector over the whole model, one flattened vector at a time
    cutoffs = [_magnitude_cutoff(base, sd, float_keys, keep) for _, sd in named]

    def trimmed(key, raw0):  # T x numel, the trimmed task vectors of one tensor; raw0 = base[key]
        theta0 = _as_compute(raw0, raw0).reshape(-1)                                 # numel
        tau = torch.empty(len(named), theta0.numel(), dtype=theta0.dtype, device=theta0.device)
        for row, (_, sd), cut in zip(tau, named, cutoffs):
            # filled row by row, in place: one expert tensor and one T x numel buffer at a time
            torch.sub(_as_compute(sd[key], raw0).reshape(-1), theta0, out=row)
            row.mul_(row.abs() >= cut.to(row))
        return tau

    # 2. elect: the majority sign settles entries whose trimmed sum is exactly zero
    votes = sum(int(torch.sign(trimmed(k, base[k]).sum(dim=0)).sum(dtype=torch.int64)) for k in float_keys)
    majority = float((votes > 0) - (votes < 0))

    # 3. disjoint merge of the entries that agree with the elected sign
    def merge(key):
        raw0 = base[key]
        tau = trimmed(key, raw0)                                     # T x numel
        sign = torch.sign(tau.sum(dim=0))                            # numel
        sign[sign == 0] = majority
        agree = torch.where(sign.unsqueeze(0) > 0, tau > 0, tau < 0)  # T x numel
        kept = tau.mul_(agree)  # in place: tau itself is not needed again
        if merge_func == "sum":
            merged_tau = kept.sum(dim=0)
        elif merge_func == "mean":
            merged_tau = kept.sum(dim=0) / (kept != 0).sum(dim=0).clamp(min=1)
        else:  # "max"
            merged_tau = kept.abs().max(dim=0).values * sign
        theta0 = _as_compute(raw0, raw0)
        return theta0 + scaling_factor * merged_tau.reshape(theta0.shape)

    return _assemble(base, float_keys, merge)


def _magnitude_cutoff(base: StateDict, expert: StateDict, float_keys: list[str], keep: float) -> torch.Tensor:
    """|τ| at the trim boundary of one task vector flattened over float_keys (a 0-dim tensor)."""
    sizes = [_spec(base, k)[0].numel() for k in float_keys]
    P = sum(sizes)
    like = _like(base, float_keys[0])
    flat = torch.empty(P, dtype=_compute_dtype(like), device=like.device)  # P, |τ| after abs_
    offset = 0
    for key, size in zip(float_keys, sizes):
        # a call, not loop variables: this key's tensors are freed before the next key is read
        flat[offset:offset + size] = _task_vector(base, expert, key).reshape(-1).to(flat)
        offset += size
    k = P - int(P * keep)  # 1-based: keep everything at or above the k-th smallest
    if k == 0:
        return torch.zeros((), dtype=flat.dtype, device=like.device)
    return _kth_smallest(flat.abs_(), k)


def _task_vector(base: StateDict, expert: StateDict, key: str) -> torch.Tensor:
    """τ = θ_t − θ₀ of one key, in the arithmetic dtype on base's device."""
    raw0 = base[key]
    return _as_compute(expert[key], raw0) - _as_compute(raw0, raw0)


def _kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of the 1-D x as a new 0-dim tensor; reorders x in place.

    Same value as torch.kthvalue(x, k).values. On the CPU numpy's in-place partition needs no
    memory beyond x, where kthvalue copies x and adds an int64 index per entry (3·P·4 bytes for
    float32 more than x itself, the largest buffer of a TIES merge otherwise).
    """
    if x.device.type != "cpu":
        return x.kthvalue(k).values
    x.numpy().partition(k - 1)  # x[k - 1] is now the k-th smallest, smaller ones before it
    return x[k - 1].clone()     # clone: a view would keep all of x alive


def _assemble(base: StateDict, float_keys: list[str],
              merge: Callable[[str], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Base's keys in order: merged floating entries cast to base's dtype, the rest copied."""
    floats = set(float_keys)
    # keys, not items(): a lazy base would read every tensor just to learn its dtype
    return {key: merge(key).to(_spec(base, key)[1]) if key in floats else base[key].detach().clone()
            for key in base}


def _is_lazy(sd: StateDict) -> bool:
    """Whether sd tells shapes and dtypes without reading tensors (a `spec(key)` method)."""
    return callable(getattr(sd, "spec", None))


def _spec(sd: StateDict, key: str) -> tuple[torch.Size, torch.dtype]:
    """(shape, dtype) of sd[key]: from sd.spec when sd has one (nothing read), else the tensor's."""
    if _is_lazy(sd):
        return sd.spec(key)
    t = sd[key]
    return t.shape, t.dtype


def _like(base: StateDict, key: str) -> torch.Tensor:
    """A tensor with base[key]'s dtype and device, all _as_compute needs of it: base[key] itself,
    or for a lazy base (whose reads land on the CPU) an empty CPU tensor of its dtype, unread."""
    if _is_lazy(base):
        return torch.empty(0, dtype=_spec(base, key)[1])
    return base[key]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _as_compute(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t on like's device in the arithmetic dtype (float32 at least)."""
    return t.detach().to(like.device, _compute_dtype(like))


def check_experts(base: StateDict, experts: Experts) -> list[str]:
    """Check every expert against base (keys, shapes, dtypes, equal integer buffers) before any
    merge; returns base's floating-point keys in base's order. ValueError names the key and expert."""
    return _check_pool(base, _named_experts(experts))


def _named_experts(experts: Experts) -> list[tuple[str, StateDict]]:
    """(name, state dict) pairs: dict keys as names, or experts[i] for a list."""
    if isinstance(experts, Mapping):
        named = [(str(name), sd) for name, sd in experts.items()]
    elif isinstance(experts, Sequence) and not isinstance(experts, (str, bytes)):
        named = [(f"experts[{i}]", sd) for i, sd in enumerate(experts)]
    else:
        raise ValueError(f"experts must be a list of state dicts or a dict task -> state dict, "
                         f"got {type(experts).__name__}")
    if not named:
        raise ValueError("experts is empty: at least one expert state dict is needed")
    for name, sd in named:
        if not isinstance(sd, Mapping):
            raise ValueError(f"expert {name!r} must be a state dict (name -> tensor), got {type(sd).__name__}")
    return named


def _check_pool(base: StateDict, named: list[tuple[str, StateDict]]) -> list[str]:
    """Check every expert against base (keys, shapes, dtypes, equal integer buffers).

    Returns base's floating-point keys in base's order. Raises ValueError naming the first
    offending key and the expert.
    """
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a state dict (name -> tensor), got {type(base).__name__}")
    if not _is_lazy(base):
        for key, value in base.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"base[{key!r}] is not a tensor ({type(value).__name__})")
    specs0 = {key: _spec(base, key) for key in base}  # key -> (shape, dtype) of θ₀
    for name, sd in named:
        for key in base:
            if key not in sd:
                raise ValueError(f"expert {name!r} lacks key {key!r} that base has")
        for key in sd:
            if key not in base:
                raise ValueError(f"expert {name!r} has key {key!r} that base lacks")
        lazy = _is_lazy(sd)
        for key, (shape0, dtype0) in specs0.items():
            if lazy:  # headers only: a float tensor's values are not needed here
                theta, (shape, dtype) = None, sd.spec(key)
            else:
                theta = sd[key]
                if not isinstance(theta, torch.Tensor):
                    raise ValueError(f"expert {name!r}: {key!r} is not a tensor ({type(theta).__name__})")
                shape, dtype = theta.shape, theta.dtype
            if shape != shape0:
                raise ValueError(f"expert {name!r}: key {key!r} has shape {tuple(shape)}, "
                                 f"base has {tuple(shape0)}")
            if dtype != dtype0:
                raise ValueError(f"expert {name!r}: key {key!r} has dtype {dtype}, base has {dtype0}")
            if not dtype0.is_floating_point:
                theta = sd[key] if theta is None else theta
                theta0 = base[key]
                if not torch.equal(theta.to(theta0.device), theta0):
                    raise ValueError(f"expert {name!r}: non-floating key {key!r} ({dtype0}) differs "
                                     f"from base; integer entries are copied, not merged, so they must agree")
    return [key for key, (_, dtype0) in specs0.items() if dtype0.is_floating_point]


def _check_scaling(scaling_factor) -> float:
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real) \
            or not math.isfinite(scaling_factor) or scaling_factor < 0:
        raise ValueError(f"scaling_factor must be a finite number >= 0, got {scaling_factor!r}")
    return float(scaling_factor)


def _check_threshold(threshold) -> float:
    """threshold in (0, 100] -> kept fraction K (FusionBench: > 1 is percent, <= 1 a fraction)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
            or not (0 < threshold <= 100):
        raise ValueError(f"threshold must be in (0, 100] (percent kept; <= 1 is read as a "
                         f"fraction), got {threshold!r}")
    return threshold / 100 if threshold > 1 else float(threshold)


def _check_merge_func(merge_func) -> str:
    if merge_func not in MERGE_FUNCS:
        raise ValueError(f"merge_func must be one of {MERGE_FUNCS}, got {merge_func!r}")
    return merge_func


@dataclass(frozen=True)
class SimpleAverage:
    """Hydra target for simple_average: `SimpleAverage()(base, experts) -> state dict`."""

    def __call__(self, base: StateDict, experts: Experts) -> dict[str, torch.Tensor]:
        return simple_average(base, experts)


@dataclass(frozen=True)
class TaskArithmetic:
    """Hydra target for task_arithmetic: θ₀ + scaling_factor · Σ τ_t."""

    scaling_factor: float = 0.3

    def __post_init__(self):
        _check_scaling(self.scaling_factor)

    def __call__(self, base: StateDict, experts: Experts) -> dict[str, torch.Tensor]:
        return task_arithmetic(base, experts, self.scaling_factor)


@dataclass(frozen=True)
class TiesMerging:
    """Hydra target for ties_merging: trim to the top `threshold`%, elect signs, merge, scale."""

    scaling_factor: float = 0.3
    threshold: float = 20
    merge_func: str = "sum"

    def __post_init__(self):
        _check_scaling(self.scaling_factor)
        _check_threshold(self.threshold)
        _check_merge_func(self.merge_func)

    def __call__(self, base: StateDict, experts: Experts) -> dict[str, torch.Tensor]:
        return ties_merging(base, experts, self.scaling_factor, self.threshold, self.merge_func)
