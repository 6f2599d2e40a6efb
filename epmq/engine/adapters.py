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
- `token_mask(model, stage, batch, source)`: which tokens count in the statistics (padding does not).

A new family is one small subclass. Nothing here runs a calibration.
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
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    context_layers: frozenset = frozenset()
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    norms: tuple[str, ...] = ()

    def source(self, layer: str) -> str:
        """Which tokens a layer reads: "context" (an earlier stage's) or "self" (this stage's)."""
        return "context" if layer in self.context_layers else "self"


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

    @contextmanager
    def stem_skipped(self, model: nn.Module, stage: Stage):
        """Context for a forward whose first blocks are replayed (epmq.engine.capture), which discards what the
        stem computes: a family with a costly stem (CLIP's patch convolution) swaps it for a stand-in
        of the same output shape. The default keeps the stem (an embedding lookup costs little)."""
        yield

    # -- where things are -----------------------------------------------------------------
    def blocks(self, model: nn.Module, stage: Stage) -> nn.ModuleList:
        blocks = model.get_submodule(stage.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(self).__name__}: '{stage.blocks}' in {type(model).__name__} is "
                             f"{type(blocks).__name__}, not an nn.ModuleList")
        return blocks

    def block_prefix(self, stage: Stage, i: int) -> str:
        """State-dict prefix of block i of a stage, e.g. 'encoder.block.3.'."""
        return f"{stage.blocks}.{i}."

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


class CLIPVisionAdapter(ModelAdapter):
    """CLIP vision towers of HF transformers: CLIPVisionModel (transformers 5: 'encoder.layers';
    4: 'vision_model.encoder.layers') and the vision tower of a full CLIPModel. Batches carry
    "pixel_values" (batch, channels, height, width); every token counts."""

    GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
              ("mlp.fc1",), ("mlp.fc2",))

    @staticmethod
    def _tower(model: nn.Module) -> tuple[nn.Module, str]:
        if hasattr(model, "text_model") and hasattr(model, "vision_model"):  # CLIPModel
            return model.vision_model, "vision_model."
        if isinstance(getattr(model, "vision_model", None), nn.Module):  # transformers 4 CLIPVisionModel
            return model.vision_model, "vision_model."
        return model, ""

    def stages(self, model: nn.Module) -> list[Stage]:
        tower, prefix = self._tower(model)
        path = "encoder.layers"
        if not isinstance(getattr(getattr(tower, "encoder", None), "layers", None), nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no CLIP vision encoder ('{prefix}{path}')")
        return [Stage("vision", prefix + path, self.GROUPS, shared_inputs=self.GROUPS[:1],
                      norms=("layer_norm1", "layer_norm2"))]

    def run_stage(self, model, stage, batch, context, device):
        self.require(batch, ("pixel_values",), "CLIP vision")
        tower, _ = self._tower(model)
        dtype = tower.embeddings.patch_embedding.weight.dtype
        return tower(**self.inputs(batch, ("pixel_values",), device, dtype)).last_hidden_state

    def token_mask(self, model, stage, batch, source="self"):
        tokens = self._tower(model)[0].embeddings.num_positions  # patches + the class token
        return torch.ones(len(batch["pixel_values"]), tokens, dtype=torch.bool)

    @contextmanager
    def stem_skipped(self, model, stage):
        tower, _ = self._tower(model)
        real = tower.embeddings
        tower.embeddings = _BlankEmbeddings(real)  # the vision encoder masks nothing: only the shape counts
        try:
            yield
        finally:
            tower.embeddings = real


class _BlankEmbeddings(nn.Module):
    """Zeros of the shape CLIP's vision embeddings would return (batch, patches + 1, hidden)."""

    def __init__(self, real: nn.Module):
        super().__init__()
        object.__setattr__(self, "_real", real)  # not a submodule: the tree keeps its own

    def __getattr__(self, name: str):  # other reads (e.g. the patch weights' dtype) go to the real one
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, pixel_values, *args, **kwargs):
        real = object.__getattribute__(self, "_real")
        weight = real.patch_embedding.weight
        return weight.new_zeros(len(pixel_values), real.num_positions, real.embed_dim)


class LlamaAdapter(ModelAdapter):
    """Llama-style decoders (Llama, Mistral, Qwen2): batches of token ids, "attention_mask" optional
    (1 = real token); padded tokens never enter the statistics. The KV cache is off, so that running
    a block again never appends to it. True-sequential by default, as GPTQ does for LMs."""

    true_sequential = True
    GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

    @staticmethod
    def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
        inner = getattr(model, "model", None)  # *ForCausalLM wraps the *Model
        return (inner, "model.") if isinstance(getattr(inner, "layers", None), nn.ModuleList) else (model, "")

    def stages(self, model):
        decoder, prefix = self._decoder(model)
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no decoder layers ('model.layers')")
        return [Stage("decoder", prefix + "layers", self.GROUPS, shared_inputs=(self.GROUPS[0], self.GROUPS[2]))]

    def run_stage(self, model, stage, batch, context, device):
        self.require(batch, ("input_ids",), "causal LM")
        decoder, _ = self._decoder(model)
        inputs = self.inputs(batch, ("input_ids", "attention_mask"), device)
        return decoder(**inputs, use_cache=False).last_hidden_state

    def token_mask(self, model, stage, batch, source="self"):
        return _mask_or_ones(batch.get("attention_mask"), batch["input_ids"])


class T5Adapter(ModelAdapter):
    """T5 and FLAN-T5 (T5ForConditionalGeneration, T5Model, T5EncoderModel): the encoder's blocks,
    then the decoder's, which see the calibrated encoder's output.

    Batches: "input_ids", "attention_mask" (optional) for the encoder; for the decoder
    "decoder_input_ids" and optionally "decoder_attention_mask", or "labels" (-100 = ignored), which
    are shifted right as T5 does for teacher forcing. Decoder tokens count where the decoder mask
    is set (from labels: every position whose own label is real, i.e. the positions the loss scores).
    """

    _SELF = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v")
    _FF_IN = ("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1")

    def stages(self, model):
        stages = []
        self_qkv = tuple("layer.0." + n for n in self._SELF)
        if isinstance(getattr(getattr(model, "encoder", None), "block", None), nn.ModuleList):
            ff = "layer.1."
            ff_in = tuple(ff + n for n in self._FF_IN)
            stages.append(Stage("encoder", "encoder.block", (
                self_qkv, ("layer.0.SelfAttention.o",), ff_in, (ff + "DenseReluDense.wo",)),
                shared_inputs=(self_qkv, ff_in)))
        if isinstance(getattr(getattr(model, "decoder", None), "block", None), nn.ModuleList):
            cross, ff = "layer.1.EncDecAttention.", "layer.2."
            cross_kv, ff_in = (cross + "k", cross + "v"), tuple(ff + n for n in self._FF_IN)
            stages.append(Stage("decoder", "decoder.block", (
                # cross-attention keys and values read the encoder's output: nothing in the block
                # changes their inputs, so they go with the first group
                self_qkv + cross_kv,
                ("layer.0.SelfAttention.o",), (cross + "q",), (cross + "o",),
                ff_in, (ff + "DenseReluDense.wo",)),
                context_layers=frozenset(cross_kv), shared_inputs=(self_qkv, cross_kv, ff_in)))
        if not stages:
            raise ValueError(f"{type(model).__name__} has no T5 encoder or decoder blocks")
        return stages

    def decoder_inputs(self, model, batch) -> torch.Tensor:
        """decoder_input_ids (batch, tokens): given, or the labels shifted right (teacher forcing)."""
        if "decoder_input_ids" in batch:
            return torch.as_tensor(batch["decoder_input_ids"])
        if "labels" not in batch:
            raise ValueError(f"T5 decoder calibration batches need 'decoder_input_ids' or 'labels'; "
                             f"this batch has {sorted(batch)}")
        return model._shift_right(torch.as_tensor(batch["labels"]))

    def run_stage(self, model, stage, batch, context, device):
        self.require(batch, ("input_ids",), "T5")
        enc = self.inputs(batch, ("input_ids", "attention_mask"), device)
        if stage.name == "encoder":
            return model.encoder(**enc).last_hidden_state
        # as T5's own forward: no decoder mask unless the batch has one (padding sits after the
        # real targets, so the causal mask already keeps it out of their attention)
        dec = self.inputs(batch, ("decoder_attention_mask",), device)
        return model.decoder(input_ids=self.decoder_inputs(model, batch).to(device),
                             attention_mask=dec.get("decoder_attention_mask"),
                             encoder_hidden_states=context["encoder"],
                             encoder_attention_mask=enc.get("attention_mask"), use_cache=False).last_hidden_state

    def token_mask(self, model, stage, batch, source="self"):
        if stage.name == "encoder" or source == "context":
            return _mask_or_ones(batch.get("attention_mask"), batch["input_ids"])
        if "decoder_input_ids" in batch:
            return _mask_or_ones(batch.get("decoder_attention_mask"), batch["decoder_input_ids"])
        return torch.as_tensor(batch["labels"]) != -100  # the positions T5's loss scores: padding never counts


def _mask_or_ones(mask, ids) -> torch.Tensor:
    """An attention mask as bool, or every token of `ids` when there is none."""
    return torch.ones(torch.as_tensor(ids).shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()


ADAPTERS = {"CLIPVisionModel": CLIPVisionAdapter, "CLIPVisionModelWithProjection": CLIPVisionAdapter,
            "CLIPModel": CLIPVisionAdapter,
            **{f"{family}{head}": LlamaAdapter for family in ("Llama", "Mistral", "Qwen2")
               for head in ("Model", "ForCausalLM")},
            **{name: T5Adapter for name in ("T5ForConditionalGeneration", "T5Model", "T5EncoderModel")}}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`'s class, by class name; ValueError listing the known ones."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no adapter for model class {name}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[name]()
