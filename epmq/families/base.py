"""What the jobs need of a model family besides its suite: the engine's adapter for a model, by class name."""

from __future__ import annotations

from torch import nn

from epmq.engine.adapters import ModelAdapter
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.flan_t5.adapter import T5Adapter

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
