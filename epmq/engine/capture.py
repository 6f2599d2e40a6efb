"""What a block receives, recorded from the family's own forward, with earlier blocks replayed.

To calibrate block i of a stage the engine needs, for every calibration batch, the exact arguments
the model passes to that block once blocks 0..i-1 are quantized. Replaying block 0's arguments
with new hidden states is wrong in general: T5 computes its position bias inside block 0 and the
stack hands it on. So the engine runs the stage's real forward (adapter.run_stage) and records the
call at block i with a forward pre-hook, which then stops the forward. Blocks 0..i-1 do not run
again: each is swapped for a `Replay` that returns block i-1's recorded output, which is all the
stack reads from them (the output is the next block's input; T5's stack also reads the position
biases from it). What the stem computes before block 0 is then discarded, except what the stack
derives from the batch alone (masks, rotary tables, positions), which is recomputed exactly; an
adapter may skip a costly stem then (ModelAdapter.stem_skipped: CLIP's patch convolution).

With no recorded output (`replay=None`) the blocks before i really run: that is how a resumed run
catches up, and how tests obtain reference inputs.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from epmq.engine.adapters import Context, ModelAdapter, Stage


class _StopForward(Exception):
    """Raised by the pre-hook once the block's arguments are recorded."""


@dataclass
class BlockInputs:
    """One batch's call of a block: block(hidden, *args, **kwargs).

    hidden: (batch, tokens, hidden) hidden states; args/kwargs: everything else the stack passed
    (attention masks, position embeddings, T5's position biases and encoder states, ...).
    """

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device) -> "BlockInputs":
        move = lambda t: t.to(device)  # noqa: E731
        return BlockInputs(self.hidden.to(device), map_tensors(self.args, move), map_tensors(self.kwargs, move))


def map_tensors(obj: Any, fn) -> Any:
    """fn applied to every tensor in nested tuples, lists and dicts (other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def hidden_of(output) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first entry of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Replay(nn.Module):
    """Stands in for a block that already ran: returns a recorded output, ignoring its inputs.

    Attribute reads it cannot answer go to the block it replaces (some stacks read e.g. a layer's
    attention type), which is kept outside the module tree.
    """

    def __init__(self, output, original: nn.Module):
        super().__init__()
        self.output = output
        object.__setattr__(self, "_original", original)

    def forward(self, *args, **kwargs):
        return self.output

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def hookless_copy(module: nn.Module, memo: dict | None = None) -> nn.Module:
    """A deep copy of `module` without the forward hooks that deepcopy would carry over (a statistics
    hook on a merged block must never fire in an expert's copy of it). memo: deepcopy's memo, e.g.
    {id(t): t} for tensors to share rather than copy."""
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._forward_hooks_with_kwargs,
                      m._forward_pre_hooks_with_kwargs, m._forward_hooks_always_called):
            hooks.clear()
    return clone


@contextmanager
def replaying(blocks: nn.ModuleList, count: int, output):
    """Blocks 0..count-1 replaced by Replay(output) for the duration (restored afterwards)."""
    saved = [blocks[j] for j in range(count)]
    try:
        for j in range(count):
            blocks[j] = Replay(output, saved[j])
        yield
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block


class _Recorded:
    """The outputs a block gave on a sequence of forwards, handed out again one forward at a time."""

    def __init__(self, outputs: list):
        self.outputs, self.next, self.current = outputs, 0, None

    def advance(self):
        if self.next == len(self.outputs):
            raise RuntimeError(f"a replayed forward past the {len(self.outputs)} recorded: the replayed forwards must "
                               f"be the recorded ones, in the same order")
        self.current, self.next = self.outputs[self.next], self.next + 1
        return self.current


class _ReplayNext(Replay):
    """Stands in for one of the first blocks of a stack: returns the recorded output of this forward (the
    first stand-in takes the next recording; the others, which the stack calls after it, return the same)."""

    def __init__(self, recorded: _Recorded, original: nn.Module, first: bool):
        super().__init__(None, original)
        object.__setattr__(self, "_recorded", recorded)
        object.__setattr__(self, "_first", first)

    def forward(self, *args, **kwargs):
        recorded = object.__getattribute__(self, "_recorded")
        return recorded.advance() if object.__getattribute__(self, "_first") else recorded.current


@contextmanager
def replaying_recorded(blocks: nn.ModuleList, count: int, outputs: list):
    """Blocks 0..count-1 replaced for the duration: the k-th forward of the stack gets outputs[k] (block
    count-1's output on that forward, recorded earlier) from them, so that they do not run. Every
    recording must be used, in order: RuntimeError otherwise (the forwards were not the recorded ones)."""
    recorded = _Recorded(outputs)
    saved = [blocks[j] for j in range(count)]
    try:
        for j in range(count):
            blocks[j] = _ReplayNext(recorded, saved[j], first=j == 0)
        yield
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block
    if recorded.next != len(outputs):
        raise RuntimeError(f"{len(outputs)} forwards were recorded but {recorded.next} replayed: the replayed "
                           f"forwards must be the recorded ones, in the same order")


@torch.no_grad()
def capture_inputs(adapter: ModelAdapter, model: nn.Module, stage: Stage, i: int, batch: Mapping,
                   context: Context, device: torch.device, replay=None) -> BlockInputs:
    """The arguments the stage's forward passes to its block i on `batch`.

    replay: block i-1's output on this batch (blocks before i are replayed, not run), or None to
    run them. context: earlier stages' outputs (the decoder's encoder states).
    """
    blocks = adapter.blocks(model, stage)
    captured = {}

    def pre_hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopForward

    handle = blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True)
    skip = adapter.stem_skipped(model, stage) if replay is not None and i > 0 else nullcontext()
    try:
        with replaying(blocks, i if replay is not None else 0, replay), skip:
            adapter.forward_stage(model, stage, batch, context, device)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(adapter).__name__}: the forward of stage '{stage.name}' never reached block {i}")
    args, kwargs = captured["args"], dict(captured["kwargs"])
    hidden, args = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
    detach = torch.Tensor.detach
    return BlockInputs(hidden.detach(), map_tensors(args, detach), map_tensors(kwargs, detach))


@torch.no_grad()
def stage_output(adapter: ModelAdapter, model: nn.Module, stage: Stage, batch: Mapping, context: Context,
                 device: torch.device, replay=None) -> torch.Tensor:
    """The stage's output hidden states (after its final norm), every block replayed from `replay`
    (the last block's output), or run when replay is None."""
    blocks = adapter.blocks(model, stage)
    skip = adapter.stem_skipped(model, stage) if replay is not None and len(blocks) else nullcontext()
    with replaying(blocks, len(blocks) if replay is not None else 0, replay), skip:
        return adapter.forward_stage(model, stage, batch, context, device).detach()


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs):
    """The block's raw output (tensor or tuple) on recorded inputs."""
    return block(inputs.hidden, *inputs.args, **inputs.kwargs)


@dataclass
class Trace:
    """Where one calibration batch (or one task's share of it) stands in the model.

    stage, block: the next block whose inputs are to be captured; replay: the output of the block
    before it in the same stage (None at a stage's block 0); context: the finished stages' outputs.
    """

    stage: int = 0
    block: int = 0
    replay: Any = None
    context: dict = field(default_factory=dict)

    def advance(self, output, store: Callable = lambda t: t) -> None:
        """The block at the trace's position has run and produced `output`."""
        self.replay = map_tensors(output, lambda t: store(t.detach()))
        self.block += 1


def walk_to(adapter: ModelAdapter, model: nn.Module, stages: list[Stage], trace: Trace, batch: Mapping,
            target: tuple[int, int], device: torch.device,
            run: Callable[[Stage, int, BlockInputs], Any], store: Callable = lambda t: t) -> BlockInputs:
    """The inputs of block `target` = (stage index, block) for this batch.

    From the trace's position every block up to the target runs through `run(stage, i, inputs)`
    (the caller's module for that block: the quantized merged block, or an expert's own block),
    finished stages leave their outputs in the trace's context. In an uninterrupted calibration the
    trace already stands at the target and nothing runs; a resumed one walks from the start.
    store(tensor) places what the trace keeps (e.g. on a cache device).
    """
    if (trace.stage, trace.block) > target:
        raise RuntimeError(f"trace at {(trace.stage, trace.block)} is past the requested block {target}")
    to_device = lambda t: t.to(device)  # noqa: E731
    while True:
        stage = stages[trace.stage]
        replay = map_tensors(trace.replay, to_device)
        context = map_tensors(trace.context, to_device)
        if trace.block == len(adapter.blocks(model, stage)):  # the stage is done: its output is context
            trace.context[stage.name] = store(stage_output(adapter, model, stage, batch, context, device, replay))
            trace.stage, trace.block, trace.replay = trace.stage + 1, 0, None
            continue
        inputs = capture_inputs(adapter, model, stage, trace.block, batch, context, device, replay)
        if (trace.stage, trace.block) == target:
            trace.replay = None  # the block's inputs replace it
            return inputs
        trace.advance(run(stage, trace.block, inputs), store)
