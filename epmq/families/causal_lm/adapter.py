"""Llama-style decoders as the engine sees them: one stage of decoder layers, calibrated true-sequentially."""

from __future__ import annotations

from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage, mask_or_ones


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
