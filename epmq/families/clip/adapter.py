"""CLIP vision towers as the engine sees them: one stage of encoder layers, q/k/v sharing one input."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage


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
