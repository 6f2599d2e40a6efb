"""Decoders of the Llama module names as the engine sees them: one stage of decoder layers, calibrated
true-sequentially in the groups their model type declares (epmq.families.causal_lm.architectures)."""

from __future__ import annotations

from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage, mask_or_ones
from epmq.families.causal_lm.architectures import architecture


class LlamaAdapter(ModelAdapter):
    """Decoder-only models whose layers follow the Llama module names (every model type declared in
    epmq.families.causal_lm.architectures: Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3): batches of token ids,
    "attention_mask" optional (1 = real token); padded tokens never enter the statistics. The KV cache is
    off, so that running a block again never appends to it. True-sequential by default, as GPTQ does for LMs."""

    true_sequential = True

    @staticmethod
    def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
        inner = getattr(model, "model", None)  # *ForCausalLM wraps the *Model
        return (inner, "model.") if isinstance(getattr(inner, "layers", None), nn.ModuleList) else (model, "")

    def stages(self, model):
        config = getattr(model, "config", None)
        declared = architecture(getattr(config, "model_type", None), type(model).__name__)
        decoder, prefix = self._decoder(model)
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise ValueError(f"{type(model).__name__} has no decoder layers ('model.layers')")
        return [Stage("decoder", prefix + "layers", declared.groups, shared_inputs=declared.shared_inputs)]

    def head_stages(self, model):
        """lm_head (GPTQModel's lm_head=True), on the decoder's output: its final normed hidden states."""
        head = getattr(model, "lm_head", None)
        return [Stage("head", "lm_head", (("lm_head",),), head_of="decoder")] if isinstance(head, nn.Linear) else []

    def run_stage(self, model, stage, batch, context, device):
        self.require(batch, ("input_ids",), "causal LM")
        decoder, _ = self._decoder(model)
        inputs = self.inputs(batch, ("input_ids", "attention_mask"), device)
        return decoder(**inputs, use_cache=False).last_hidden_state

    def token_mask(self, model, stage, batch, source="self"):
        return mask_or_ones(batch.get("attention_mask"), batch["input_ids"])
