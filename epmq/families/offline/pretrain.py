"""Label-free pretraining of the base tower: predict which of four rotations an image shows.

Rotation prediction (Gidaris et al., 2018) needs no labels, so the base sees the pooled training
images of every task and learns strokes, edges and textures without favouring any one task's
classes; each task's head and expert then start from the same neutral point.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from epmq.families.offline.train import train


def rotate_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image of x (B, C, H, W) by k * 90 degrees, k drawn from generator; labels become k.

    The incoming labels y are ignored: the pretext task is label-free. H must equal W.
    """
    k = torch.randint(0, 4, (len(x),), generator=generator)
    rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
    return rotated, k


class _RotationNet(nn.Module):
    """The tower with a throw-away 4-way head on its pooled output."""

    def __init__(self, tower: CLIPVisionModel):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.hidden_size, 4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixel_values).pooler_output)


def pretrain_rotation(tower: CLIPVisionModel, images: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
                      generator: torch.Generator, schedule: str = "cosine", progress: bool = True) -> float:
    """Train `tower` in place on 4-way rotation prediction over images (N, C, H, W).

    Returns the last epoch's mean loss (log 4 ≈ 1.386 is chance).
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation pretraining needs square images, got {tuple(images.shape[-2:])}")
    net = _RotationNet(tower)
    dummy = torch.zeros(len(images), dtype=torch.long)
    return train(net, images, dummy, epochs=epochs, lr=lr, batch_size=batch_size, generator=generator,
                 batch_fn=rotate_batch, schedule=schedule, desc="base: rotation pretraining", progress=progress)
