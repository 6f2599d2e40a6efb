"""CLIP zero-shot heads: class names x prompt templates through the frozen text tower.

For a task with K class names and T templates, each of the K·T prompts goes through the base's text
tower and text projection; the embeddings are L2-normalised, averaged over the T templates of a
class and normalised again, giving the head's text embeddings E (K, P). An image's logits are

    logits = exp(logit_scale) · normalize(visual_projection(pooled)) @ Eᵀ        (B, K)

with `pooled` the vision tower's post-layernorm class token (B, width). The text tower, the
visual projection and logit_scale are the base's and stay frozen; only the vision tower differs
between the experts, the merged and the quantized models.

Heads are cached on disk (safetensors), named by a fingerprint of the base and the prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_TEMPLATES = ("a photo of a {}.",)
PLACEHOLDER = "{}"


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The K·T prompts, class-major: class k's prompts are rows k·T .. k·T + T - 1."""
    return [t.replace(PLACEHOLDER, name) for name in classnames for t in templates]


@torch.no_grad()
def text_embeddings(text_model: nn.Module, text_projection: nn.Module, tokenizer, classnames: Sequence[str],
                    templates: Sequence[str], batch_size: int = 256,
                    device: torch.device | str = "cpu", desc: str | None = None) -> torch.Tensor:
    """The head's class embeddings E (K, P), float32, each row of unit L2 norm.

    text_model: a CLIPTextModel (its pooler_output is the end-of-text token's state, (N, width));
    text_projection: nn.Linear(width, P); tokenizer: the base's CLIP tokenizer. Prompts longer than
    the text tower's positions are truncated. desc: a progress bar's label (None: no bar).
    """
    texts = prompts(classnames, templates)
    max_length = text_model.config.max_position_embeddings
    rows = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None, dynamic_ncols=True):
        tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt").to(device)
        pooled = text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        rows.append(F.normalize(text_projection(pooled).float(), dim=-1))  # (n, P), per prompt
    per_prompt = torch.cat(rows).view(len(classnames), len(templates), -1)  # (K, T, P)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).cpu()  # (K, P)


def fingerprint(base_digest: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """sha256 (hex) naming a head: the base's digest (weights, config, tokenizer) and the prompts."""
    payload = json.dumps({"base": base_digest, "classnames": list(classnames), "templates": list(templates),
                          "format": 1}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class HeadCache:
    """Heads on disk: <root>/<fingerprint>.safetensors holding {"text_embeds": (K, P) float32}."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        return load_file(str(path))["text_embeds"] if path.is_file() else None

    def save(self, key: str, text_embeds: torch.Tensor, about: dict) -> Path:
        """Write under a temporary name, then rename: a killed run never leaves half a head."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            save_file({"text_embeds": text_embeds.contiguous()}, tmp,
                      metadata={"about": json.dumps(about, ensure_ascii=False)})
            os.replace(tmp, self.path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return self.path(key)


class ZeroShotClassifier(nn.Module):
    """logits (B, K) = exp(logit_scale) · normalize(projection(tower(pixel_values).pooler_output)) @ Eᵀ.

    tower: a CLIPVisionModel (any of the experts / merged / quantized towers); projection: the base's
    visual projection nn.Linear(width, P, bias=False), frozen; text_embeds: E (K, P), unit rows;
    logit_scale: the base's log temperature (a scalar). Features are normalised and compared in
    float32 whatever dtype the tower runs in.
    """

    def __init__(self, tower: nn.Module, projection: nn.Linear, text_embeds: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        if projection.out_features != text_embeds.shape[1]:
            raise ValueError(f"the visual projection gives {projection.out_features} features, the head's text "
                             f"embeddings have {text_embeds.shape[1]}")
        self.tower = tower
        self.projection = projection.requires_grad_(False)
        self.register_buffer("text_embeds", text_embeds.float(), persistent=False)
        self.register_buffer("scale", logit_scale.detach().float().exp().reshape(()), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.tower(pixel_values=pixel_values).pooler_output  # (B, width)
        with torch.autocast(device_type=pooled.device.type, enabled=False):  # similarities in float32
            image = F.normalize(F.linear(pooled.float(), self.projection.weight.float()), dim=-1)  # (B, P)
            return self.scale.float() * image @ self.text_embeds.float().t()  # (B, K)
