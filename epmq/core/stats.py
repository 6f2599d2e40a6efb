"""Streaming solver statistics of one linear layer for E-PMQ.

With X̂ (n x in) the layer's inputs in the partially quantized merged model (rows are tokens),
Ỹ (n x out) the targets the experts produce for those tokens, and w (n,) per-token weights:

    H = Σ_n w X̂ᵀ X̂      (in x in)    Hessian of the layer-wise squared error
    C = Σ_n w Ỹᵀ X̂      (out x in)   E-PMQ cross term between targets and inputs
    x = Σ_n w X̂,  y = Σ_n w Ỹ,  S = Σ_n w     first moments (with means=True), for the bias

Precision: each batch product is formed in float32 (float64 if the inputs are float64), the
precision the layer itself computes in, and then added into buffers that are float64 by default.
The batch products hold a few thousand tokens, so their float32 rounding is small; what would
drift over millions of tokens is the running sum, and that is kept in float64, so sums over many
batches (and the DDP all-reduce of the buffers) agree to about 1e-12 relative rather than 1e-6.
A consequence worth knowing: a float32 product is positive semi-definite only up to float32
rounding, so H may have eigenvalues slightly below zero in directions the data does not reach;
epmq.core.anchor symmetrises H and damps it before solving.
"""

from __future__ import annotations

import torch

from epmq.core.precision import exact_products


class LayerStatistics:
    """Accumulates H = Σ w X̂ᵀX̂ and C = Σ w ỸᵀX̂ over batches of tokens for one linear layer.

    Args:
        in_features: the layer's input width (columns of X̂ and of W).
        out_features: the layer's output width (columns of Ỹ); None keeps H only (plain GPTQ).
        device: where the float64 buffers live (default: torch's default device). Batches on
            another device are multiplied there and the (in x in) product moved here.
        dtype: dtype of the running sums, float64 by default.
        residual: the Y given to `add` are residuals Ỹ − X̂W_mᵀ (targets minus the merged layer's
            own outputs), so that C holds R = C − W_m H (epmq.core.anchor.relaxed_target(residual=True)).
        share_H_with: another layer's statistics whose H this one uses (layers that read the same
            input tensor, such as q/k/v: one H, accumulated once). H is then that object's buffer,
            added to only when `add(..., with_H=True)` is called on either of them.
        means: also keep the first moments x = Σ w X̂ (in,), y = Σ w Ỹ (out,) and S = Σ w, which a
            solver that calibrates the layer's bias needs (each layer keeps its own x: a vector).

    The buffers are plain tensors returned by `buffers()`, so a DDP run can all-reduce them in
    place (sum) before the solve; `+=` sums statistics gathered by several objects. A borrowed H
    is not among the borrower's buffers, so a list over all layers reduces every H once.
    """

    def __init__(self, in_features: int, out_features: int | None = None, device=None,
                 dtype: torch.dtype = torch.float64, residual: bool = False,
                 share_H_with: "LayerStatistics | None" = None, means: bool = False):
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if out_features is not None and (not isinstance(out_features, int)
                                         or isinstance(out_features, bool) or out_features <= 0):
            raise ValueError(f"out_features must be a positive int or None, got {out_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        if share_H_with is None:
            self._H = torch.zeros(in_features, in_features, dtype=dtype, device=device)   # in x in
        elif not isinstance(share_H_with, LayerStatistics) or share_H_with.in_features != in_features:
            raise ValueError(f"share_H_with must be a LayerStatistics with in_features={in_features}, got "
                             f"{share_H_with!r}")
        else:
            self._H = share_H_with._H
        self.owns_H = share_H_with is None
        self.residual = bool(residual)
        self._C = (None if out_features is None else
                   torch.zeros(out_features, in_features, dtype=dtype, device=device))  # out x in
        self.means = bool(means)
        vector = lambda n: torch.zeros(n, dtype=dtype, device=self._H.device) if self.means else None  # noqa: E731
        self._x, self._S = vector(in_features), vector(())
        self._y = None if out_features is None else vector(out_features)
        # token count as a tensor on the buffers' device so that it is all-reduced with them
        self._tokens = torch.zeros((), dtype=torch.int64, device=self._H.device)

    @property
    def H(self) -> torch.Tensor:
        """Σ w X̂ᵀX̂, (in x in), the live float64 buffer (not a copy)."""
        return self._H

    @property
    def C(self) -> torch.Tensor | None:
        """Σ w ỸᵀX̂, (out x in), the live buffer; None when out_features is None."""
        return self._C

    @property
    def x(self) -> torch.Tensor | None:
        """Σ w X̂, (in,); None without means."""
        return self._x

    @property
    def y(self) -> torch.Tensor | None:
        """Σ w Ỹ (or of the residuals, see `residual`), (out,); None without means or out_features."""
        return self._y

    @property
    def S(self) -> torch.Tensor | None:
        """Σ w, a 0-dim tensor; None without means."""
        return self._S

    @property
    def tokens(self) -> int:
        """Number of token rows added so far (whatever their weights)."""
        return int(self._tokens.item())

    def buffers(self) -> list[torch.Tensor]:
        """The raw sums [H, C, x, y, S (those kept), tokens] that a distributed run all-reduces (op: sum)."""
        return [t for t in (self._H if self.owns_H else None, self._C, self._x, self._y, self._S, self._tokens)
                if t is not None]

    def reset(self) -> None:
        """Zero every sum in place (the buffers keep their identity)."""
        for t in self.buffers():
            t.zero_()

    def add(self, X: torch.Tensor, Y: torch.Tensor | None = None, weight=1.0, with_H: bool = True) -> None:
        """Add a batch of tokens.

        Args:
            X: (..., in) layer inputs; all leading dims are tokens.
            Y: (..., out) targets for the same tokens (required iff out_features was given).
            weight: per-token weight: a non-negative number, or a tensor whose shape is a leading
                part of X.shape[:-1] (e.g. (batch,) per sample, or (batch, seq) per token).
            with_H: False skips H += w XᵀX (another layer sharing this H has added this batch).
        """
        X = _rows("X", X, self.in_features, "in_features")
        token_shape = X.shape[:-1]
        if self.out_features is None and Y is not None:
            raise ValueError("Y was given but this LayerStatistics has out_features=None "
                             "(it accumulates H only)")
        if self.out_features is not None:
            if Y is None:
                raise ValueError(f"Y (targets, shape (..., {self.out_features})) is required: "
                                 f"out_features={self.out_features}")
            Y = _rows("Y", Y, self.out_features, "out_features")
            if Y.shape[:-1].numel() != token_shape.numel():
                raise ValueError(f"X and Y must hold the same number of tokens: X has "
                                 f"{token_shape.numel()} rows {tuple(X.shape)}, Y has "
                                 f"{Y.shape[:-1].numel()} rows {tuple(Y.shape)}")
        w = self._token_weights(weight, token_shape, X.device)

        # batch products in the layer's precision (float32 at least), sums in float64; see module doc
        compute = torch.promote_types(X.dtype, torch.float32)
        X2 = X.reshape(-1, self.in_features).to(compute)                       # n x in
        if not _finite(X2):
            raise ValueError("X contains NaN or Inf")
        if self._C is not None:
            Y2 = Y.reshape(-1, self.out_features).to(X2.device, compute)         # n x out
            if not _finite(Y2):
                raise ValueError("Y contains NaN or Inf")
        Xw = X2 * (w if isinstance(w, float) else w.reshape(-1, 1).to(compute))  # n x in
        with exact_products(X2.device):  # also when the block's forward runs under autocast or TF32
            if with_H:
                _accumulate_gram(self._H, Xw, X2)                               # in x in
            if self._C is not None:
                _accumulate(self._C, Y2.T @ Xw)                                 # out x in
            if self.means:
                w_rows = (X2.new_full((X2.shape[0],), w) if isinstance(w, float)
                          else w.reshape(-1).to(compute))                       # n
                _accumulate(self._x, Xw.sum(0))                                 # in
                _accumulate(self._S, w_rows.sum())
                if self._y is not None:
                    _accumulate(self._y, w_rows @ Y2)                           # out
        self._tokens += X2.shape[0]

    @staticmethod
    def _token_weights(weight, token_shape: torch.Size, device) -> torch.Tensor | float:
        """A number, or per-token weights expanded to token_shape."""
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            if not (weight >= 0 and weight < float("inf")):
                raise ValueError(f"weight must be finite and non-negative, got {weight!r}")
            return float(weight)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"weight must be a number or a tensor, got {type(weight).__name__}")
        if tuple(weight.shape) != tuple(token_shape[:weight.dim()]):
            raise ValueError(f"weight shape {tuple(weight.shape)} must be a leading part of the "
                             f"token shape {tuple(token_shape)} (X.shape[:-1])")
        if not torch.isfinite(weight).all() or (weight < 0).any():
            raise ValueError("weight must be finite and non-negative")
        w = weight.to(device).reshape(tuple(weight.shape) + (1,) * (len(token_shape) - weight.dim()))
        return w.expand(token_shape)

    def __iadd__(self, other: "LayerStatistics") -> "LayerStatistics":
        """Sum another object's statistics into this one (same layer, e.g. another data shard)."""
        return self.add_scaled(other, 1.0)

    def add_scaled(self, other: "LayerStatistics", scale: float) -> "LayerStatistics":
        """self += scale · other for every sum (the token count unscaled): how one task's statistics
        join the total with their own weight (normalised per-expert terms)."""
        if not isinstance(other, LayerStatistics):
            return NotImplemented
        if (other.in_features, other.out_features, other.means) != (self.in_features, self.out_features, self.means):
            raise ValueError(f"cannot add statistics of shape (in={other.in_features}, "
                             f"out={other.out_features}, means={other.means}) to (in={self.in_features}, "
                             f"out={self.out_features}, means={self.means})")
        if self.owns_H != other.owns_H:
            raise ValueError("cannot add statistics with a shared H to statistics with their own H")
        for mine, theirs in zip(self.buffers(), other.buffers()):
            mine += theirs.to(mine.device, mine.dtype) * (1 if mine is self._tokens else scale)
        return self

    def __repr__(self) -> str:
        return (f"LayerStatistics(in_features={self.in_features}, out_features={self.out_features}, "
                f"tokens={self.tokens}, dtype={self._H.dtype}, device={self._H.device})")


def _accumulate(total: torch.Tensor, batch: torch.Tensor) -> None:
    """total += batch, converted to total's dtype and device first (an explicit conversion and a
    same-dtype add measured about 5x faster on CPU than an add that promotes as it goes)."""
    total += batch.to(total)


# Column panel width of the Gram products: H's blocks on and above the diagonal are multiplied, those below
# mirrored. With k = ceil(n / b) panels of b columns the products take about (k + 1) / (2k) of the full n x n
# product: 2/3 at n = 512, 9/16 at n = 1536. On one CPU thread (4096 tokens, float32) the update took 22 % less
# time than the full product at n = 512 and 46 % less at n = 1536; narrower panels multiply less efficiently.
_GRAM_PANEL = 192


def _accumulate_gram(total: torch.Tensor, Xw: torch.Tensor, X: torch.Tensor) -> None:
    """total += Xwᵀ X for (n, in) Xw, X whose product is symmetric (Xw = rows of X scaled by their weights):
    the panels of columns i.. of row block i are multiplied, the blocks below the diagonal are their
    transposes. Each entry is the same dot product over the n tokens as in the full product, so the sums
    differ from it by float rounding only."""
    n = X.shape[1]
    if n <= _GRAM_PANEL:
        _accumulate(total, Xw.T @ X)
        return
    for i in range(0, n, _GRAM_PANEL):
        j = min(i + _GRAM_PANEL, n)
        panel = (Xw[:, i:j].T @ X[:, i:]).to(total)                            # (j - i) x (in - i)
        total[i:j, i:] += panel
        total[j:, i:j] += panel[:, j - i:].T


def _finite(T: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum first (NaN and Inf propagate into it), the full
    elementwise test only when the sum is not finite (it may overflow on finite entries)."""
    return bool(torch.isfinite(T.sum())) or bool(torch.isfinite(T).all())


def _rows(name: str, T, width: int, field: str) -> torch.Tensor:
    """T as a floating-point tensor of shape (..., width); ValueError naming `name` otherwise."""
    T = torch.as_tensor(T)
    if T.dim() < 1 or T.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}) ({field}), got {tuple(T.shape)}")
    if not T.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {T.dtype}")
    return T


class FoldedStatistics:
    """LayerStatistics split into K folds of samples, for choosing an option by cross-validation.

    Each batch row (sample) goes to one fold (`add(..., folds=...)`); `H` and `C` are the sums over
    all folds (what a solver fits on), `fold(k)` one fold's statistics (what held-out errors are
    scored on): the fit on all folds but k is H − fold(k).H, C − fold(k).C. The folds' buffers are
    all-reduced like any LayerStatistics'. Args as LayerStatistics, plus folds (K >= 2).
    """

    def __init__(self, in_features: int, out_features: int | None = None, device=None,
                 dtype: torch.dtype = torch.float64, residual: bool = False, folds: int = 2,
                 share_H_with: "FoldedStatistics | None" = None):
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an int >= 2, got {folds!r}")
        if share_H_with is not None and (not isinstance(share_H_with, FoldedStatistics)
                                         or len(share_H_with.folds) != folds):
            raise ValueError(f"share_H_with must be FoldedStatistics with {folds} folds, got {share_H_with!r}")
        self.in_features, self.out_features, self.residual = in_features, out_features, bool(residual)
        self.folds = [LayerStatistics(in_features, out_features, device, dtype, residual,
                                      None if share_H_with is None else share_H_with.folds[k])
                      for k in range(folds)]
        self.owns_H = share_H_with is None

    def fold(self, k: int) -> LayerStatistics:
        return self.folds[k]

    @property
    def H(self) -> torch.Tensor:
        """Σ over folds of Σ w X̂ᵀX̂ (in x in), a new tensor."""
        return sum(f.H for f in self.folds)

    @property
    def C(self) -> torch.Tensor | None:
        """Σ over folds of the cross term (out x in), a new tensor; None without out_features."""
        return None if self.out_features is None else sum(f.C for f in self.folds)

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.folds)

    def buffers(self) -> list[torch.Tensor]:
        return [t for f in self.folds for t in f.buffers()]

    def add(self, X: torch.Tensor, Y: torch.Tensor | None = None, weight=1.0, with_H: bool = True,
            folds: torch.Tensor | None = None) -> None:
        """Add a batch whose rows (the first dim of X, Y and a tensor weight) go to folds[row]."""
        if folds is None or folds.shape != X.shape[:1]:
            raise ValueError(f"folds must give one fold per sample, shape {tuple(X.shape[:1])}, got "
                             f"{None if folds is None else tuple(folds.shape)}")
        folds = folds.to(X.device)
        for k, stats in enumerate(self.folds):
            rows = (folds == k).nonzero().flatten()
            if rows.numel():
                w = weight[rows.to(weight.device)] if isinstance(weight, torch.Tensor) and weight.dim() else weight
                stats.add(X[rows], None if Y is None else Y[rows.to(Y.device)], w, with_H)
