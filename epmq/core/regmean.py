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

Memory. Both sums are linear in the tasks, so RegMeanSums adds one task at a time and the solve needs
only S = Σ_t G̃_t, one per distinct layer input (a block's query, key and value projections read one
tensor, so they share one Gram and one S), and B = Σ_t W_t G̃_t, one per weight: memory independent
of T. A task's Grams may be stored in float32 (gram_matrices' dtype), and the sums too (RegMeanSums'
dtype); each task's terms are formed and added in float64, and the solve runs in float64.

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
from collections.abc import Callable, Iterable, Iterator, Mapping

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
def gram_matrices(model: nn.Module, layers: Mapping[str, nn.Linear], batches: Iterable[Mapping[str, torch.Tensor]],
                  dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """G = (1/N) Σ x xᵀ over every token x that reaches each linear layer while model runs on batches.

    Args:
        model: run as model(**batch), in eval mode and under no_grad (its mode is restored after).
        layers: state-dict key of the layer's weight (e.g. "encoder.layers.0.mlp.fc1.weight") ->
            the nn.Linear inside model. Inputs of shape (..., in) count each leading index as a token.
        batches: dicts of forward keyword arguments; tensors move to the device of model's parameters.
        dtype: of the running sums and of the result (float32 halves float64's memory).
    Returns:
        key -> G (in x in, `dtype`, on the device the layer's inputs were on), averaged over the N
        tokens the layer saw across all batches. Layers called one after another on one input tensor
        (a block's query, key and value projections) get one G object, computed once.
    """
    if not layers:
        raise ValueError("layers is empty: give weight key -> nn.Linear for at least one layer")
    for key, layer in layers.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layers[{key!r}] must be an nn.Linear, got {type(layer).__name__}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else None

    sums: dict[str, torch.Tensor] = {}   # owner key -> Σ x xᵀ (in x in)
    tokens = dict.fromkeys(layers, 0)    # key -> N
    owner: dict[str, str] = {}           # key -> the key whose Gram it shares (itself unless its input is shared)
    last: dict = {}                      # the input the previous hook saw, and its owner

    def accumulate(key, layer):
        def hook(module, args, output):
            x = args[0]
            if x.shape[-1] != layer.in_features:
                raise ValueError(f"layer {key!r}: input has {x.shape[-1]} features, expected {layer.in_features}")
            # identity, not data_ptr: `last` holds the tensor, so no new tensor can take its place meanwhile
            mine = last["owner"] if last.get("x") is x else key
            if owner.setdefault(key, mine) != mine:
                raise ValueError(f"layer {key!r} shares its input with {owner[key]!r} in one batch but not in another")
            last.update(x=x, owner=mine)
            tokens[key] += x.numel() // layer.in_features
            if mine == key:
                X = x.detach().reshape(-1, layer.in_features).to(dtype)  # N_batch x in
                sums[key] = X.T @ X if key not in sums else sums[key].addmm_(X.T, X)
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
            last.clear()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    unseen = [key for key, n in tokens.items() if n == 0]
    if unseen:
        raise ValueError(f"no token reached layer(s) {unseen} (no batches, or the forward skips them)")
    grams = {key: G.div_(tokens[key]) for key, G in sums.items()}
    return {key: grams[owner[key]] for key in layers}


class RegMeanSums:
    """S = Σ_t G̃_t per distinct layer input and B = Σ_t W_t G̃_t per weight, added one task at a time.

    Memory is independent of the number of tasks: the sums plus the task being added. Keys whose Grams are
    one tensor object (gram_matrices' shared inputs) share one S.

    Args:
        alpha: off-diagonal share kept in each G_t, in [0, 1].
        dtype: storage of S and B. Each task's G̃_t and W_t G̃_t are formed in float64 and the solve runs in
            float64 whatever it is; float32 storage halves the memory, for an error of the order of the one
            storing each G_t in float32 already brings (measured at ViT-B/32 shapes: README, the comparison job).
    """

    def __init__(self, alpha: float = 0.6, dtype: torch.dtype = torch.float64):
        self.alpha = _check_alpha(alpha)
        self.dtype = dtype
        self.tasks: list[str] = []
        self.owner: dict[str, str] = {}        # weight key -> the key of its S
        self.S: dict[str, torch.Tensor] = {}   # owner key -> Σ_t G̃_t       in x in
        self.B: dict[str, torch.Tensor] = {}   # weight key -> Σ_t W_t G̃_t  out x in

    @torch.no_grad()
    def add(self, task: str, weights: Mapping[str, torch.Tensor], grams: Mapping[str, torch.Tensor]) -> None:
        """Add task t: its weights W_t (key -> out x in) and Grams G_t (key -> in x in, any floating dtype).

        Every task must bring the same Gram keys, shared the same way."""
        owners = _owners(grams)
        if self.tasks and set(owners) != set(self.owner):
            raise ValueError(f"grams[{task!r}] must have the same keys as grams[{self.tasks[0]!r}]: lacks "
                             f"{sorted(set(self.owner) - set(owners))}, has extra {sorted(set(owners) - set(self.owner))}")
        if self.tasks and owners != self.owner:
            key = next(k for k in owners if owners[k] != self.owner[k])
            raise ValueError(f"grams[{task!r}][{key!r}] shares its Gram differently than for task {self.tasks[0]!r}")
        for key, G in grams.items():
            _check_gram(task, key, weights.get(key), G)
        for owner, keys in _groups(owners).items():
            G_tilde = reduce_non_diagonal(grams[owner].to(torch.float64), self.alpha)
            self._accumulate(self.S, owner, G_tilde)
            for key in keys:
                self._accumulate(self.B, key, weights[key].to(G_tilde.device, torch.float64) @ G_tilde)
        self.owner = owners
        self.tasks.append(task)

    def _accumulate(self, sums: dict, key: str, term: torch.Tensor) -> None:
        """sums[key] += term: added in float64, stored in self.dtype."""
        total = term if key not in sums else sums[key].to(torch.float64) + term
        sums[key] = total.to(self.dtype)

    def solutions(self, mean_weight: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yields (key, W = B S⁻¹ in float64, out x in), factorising each distinct S once; each sum is
        freed once used, so the sums can be solved once.

        mean_weight: key -> the experts' mean W̄ (out x in), asked only when S is singular (the ridge's pull).
        """
        if not self.tasks:
            raise ValueError("RegMeanSums: no task was added")
        for owner, keys in _groups(self.owner).items():
            L, delta = _factor(self.S.pop(owner).to(torch.float64), keys)
            for key in keys:
                B = self.B.pop(key).to(torch.float64)
                if delta:
                    B = B + delta * mean_weight(key).to(B.device, torch.float64)
                yield key, torch.cholesky_solve(B.T, L).T  # S is symmetric: W S = B  <=>  S Wᵀ = Bᵀ


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
    sums = RegMeanSums(alpha)
    for t in tasks:
        sums.add(t, experts[t], grams[t])
    merged = {key: W.to(base[key].dtype) for key, W in sums.solutions(
        lambda key: torch.stack([experts[t][key].to(torch.float64) for t in tasks]).mean(dim=0))}
    return {key: merged[key] if key in merged else others[key] for key in base}


def _factor(S: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, float]:
    """(L, δ): the Cholesky factor of S (δ = 0), or of S + δ I with the first δ of the ladder that works."""
    L, info = torch.linalg.cholesky_ex(S)
    if info == 0:
        return L, 0.0
    scale = S.diagonal().mean().item()
    scale = scale if scale > 0 else 1.0  # every Gram zero: any ridge gives W̄
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    for i in range(RIDGE_TRIES):
        delta = RIDGE * 10 ** i * scale
        L, info = torch.linalg.cholesky_ex(S + delta * eye)
        if info == 0:
            dead = int((S.diagonal() == 0).sum())
            log.warning("regmean: %s: Σ G̃ is singular (%d dead input columns); solved with ridge "
                        "%.3g toward the experts' mean", ", ".join(keys), dead, delta)
            return L, delta
    raise ValueError(f"regmean: {', '.join(map(repr, keys))}: Σ G̃ stays singular with ridge up to "
                     f"{RIDGE * 10 ** (RIDGE_TRIES - 1):g} · mean diagonal; check its Grams")


def _owners(grams: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """key -> the first key holding the same Gram object."""
    first: dict[int, str] = {}
    return {key: first.setdefault(id(G), key) for key, G in grams.items()}


def _groups(owners: Mapping[str, str]) -> dict[str, list[str]]:
    """owner key -> the keys sharing its Gram, in order."""
    groups: dict[str, list[str]] = {}
    for key, owner in owners.items():
        groups.setdefault(owner, []).append(key)
    return groups


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
        for task in tasks:
            _check_gram(task, key, base[key], grams[task][key])
    return [key for key in base if key in keys]


def _check_gram(task: str, key: str, W: torch.Tensor | None, G) -> None:
    """G must be a finite in x in matrix for the 2-D floating weight W (out x in)."""
    if W is None:
        raise ValueError(f"grams[{task!r}] has key {key!r} with no weight beside it")
    if W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"grams key {key!r} must be a 2-D floating weight (out x in), base has "
                         f"shape {tuple(W.shape)} and dtype {W.dtype}")
    if not isinstance(G, torch.Tensor) or tuple(G.shape) != (W.shape[1], W.shape[1]):
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise ValueError(f"grams[{task!r}][{key!r}] must have shape {(W.shape[1], W.shape[1])} "
                         f"(in x in of weight {tuple(W.shape)}), got {shape}")
    if not torch.isfinite(G).all():
        raise ValueError(f"grams[{task!r}][{key!r}] has non-finite entries (NaN or inf)")
