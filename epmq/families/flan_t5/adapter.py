"""T5 and FLAN-T5 as the engine sees them: the encoder's blocks, then the decoder's."""

from __future__ import annotations

import torch
from torch import nn

from epmq.engine.adapters import ModelAdapter, Stage, mask_or_ones


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
            return mask_or_ones(batch.get("attention_mask"), batch["input_ids"])
        if "decoder_input_ids" in batch:
            return mask_or_ones(batch.get("decoder_attention_mask"), batch["decoder_input_ids"])
        return torch.as_tensor(batch["labels"]) != -100  # the positions T5's loss scores: padding never counts
