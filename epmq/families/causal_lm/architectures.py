"""The decoder-only model types the causal_lm suite calibrates, declared: config.model_type -> the linear layers
of one decoder layer, in the groups that true-sequential calibration quantizes one after the other.

Every type here keeps the Llama module names (checked on transformers 5): the *ForCausalLM holds the decoder
as `model`, its layers as the nn.ModuleList `model.layers`, each layer a `self_attn` and an `mlp`. The one
adapter (epmq.families.causal_lm.adapter.LlamaAdapter) reads this table; nothing else is per type, because

- the engine records what the stack passes to each layer (epmq.engine.capture): rotary tables, the causal
  mask, Gemma 2/3's per-layer sliding-window masks, so no type needs extra arguments made up;
- norms inside attention (Qwen3's and Gemma 3's q_norm/k_norm), softcapping (Gemma 2) and the scaled
  embeddings (Gemma) are computed by the type's own forward and are not quantized;
- a tied head (Gemma ties lm_head to embed_tokens) is left out of the experts' files, tied again by
  CausalLMSuite.model, stored once by epmq.io.export and tied again by epmq.io.load.

To add a type whose layers follow these names: one entry in ARCHITECTURES, its model_type -> an Architecture
whose groups name every nn.Linear of a decoder layer (names inside the layer) in the order the layer computes
them, and whose shared_inputs are the groups whose layers the type's code calls on one and the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A decoder layer's quantized linears.

    groups: one tuple per true-sequential step, in computation order; every nn.Linear of the layer is in
        one (the engine refuses a layer it does not place).
    shared_inputs: groups whose linears read one tensor (q/k/v, gate/up): the engine accumulates one H for them.
    """

    groups: tuple[tuple[str, ...], ...]
    shared_inputs: tuple[tuple[str, ...], ...] = ()


_QKV, _GATE_UP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")
#: separate q/k/v and gate/up projections (biases on q/k/v in Qwen2 are kept in float, as GPTQ keeps them)
SEPARATE = Architecture((_QKV, ("self_attn.o_proj",), _GATE_UP, ("mlp.down_proj",)), shared_inputs=(_QKV, _GATE_UP))
#: Phi-3's fused projections: qkv_proj ((query heads + 2 x key/value heads) x head_dim outputs) and gate_up_proj
#: (2 x intermediate outputs), each one linear layer with one H, quantized as it is stored
FUSED = Architecture((("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)))

ARCHITECTURES = {"llama": SEPARATE, "mistral": SEPARATE, "qwen2": SEPARATE, "qwen3": SEPARATE,
                 "gemma": SEPARATE, "gemma2": SEPARATE, "gemma3_text": SEPARATE, "phi3": FUSED}


def architecture(model_type: str, what: str = "model") -> Architecture:
    """The declaration of `model_type`; a one-line ValueError naming the known types and how to add one."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{what}: model type {model_type!r} is not declared for the causal_lm suite (known: "
                         f"{', '.join(sorted(ARCHITECTURES))}); a decoder whose layers follow the Llama module names "
                         f"is added by one entry in ARCHITECTURES in epmq/families/causal_lm/architectures.py: its "
                         f"model_type -> its decoder layer's linear layers, grouped true-sequentially")
    return ARCHITECTURES[model_type]


def model_classes() -> dict[str, str]:
    """transformers class name -> model type, for each declared type's bare decoder and causal-LM model
    (e.g. Qwen3Model and Qwen3ForCausalLM -> qwen3; Gemma3TextModel and Gemma3ForCausalLM -> gemma3_text)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    return {mapping[t]: t for t in ARCHITECTURES for mapping in (MODEL_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
            if t in mapping}
