"""Model adapters: what the calibration engine needs to know about one model family.

The engine (epmq.engine.calibration.BlockwiseCalibration) sees a model as *stages* calibrated one after the
other (a vision tower; an encoder, then a decoder), each a stack of *blocks* (an nn.ModuleList),
each block a few nn.Linear layers in *groups* that GPTQ's true-sequential mode quantizes one after
the other (q/k/v, then the attention output, then the MLP's input side, then its output side).

An adapter says, for its family:

- `stages(model)`: the stages in calibration order, with the path of their blocks, the groups of
  quantized linears of a block, and which of those read another stage's output (T5's
  cross-attention keys and values read the encoder's output, not the decoder's hidden states);
- `run_stage(model, stage, batch, context, device)`: the family's own forward of that stage's
  stack, from the batch to the stage's output hidden states. The engine never calls blocks with
  arguments it made up: it runs this forward and records what the stack passes to a block
  (epmq.engine.capture), so masks, rotary tables and T5's position bias (computed in block 0 and handed on
  by the stack) are whatever the family's code makes of them;
- `token_mask(model, stage, batch, source)`: which tokens count in the statistics (padding does not);
- `head_stages(model)` (optional): the model's head (a causal LM's lm_head) as a last stage of one block, for
  solvers that quantize it (Requirements.head). Its block is a view holding the head module under its own name,
  run on the output of the stage it reads (`head_of`), so its layer names are the model's ('lm_head').

A family's adapter is one small subclass in its own folder (epmq/families/<family>/adapter.py); the engine
holds no family class. Nothing here runs a calibration.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

Context = dict  # stage name -> that stage's output hidden states (batch, tokens, hidden)


@dataclass(frozen=True)
class Stage:
    """One stack of blocks calibrated in order.

    name:   "vision", "encoder", "decoder", ...
    blocks: dotted path of the stack's nn.ModuleList in the model (also its state-dict prefix).
    groups: the quantized linears of one block (qualified names inside the block), in groups that
            true-sequential calibration quantizes one after the other, in the order the block
            computes them. Names a block lacks are skipped (T5 has wi or wi_0 + wi_1).
    context_layers: linears whose input is an earlier stage's output (their tokens are that
            stage's tokens, masked by its mask).
    shared_inputs: linears that the family's code calls on one and the same tensor (q/k/v,
            gate/up): they share one H, accumulated once (the engine checks the tensor is the same).
    norms:  the block's nn.LayerNorm modules whose affine parameters E-PMQ may calibrate
            (calibrate_norms), in the order the block computes them.
    head_of: a head stage (ModelAdapter.head_stages): the name of the stage whose output the head reads; then
            `blocks` is the head module's own path (e.g. 'lm_head') and the stage has that one block.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    context_layers: frozenset = frozenset()
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    norms: tuple[str, ...] = ()
    head_of: str = ""

    def source(self, layer: str) -> str:
        """Which tokens a layer reads: "context" (an earlier stage's) or "self" (this stage's)."""
        return "context" if layer in self.context_layers else "self"

    def prefix(self, i: int) -> str:
        """State-dict prefix of block i, e.g. 'encoder.block.3.'; a head's block holds the head under its own
        name, so the prefix is the head's parent path ('' for 'lm_head')."""
        if self.head_of:
            parent = self.blocks.rpartition(".")[0]
            return f"{parent}." if parent else ""
        return f"{self.blocks}.{i}."


class HeadView(nn.Module):
    """A head stage's one block: the head module registered under its own name (not a copy; never part of the
    model's module tree), its forward the head's on the hidden states (batch, tokens, hidden)."""

    def __init__(self, name: str, head: nn.Module):
        super().__init__()
        self.name = name
        self.add_module(name, head)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.name)(hidden)


class ModelAdapter:
    """Family-independent helpers; subclasses define stages, run_stage and token_mask."""

    #: whether the family calibrates true-sequentially unless told otherwise (GPTQ does for LMs)
    true_sequential: bool = False

    def stages(self, model: nn.Module) -> list[Stage]:
        raise NotImplementedError

    def run_stage(self, model: nn.Module, stage: Stage, batch: Mapping, context: Context,
                  device: torch.device) -> torch.Tensor:
        """The stage's output hidden states (batch, tokens, hidden) by the family's own forward."""
        raise NotImplementedError

    def token_mask(self, model: nn.Module, stage: Stage, batch: Mapping, source: str = "self") -> torch.Tensor:
        """(batch, tokens) bool mask of the tokens of `source` ("self" or "context") that count."""
        raise NotImplementedError

    def head_stages(self, model: nn.Module) -> list[Stage]:
        """The model's head as stages of one block each (Stage.head_of), calibrated after `stages` when the solver
        quantizes the head; none by default."""
        return []

    def forward_stage(self, model: nn.Module, stage: Stage, batch: Mapping, context: Context,
                      device: torch.device) -> torch.Tensor:
        """run_stage, or for a head stage its one block on the output of the stage it reads (in `context`)."""
        if stage.head_of:
            return self.blocks(model, stage)[0](context[stage.head_of].to(device))
        return self.run_stage(model, stage, batch, context, device)

    @contextmanager
    def stem_skipped(self, model: nn.Module, stage: Stage):
        """Context for a forward whose first blocks are replayed (epmq.engine.capture), which discards what the
        stem computes: a family with a costly stem (CLIP's patch convolution) swaps it for a stand-in
        of the same output shape. The default keeps the stem (an embedding lookup costs little)."""
        yield

    # -- where things are -----------------------------------------------------------------
    def blocks(self, model: nn.Module, stage: Stage) -> nn.ModuleList:
        if stage.head_of:  # one view per head, kept on it (not as a submodule), so that a hook put on the view
            head = model.get_submodule(stage.blocks)  # (the capture's) sees the forwards of later calls
            if "_head_view" not in head.__dict__:
                view = nn.ModuleList([HeadView(stage.blocks.rpartition(".")[2], head)])
                object.__setattr__(head, "_head_view", view)
            return head.__dict__["_head_view"]
        blocks = model.get_submodule(stage.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(self).__name__}: '{stage.blocks}' in {type(model).__name__} is "
                             f"{type(blocks).__name__}, not an nn.ModuleList")
        return blocks

    def block_prefix(self, stage: Stage, i: int) -> str:
        """State-dict prefix of block i of a stage, e.g. 'encoder.block.3.'."""
        return stage.prefix(i)

    def groups(self, block: nn.Module, stage: Stage) -> list[tuple[str, ...]]:
        """The stage's groups restricted to the linears this block has; every nn.Linear of the
        block must be in one (an unknown layer would silently stay in float)."""
        present = {name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        groups = [tuple(n for n in group if n in present) for group in stage.groups]
        groups = [g for g in groups if g]
        covered = {n for g in groups for n in g}
        unknown = sorted(present - covered)
        if unknown or not covered:
            raise ValueError(f"{type(self).__name__}: block of stage '{stage.name}' ({type(block).__name__}) "
                             f"has linear layers {unknown or sorted(present)} that the adapter does not place")
        return groups

    def linear_layers(self, block: nn.Module, stage: Stage) -> dict[str, nn.Linear]:
        """The block's quantized layers by qualified name, in computation order."""
        return {name: block.get_submodule(name) for group in self.groups(block, stage) for name in group}

    def stem_keys(self, model: nn.Module, keys) -> list[str]:
        """The state-dict keys outside every stage's blocks (embeddings, norms, heads)."""
        prefixes = tuple(f"{s.blocks}." for s in self.stages(model))
        return [k for k in keys if not k.startswith(prefixes)]

    @staticmethod
    def inputs(batch: Mapping, keys, device: torch.device, dtype: torch.dtype | None = None) -> dict:
        """batch[k] for the keys present, on `device` (floating tensors in `dtype` when given)."""
        out = {}
        for k in keys:
            if k in batch and batch[k] is not None:
                v = torch.as_tensor(batch[k])
                out[k] = v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
        return out

    @staticmethod
    def require(batch: Mapping, keys, family: str) -> None:
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"{family} calibration batches need key(s) {missing}; this batch has {sorted(batch)}")


def mask_or_ones(mask, ids) -> torch.Tensor:
    """An attention mask as bool, or every token of `ids` when there is none."""
    return torch.ones(torch.as_tensor(ids).shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
