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
  it keeps entries whose |τ| is >= the (P − int(P·K))-th smallest |τ| (torch.kthvalue, 1-based).
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
  T x (entries of one tensor) stack.
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
        total = None
        for _, sd in named:
            theta = _as_compute(sd[key], base[key])
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
        theta0 = _as_compute(base[key], base[key])
        tau_sum = None
        for _, sd in named:
            tau = _as_compute(sd[key], base[key]) - theta0
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

    def trimmed(key):  # T x numel, the trimmed task vectors of one tensor
        theta0 = _as_compute(base[key], base[key]).reshape(-1)
        tau = torch.stack([_as_compute(sd[key], base[key]).reshape(-1) - theta0 for _, sd in named])
        cut = torch.stack(cutoffs).to(tau).unsqueeze(1)
        return tau * (tau.abs() >= cut)

    # 2. elect: the majority sign settles entries whose trimmed sum is exactly zero
    votes = sum(int(torch.sign(trimmed(k).sum(dim=0)).sum(dtype=torch.int64)) for k in float_keys)
    majority = float((votes > 0) - (votes < 0))

    # 3. disjoint merge of the entries that agree with the elected sign
    def merge(key):
        tau = trimmed(key)                                           # T x numel
        sign = torch.sign(tau.sum(dim=0))                            # numel
        sign[sign == 0] = majority
        agree = torch.where(sign.unsqueeze(0) > 0, tau > 0, tau < 0)  # T x numel
        kept = tau * agree
        if merge_func == "sum":
            merged_tau = kept.sum(dim=0)
        elif merge_func == "mean":
            merged_tau = kept.sum(dim=0) / (kept != 0).sum(dim=0).clamp(min=1)
        else:  # "max"
            merged_tau = kept.abs().max(dim=0).values * sign
        theta0 = _as_compute(base[key], base[key])
        return theta0 + scaling_factor * merged_tau.reshape(theta0.shape)

    return _assemble(base, float_keys, merge)


def _magnitude_cutoff(base: StateDict, expert: StateDict, float_keys: list[str], keep: float) -> torch.Tensor:
    """|τ| at the trim boundary of one task vector flattened over float_keys (a 0-dim tensor)."""
    sizes = [base[k].numel() for k in float_keys]
    P = sum(sizes)
    device = base[float_keys[0]].device
    flat = torch.empty(P, dtype=_compute_dtype(base[float_keys[0]]), device=device)
    offset = 0
    for key, size in zip(float_keys, sizes):
        tau = _as_compute(expert[key], base[key]) - _as_compute(base[key], base[key])
        flat[offset:offset + size] = tau.reshape(-1).to(flat)
        offset += size
    k = P - int(P * keep)  # kthvalue is 1-based: keep everything at or above the k-th smallest
    if k == 0:
        return torch.zeros((), dtype=flat.dtype, device=device)
    return flat.abs_().kthvalue(k).values


def _assemble(base: StateDict, float_keys: list[str],
              merge: Callable[[str], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Base's keys in order: merged floating entries cast to base's dtype, the rest copied."""
    floats = set(float_keys)
    return {key: merge(key).to(value.dtype) if key in floats else value.detach().clone()
            for key, value in base.items()}


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
    for key, value in base.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"base[{key!r}] is not a tensor ({type(value).__name__})")
    for name, sd in named:
        for key in base:
            if key not in sd:
                raise ValueError(f"expert {name!r} lacks key {key!r} that base has")
        for key in sd:
            if key not in base:
                raise ValueError(f"expert {name!r} has key {key!r} that base lacks")
        for key, theta0 in base.items():
            theta = sd[key]
            if not isinstance(theta, torch.Tensor):
                raise ValueError(f"expert {name!r}: {key!r} is not a tensor ({type(theta).__name__})")
            if theta.shape != theta0.shape:
                raise ValueError(f"expert {name!r}: key {key!r} has shape {tuple(theta.shape)}, "
                                 f"base has {tuple(theta0.shape)}")
            if theta.dtype != theta0.dtype:
                raise ValueError(f"expert {name!r}: key {key!r} has dtype {theta.dtype}, base has {theta0.dtype}")
            if not theta0.is_floating_point() and not torch.equal(theta.to(theta0.device), theta0):
                raise ValueError(f"expert {name!r}: non-floating key {key!r} ({theta0.dtype}) differs "
                                 f"from base; integer entries are copied, not merged, so they must agree")
    return [key for key, value in base.items() if value.is_floating_point()]


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
