"""Tiny models of the real transformers classes for every family the engine supports, their experts
(base + small task vectors, saved with save_pretrained into a folder) and calibration batches.

Each family gives: a base model, a function making an expert from the base, and a list of batches
(dicts with the family's input keys and "task"), with padding where the family has masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from epmq.engine.adapters import ModelAdapter
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.flan_t5.adapter import T5Adapter

TASKS = ["alpha", "beta"]


def with_task_vector(base: nn.Module, fresh: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """`fresh` (a model of base's class) holding base's weights, every float tensor moved by
    `scale` x its mean magnitude x standard normal noise drawn from `seed`: a tiny fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in base.state_dict().items():
        noise = torch.randn(v.shape, generator=gen)
        state[k] = v + scale * v.abs().mean().clamp_min(1e-3) * noise if v.is_floating_point() else v
    fresh.load_state_dict(state)
    return fresh.eval()


def clip_model() -> nn.Module:
    return CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))


def t5_model() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, tie_word_embeddings=False))


def llama_model() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0))


#: model_type -> (config class, model class, type-specific config) of the tiny decoders of every declared type
#: (epmq.families.causal_lm.architectures); short windows so that the sliding-window layers really slide
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
            "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v with biases
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q_norm, k_norm
            "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),  # lm_head tied to embed_tokens
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 4}),  # softcapping, sliding layers
            "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                            {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}),
            "phi3": ("Phi3Config", "Phi3ForCausalLM", {})}  # fused qkv_proj and gate_up_proj


def decoder_model(model_type: str, hidden: int = 32) -> nn.Module:
    """A 2-layer decoder of `model_type` (hidden, MLP 2 x hidden, 4 heads of hidden / 4, 2 key/value heads,
    48 tokens), as llama_model; hidden=64 makes every quantized dimension a multiple of 32 (GPTQModel's kernels)."""
    import transformers

    config, model, extra = DECODERS[model_type]
    return getattr(transformers, model)(getattr(transformers, config)(
        vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **extra))


def clip_batches(gen: torch.Generator) -> list[dict]:
    """Three batches of 3 one-channel 16x16 images, tasks mixed within batches."""
    tasks = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1])
    pixels = torch.randn(9, 1, 16, 16, generator=gen)
    return [{"pixel_values": pixels[i:i + 3], "task": tasks[i:i + 3]} for i in range(0, 9, 3)]


def _padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids * mask, mask


def t5_batches(gen: torch.Generator) -> list[dict]:
    """Two batches of 3 sentences, padded inputs (attention_mask) and padded labels (-100)."""
    batches = []
    for lengths, label_lengths, tasks in (([7, 5, 3], [4, 2, 3], [0, 1, 0]), ([6, 7, 4], [3, 4, 1], [1, 1, 0])):
        ids, mask = _padded(torch.randint(2, 40, (3, 7), generator=gen), lengths)
        labels = torch.randint(2, 40, (3, 4), generator=gen)
        for row, n in enumerate(label_lengths):
            labels[row, n:] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "task": torch.tensor(tasks)})
    return batches


def llama_batches(gen: torch.Generator) -> list[dict]:
    """Two batches of 3 right-padded token sequences of length 8."""
    batches = []
    for lengths, tasks in (([8, 6, 8], [0, 1, 1]), ([5, 8, 7], [1, 0, 0])):
        ids, mask = _padded(torch.randint(1, 48, (3, 8), generator=gen), lengths)
        batches.append({"input_ids": ids, "attention_mask": mask, "task": torch.tensor(tasks)})
    return batches


@dataclass
class Family:
    name: str
    make: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], list[dict]]
    adapter: ModelAdapter

    def base(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().eval()

    def expert(self, base: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
        return with_task_vector(base, self.base(), seed, scale)

    def save_zoo(self, root: Path, seed: int = 0) -> tuple[nn.Module, dict[str, nn.Module], dict[str, Path]]:
        """base/ and one folder per task with save_pretrained; returns (base, experts, expert folders)."""
        base = self.base(seed)
        base.save_pretrained(root / "base")
        experts, paths = {}, {}
        for t, task in enumerate(TASKS):
            experts[task] = self.expert(base, seed=100 + t)
            experts[task].save_pretrained(root / task)
            paths[task] = root / task
        return base, experts, paths


FAMILIES = {"clip": Family("clip", clip_model, clip_batches, CLIPVisionAdapter()),
            "t5": Family("t5", t5_model, t5_batches, T5Adapter()),
            "llama": Family("llama", llama_model, llama_batches, LlamaAdapter())}


class BatchList(torch.utils.data.Dataset):
    """A list of ready batches as a dataset (use with DataLoader(batch_size=None))."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def loader(batches: list[dict]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(BatchList(batches), batch_size=None, shuffle=False)


def model_inputs(name: str, batch: dict) -> dict:
    """The keyword arguments of the family's full forward for a batch (reference runs)."""
    keys = {"clip": ("pixel_values",), "t5": ("input_ids", "attention_mask", "labels"),
            "llama": ("input_ids", "attention_mask")}[name]
    extra = {"use_cache": False} if name in ("t5", "llama") else {}
    return {k: batch[k] for k in keys} | extra
