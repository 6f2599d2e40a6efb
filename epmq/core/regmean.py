"""RegMean: dataless knowledge fusion by a per-layer regression (Jin et al., ICLR 2023).

Experts θ_1..θ_T were fine-tuned from one base on tasks 1..T. For a linear layer, expert t has weight
W_t (out x in), and on task t's data, inside expert t, the layer sees inputs x (in,). Its Gram matrix
is the mean outer product over the N_t tokens that reach the layer:

    G_t = (1/N_t) Σ x xᵀ                                             (in x in)

RegMean looks for one W that reproduces every expert's outputs on that expert's own inputs:

    min over W   Σ_t (1/N_t) ||W X_t − W_t X_t||²   =   Σ_t tr((W − W_t) G_t (W − W_t)ᵀ)

(X_t in x N_t stacks the inputs), a quadratic whose minimiser solves W (Σ_t G_t) = Σ_t W_t G_t. The
paper shrinks the off-diagonal entries of each Gram toward its diagonal, with ratio alpha
(FusionBench's CLIP setting: alpha = 0.6, 256 examples per task):

    G̃_t = alpha · G_t + (1 − alpha) · diag(G_t)
    W   = (Σ_t W_t G̃_t) (Σ_t G̃_t)⁻¹

alpha = 1 is the least-squares fit above; alpha = 0 forgets the correlations between input features,
so column j of W becomes the average of the experts' columns j weighted by each expert's mean
squared input j. Every W above minimises Σ_t tr((W − W_t) G̃_t (W − W_t)ᵀ), the property the tests check.

Only the weights of linear layers whose Grams were collected are merged this way; every other
floating entry (biases, layer norms, embeddings) is the simple average of the experts, and integer
buffers are copied from the base (epmq.core.merge.simple_average).

Singular systems. Σ_t G̃_t is positive semi-definite; it is singular when an input feature is zero on
every task (a dead column) or, at alpha = 1, when the tasks together have fewer tokens than inputs.
Then the solve adds a ridge δ = 1e-8 · mean(diag Σ_t G̃_t) pulled toward the plain mean W̄ of the
experts, W = (Σ_t W_t G̃_t + δ W̄)(Σ_t G̃_t + δ I)⁻¹, growing δ tenfold until the Cholesky factor
exists. A ridge toward zero would zero dead columns; this one keeps W̄ there (the only information
left) and moves the well-determined columns by O(δ). The choice is logged.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from epmq.core.merge import check_experts, simple_average

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]

RIDGE = 1e-8          # first ridge, as a fraction of mean(diag Σ_t G̃_t)
RIDGE_TRIES = 8       # ridge grows tenfold per try: 1e-8 .. 1e-1 of the mean diagonal


def reduce_non_diagonal(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = alpha · G + (1 − alpha) · diag(G): shrink the off-diagonal entries by alpha.

    Args:
        G: Gram matrix (in x in).
        alpha: kept share of the off-diagonal entries, in [0, 1] (1 keeps G, 0 keeps its diagonal).
    Returns:
        G̃ (in x in), G's dtype and device.
    """
    alpha = _check_alpha(alpha)
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be a square matrix (in x in), got shape {tuple(G.shape)}")
    G_tilde = G * alpha
    G_tilde.diagonal().copy_(G.diagonal())  # alpha·G_jj + (1 − alpha)·G_jj = G_jj
    return G_tilde


@torch.no_grad()
def gram_matrices(model: nn.Module, layers: Mapping[str, nn.Linear],
                  batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """G = (1/N) Σ x xᵀ over every token x that reaches each linear layer while model runs on batches.

    Args:
        model: run as model(**batch), in eval mode and under no_grad (its mode is restored after).
        layers: state-dict key of the layer's weight (e.g. "encoder.layers.0.mlp.fc1.weight") ->
            the nn.Linear inside model. Inputs of shape (..., in) count each leading index as a token.
        batches: dicts of forward keyword arguments; tensors move to the device of model's parameters.
    Returns:
        key -> G (in x in, float64, on the device the layer's inputs were on), averaged over the N
        tokens the layer saw across all batches.
    """
    if not layers:
        raise ValueError("layers is empty: give weight key -> nn.Linear for at least one layer")
    for key, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layers[{key!r}] must be an nn.Linear, got {type(layer).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None

    sums: dict[str, torch.Tensor] = {}   # key -> Σ x xᵀ (in x in, float64)
    tokens = dict.fromkeys(layers, 0)    # key -> N

    def accumulate(key, layer):
        def hook(module, args, output):
            x = args[0]
            if x.shape[-1] != layer.in_features:
                raise ValueError(f"layer {key!r}: input has {x.shape[-1]} features, expected {layer.in_features}")
            X = x.detach().reshape(-1, layer.in_features).to(torch.float64)  # N_batch x in
            sums[key] = X.T @ X if key not in sums else sums[key].addmm_(X.T, X)
            tokens[key] += X.shape[0]
        return hook

    was_training = model.training
    handles = []
    try:
        handles = [layer.register_forward_hook(accumulate(key, layer)) for key, layer in layers.items()]
        model.eval()
        for i, batch in enumerate(batches):
            _check_batch(i, batch)
            model(**{name: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v
                     for name, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    unseen = [key for key, n in tokens.items() if n == 0]
    if unseen:
        raise ValueError(f"no token reached layer(s) {unseen} (no batches, or the forward skips them)")
    return {key: sums[key] / tokens[key] for key in layers}


@torch.no_grad()
def regmean(base: StateDict, experts: Mapping[str, StateDict], grams: Mapping[str, Mapping[str, torch.Tensor]],
            alpha: float = 0.6) -> dict[str, torch.Tensor]:
    """Merge experts with RegMean: closed form for weights with Grams, simple average elsewhere.

    Args:
        base: θ₀, name -> tensor; supplies the key order, dtypes and integer buffers.
        experts: task -> state dict with base's keys and shapes.
        grams: task -> {weight key -> G_t (in x in)}, the same tasks as experts and the same keys for
            every task; each key a 2-D floating weight of base whose in dimension matches G_t.
        alpha: off-diagonal share kept in each G_t, in [0, 1] (0.6 in FusionBench's CLIP runs).
    Returns:
        a new state dict with base's keys, order and dtypes. For a key with Grams:
        W = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹ solved in float64, cast to the weight's dtype.
    """
    alpha = _check_alpha(alpha)
    tasks = _check_tasks(experts, grams)
    check_experts(base, experts)
    keys = _check_grams(base, grams, tasks)

    # cheap part first: it also checks dtypes and that integer buffers agree across experts
    others = simple_average({k: v for k, v in base.items() if k not in keys},
                            {t: {k: v for k, v in experts[t].items() if k not in keys} for t in tasks})
    merged = {key: _solve(key, [experts[t][key] for t in tasks], [grams[t][key] for t in tasks], alpha)
              .to(base[key].dtype) for key in keys}
    return {key: merged[key] if key in merged else others[key] for key in base}


def _solve(key: str, Ws: list[torch.Tensor], Gs: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """W = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹ in float64 (out x in), ridged toward the mean W̄ if singular."""
    device = Ws[0].device
    S = torch.zeros_like(Gs[0], dtype=torch.float64, device=device)       # Σ_t G̃_t      in x in
    B = torch.zeros_like(Ws[0], dtype=torch.float64, device=device)       # Σ_t W_t G̃_t  out x in
    for W_t, G_t in zip(Ws, Gs):
        G_tilde = reduce_non_diagonal(G_t.to(device, torch.float64), alpha)
        W_t = W_t.to(device, torch.float64)
        S += G_tilde
        B.addmm_(W_t, G_tilde)
    # S is symmetric, so W S = B  <=>  S Wᵀ = Bᵀ
    L, info = torch.linalg.cholesky_ex(S)
    if info == 0:
        return torch.cholesky_solve(B.T, L).T
    W_bar = torch.stack([W_t.to(device, torch.float64) for W_t in Ws]).mean(dim=0)
    scale = S.diagonal().mean().item()
    scale = scale if scale > 0 else 1.0  # every Gram zero: any ridge gives W̄
    for i in range(RIDGE_TRIES):
        delta = RIDGE * 10 ** i * scale
        L, info = torch.linalg.cholesky_ex(S + delta * torch.eye(S.shape[0], dtype=S.dtype, device=device))
        if info == 0:
            dead = int((S.diagonal() == 0).sum())
            log.warning("regmean: %s: Σ G̃ is singular (%d dead input columns); solved with ridge "
                        "%.3g toward the experts' mean", key, dead, delta)
            return torch.cholesky_solve((B + delta * W_bar).T, L).T
    raise ValueError(f"regmean: {key!r}: Σ G̃ stays singular with ridge up to "
                     f"{RIDGE * 10 ** (RIDGE_TRIES - 1):g} · mean diagonal; check its Grams")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) \
            or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (reduce_non_diagonal_ratio) must be in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_batch(i: int, batch) -> None:
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"batch {i} is empty or not a dict of forward arguments: {type(batch).__name__}")
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and (value.numel() == 0 or (value.dim() > 0 and value.shape[0] == 0)):
            raise ValueError(f"batch {i}: {name!r} is empty (shape {tuple(value.shape)})")


def _check_tasks(experts, grams) -> list[str]:
    """experts' task order; raises when grams covers other tasks."""
    for field, value in (("experts", experts), ("grams", grams)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a dict task -> ..., got {type(value).__name__}")
    if not experts:
        raise ValueError("experts is empty: at least one task is needed")
    missing = [t for t in experts if t not in grams]
    extra = [t for t in grams if t not in experts]
    if missing or extra:
        raise ValueError(f"experts and grams must cover the same tasks: grams lacks {missing}, "
                         f"grams has extra {extra}")
    return list(experts)


def _check_grams(base: StateDict, grams: Mapping[str, Mapping[str, torch.Tensor]], tasks: list[str]) -> list[str]:
    """The weight keys with Grams, in base's order, after checking every G_t."""
    first = tasks[0]
    keys = set(grams[first])
    for task in tasks:
        if set(grams[task]) != keys:
            missing = sorted(keys - set(grams[task]))
            extra = sorted(set(grams[task]) - keys)
            raise ValueError(f"grams[{task!r}] must have the same keys as grams[{first!r}]: "
                             f"lacks {missing}, has extra {extra}")
    for key in sorted(keys):
        if key not in base:
            raise ValueError(f"grams has key {key!r} that base lacks")
        W = base[key]
        if W.dim() != 2 or not W.is_floating_point():
            raise ValueError(f"grams key {key!r} must be a 2-D floating weight (out x in), base has "
                             f"shape {tuple(W.shape)} and dtype {W.dtype}")
        for task in tasks:
            G = grams[task][key]
            if not isinstance(G, torch.Tensor) or tuple(G.shape) != (W.shape[1], W.shape[1]):
                shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
                raise ValueError(f"grams[{task!r}][{key!r}] must have shape {(W.shape[1], W.shape[1])} "
                                 f"(in x in of weight {tuple(W.shape)}), got {shape}")
            if not torch.isfinite(G).all():
                raise ValueError(f"grams[{task!r}][{key!r}] has non-finite entries (NaN or inf)")
    return [key for key in base if key in keys]
