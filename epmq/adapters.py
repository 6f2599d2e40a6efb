"""Model adapters: what the block-wise calibration loop needs to know about one model family.

The loop (epmq.module.BlockwiseCalibration) only ever asks a model five things:

- where its transformer blocks are (an nn.ModuleList) and their parameter-name prefix in the
  full state dict (so an expert's block can be loaded on its own);
- the inputs of block 0 for a batch, with every positional and keyword argument the model
  passes to its blocks (attention masks, rotary embeddings, ...): a forward pre-hook on block 0
  records them and stops the forward with a private exception, so only the stem runs;
- how to run one block on hidden states with those arguments;
- which nn.Linear layers inside a block get quantized (qualified names inside the block);
- how many tokens of each sample count (all of them for vision towers; a padded text batch
  would count only its unmasked tokens).

A new family (FLAN-T5, Llama) is a small subclass: `block_paths`, `linear_names`, `input_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the block-0 pre-hook once the block's inputs are recorded."""


@dataclass
class BlockInputs:
    """What one batch feeds into a block.

    hidden: (batch, tokens, hidden) hidden states, sample-major.
    args:   positional arguments after the hidden states (e.g. CLIP's attention_mask=None).
    kwargs: keyword arguments of the block call.
    """

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def with_hidden(self, hidden: torch.Tensor) -> "BlockInputs":
        """Same arguments, new hidden states (the next block's inputs)."""
        return BlockInputs(hidden, self.args, self.kwargs)

    def to(self, device) -> "BlockInputs":
        return BlockInputs(self.hidden.to(device), _map_tensors(self.args, lambda t: t.to(device)),
                           _map_tensors(self.kwargs, lambda t: t.to(device)))


def _map_tensors(obj: Any, fn) -> Any:
    """Apply fn to every tensor in nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class BlockAdapter:
    """Family-independent part of an adapter; subclasses set the three class attributes.

    block_paths:  candidate dotted paths of the blocks' nn.ModuleList, tried in order (model
                  classes move their towers between library versions).
    linear_names: qualified names (inside one block) of the nn.Linear layers to quantize, in
                  the order the block computes them.
    input_keys:   batch keys passed to the model's forward to reach block 0.
    model_kwargs: fixed keyword arguments of that forward.
    """

    block_paths: tuple[str, ...] = ()
    linear_names: tuple[str, ...] = ()
    input_keys: tuple[str, ...] = ()
    model_kwargs: dict = {}  # fixed forward options, e.g. no KV cache (a cache would grow per block call)

    # -- where things are -------------------------------------------------------------
    def blocks_path(self, model: nn.Module) -> str:
        """Dotted path of the blocks' ModuleList in `model` (also its state-dict prefix)."""
        for path in self.block_paths:
            try:
                mod = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList):
                return path
        raise ValueError(f"{type(self).__name__}: none of the block paths {self.block_paths} is an "
                         f"nn.ModuleList in {type(model).__name__}")

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path(model))

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block_prefix(self, model: nn.Module, i: int) -> str:
        """State-dict prefix of block i, e.g. 'encoder.layers.3.'."""
        return f"{self.blocks_path(model)}.{i}."

    def linear_layers(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's quantized layers by qualified name (in `linear_names` order)."""
        layers = {}
        for name in self.linear_names:
            mod = block.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"{type(self).__name__}: '{name}' in {type(block).__name__} is "
                                 f"{type(mod).__name__}, not nn.Linear")
            layers[name] = mod
        return layers

    # -- running things ---------------------------------------------------------------
    def model_inputs(self, model: nn.Module, batch: dict) -> dict:
        """Keyword arguments of the model's forward for a calibration batch."""
        missing = [k for k in self.input_keys if k not in batch]
        if missing:
            raise ValueError(f"calibration batch lacks key(s) {missing}; it has {sorted(batch)}")
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        inputs = {k: (batch[k].to(device, dtype) if batch[k].is_floating_point() else batch[k].to(device))
                  for k in self.input_keys}
        return {**inputs, **self.model_kwargs}

    def capture_block_inputs(self, model: nn.Module, batch: dict) -> BlockInputs:
        """Run `model` on `batch` up to block 0 and return block 0's inputs (all arguments)."""
        captured = {}

        def pre_hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = self.blocks(model)[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**self.model_inputs(model, batch))
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self).__name__}: the forward of {type(model).__name__} never "
                               f"reached block 0")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        if args:
            hidden, args = args[0], tuple(args[1:])
        else:
            hidden = kwargs.pop("hidden_states")
        return BlockInputs(hidden.detach(), _map_tensors(args, torch.Tensor.detach),
                           _map_tensors(kwargs, torch.Tensor.detach))

    def run_block(self, block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
        """The block's output hidden states (batch, tokens, hidden) for `inputs`."""
        out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def tokens_per_sample(self, inputs: BlockInputs) -> torch.Tensor:
        """(batch,) number of tokens of each sample that count in the statistics (all of them here)."""
        b, s = inputs.hidden.shape[:2]
        return torch.full((b,), s, dtype=torch.int64)


class CLIPVisionAdapter(BlockAdapter):
    """HF transformers CLIP vision towers (CLIPVisionModel, and CLIPModel's vision_model).

    transformers 5 puts the encoder directly on CLIPVisionModel ('encoder.layers'); version 4 and
    CLIPModel nest it under 'vision_model'. CLIPEncoderLayer.forward(hidden, attention_mask, **kw)
    takes no causal mask in transformers 5; the captured arguments carry whatever it is given.
    """

    block_paths = ("encoder.layers", "vision_model.encoder.layers")
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    input_keys = ("pixel_values",)

    def capture_block_inputs(self, model: nn.Module, batch: dict) -> BlockInputs:
        # CLIPModel.forward wants text too; its vision tower alone reaches the blocks.
        tower = model.vision_model if hasattr(model, "vision_model") and hasattr(model, "text_model") else model
        return super().capture_block_inputs(tower, batch)


class LlamaAdapter(BlockAdapter):
    """Llama-style decoders (Llama, Mistral, Qwen2): calibration batches of equal-length token ids.

    The captured kwargs carry the rotary tables (position_embeddings) and the causal mask; the KV
    cache is switched off so that re-running a block never appends to it. Padded batches would also
    need padded tokens masked out of the statistics (not done: use fixed-length chunks).
    """

    block_paths = ("model.layers", "layers")
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    input_keys = ("input_ids",)
    model_kwargs = {"use_cache": False}


ADAPTERS = {"CLIPVisionModel": CLIPVisionAdapter, "CLIPVisionModelWithProjection": CLIPVisionAdapter,
            "CLIPModel": CLIPVisionAdapter,
            **{f"{family}{head}": LlamaAdapter for family in ("Llama", "Mistral", "Qwen2")
               for head in ("Model", "ForCausalLM")}}


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter for `model`'s class, by class name; ValueError listing the known ones."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no block adapter for model class {name}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]()
