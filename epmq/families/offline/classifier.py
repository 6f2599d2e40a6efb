"""A CLIP vision tower with a frozen linear head: the offline suite's image classifier.

The head plays the part of CLIP's zero-shot head: fitted once on the base tower's features,
then frozen and shared by the task's expert, the merged model and the quantized model, so the
towers are the only thing that differs between them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionModel

# Checkpoints written by transformers < 5 nest the tower under `vision_model.`; v5 does not.
LEGACY_PREFIX = "vision_model."


def tower_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the legacy `vision_model.` prefix so any CLIP vision state dict fits a v5 tower."""
    return {k.removeprefix(LEGACY_PREFIX): v for k, v in state_dict.items()}


def save_head(head: nn.Linear, path: str | Path) -> None:
    """Write {"weight": (num_classes, hidden), "bias": (num_classes,)} as safetensors."""
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def load_head(path: str | Path) -> nn.Linear:
    """Read a head written by save_head; returns a frozen nn.Linear(hidden, num_classes)."""
    tensors = load_file(str(path))
    missing = {"weight", "bias"} - tensors.keys()
    if missing:
        raise ValueError(f"head file {path} lacks tensors {sorted(missing)}")
    W, b = tensors["weight"], tensors["bias"]  # (K, D), (K,)
    head = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        head.weight.copy_(W)
        head.bias.copy_(b)
    return head.requires_grad_(False)


class CLIPClassifier(nn.Module):
    """logits = head(tower(pixel_values).pooler_output), with the head frozen.

    tower: a transformers CLIPVisionModel; head: nn.Linear(hidden_size, num_classes).
    """

    def __init__(self, tower: CLIPVisionModel, head: nn.Linear):
        super().__init__()
        if head.in_features != tower.config.hidden_size:
            raise ValueError(f"head in_features {head.in_features} != tower hidden_size {tower.config.hidden_size}")
        self.tower = tower
        self.head = head.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, tower_dir: str | Path, head_file: str | Path) -> "CLIPClassifier":
        """Load a tower saved with save_pretrained and a head saved with save_head."""
        return cls(CLIPVisionModel.from_pretrained(str(tower_dir)), load_head(head_file))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled features (B, hidden)."""
        return self.tower(pixel_values=pixel_values).pooler_output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(pixel_values))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of model(x) against labels y, x (N, C, H, W), y (N,)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return 100.0 * correct / len(y)
