"""open_clip's ViT image tower as data (key names and shapes) and an independent reference forward.

The reference follows the published architecture of OpenAI's CLIP ViT, which open_clip implements
(Radford et al. 2021; open_clip's VisionTransformer): patch convolution without bias, class token,
positional embedding, ln_pre, pre-LN residual blocks (x + attn(ln_1(x)), x + mlp(ln_2(x))) whose
attention is torch's own multi-head attention on the stacked in_proj weights (what open_clip's
nn.MultiheadAttention runs) and whose MLP is c_proj(QuickGELU(c_fc(x))), then ln_post on the class
token and the projection x @ proj. It shares no code with transformers or epmq.families.clip.openclip.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ViT-B/32 (OpenAI weights, as open_clip and the task-vectors release hold them): the tower's own keys
VIT_B32_STEM = {
    "class_embedding": (768,),
    "positional_embedding": (50, 768),          # 1 + 7 x 7 patches of 32 px on 224 px images
    "proj": (768, 512),
    "conv1.weight": (768, 3, 32, 32),
    "ln_pre.weight": (768,),
    "ln_pre.bias": (768,),
    "ln_post.weight": (768,),
    "ln_post.bias": (768,),
}
VIT_B32_BLOCK = {  # transformer.resblocks.<i>., i = 0 .. 11
    "ln_1.weight": (768,),
    "ln_1.bias": (768,),
    "attn.in_proj_weight": (2304, 768),
    "attn.in_proj_bias": (2304,),
    "attn.out_proj.weight": (768, 768),
    "attn.out_proj.bias": (768,),
    "ln_2.weight": (768,),
    "ln_2.bias": (768,),
    "mlp.c_fc.weight": (3072, 768),
    "mlp.c_fc.bias": (3072,),
    "mlp.c_proj.weight": (768, 3072),
    "mlp.c_proj.bias": (768,),
}
VIT_B32_LAYERS, VIT_B32_HEADS, VIT_B32_PATCH = 12, 12, 32
# What the task-vectors release's ImageEncoder keeps beside model.visual.* (its text transformer is deleted)
IMAGE_ENCODER_TEXT_SIDE = {
    "model.positional_embedding": (77, 512),
    "model.text_projection": (512, 512),
    "model.logit_scale": (),
    "model.token_embedding.weight": (49408, 512),
    "model.ln_final.weight": (512,),
    "model.ln_final.bias": (512,),
}


def tower_shapes(width: int, layers: int, patch: int, grid: int, mlp: int, embed: int, channels: int = 3) -> dict:
    """Key -> shape of an open_clip ViT tower of any size (the B/32 tables above, dimensions substituted)."""
    stem = {"class_embedding": (width,), "positional_embedding": (1 + grid * grid, width), "proj": (width, embed),
            "conv1.weight": (width, channels, patch, patch), "ln_pre.weight": (width,), "ln_pre.bias": (width,),
            "ln_post.weight": (width,), "ln_post.bias": (width,)}
    block = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
             "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
             "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
             "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,), "mlp.c_proj.weight": (width, mlp),
             "mlp.c_proj.bias": (width,)}
    return stem | {f"transformer.resblocks.{i}.{k}": s for i in range(layers) for k, s in block.items()}


def vit_b32_shapes() -> dict:
    return VIT_B32_STEM | {f"transformer.resblocks.{i}.{k}": s for i in range(VIT_B32_LAYERS)
                           for k, s in VIT_B32_BLOCK.items()}


def random_tower(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of plausible scale: layer norms near 1 / 0, everything else N(0, 0.02²)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        out[key] = 1 + 0.1 * noise if key.endswith("ln_1.weight") or key.endswith("ln_2.weight") or (
            key.startswith(("ln_pre", "ln_post")) and key.endswith("weight")) else 0.02 * noise
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


@torch.no_grad()
def forward(w: dict[str, torch.Tensor], images: torch.Tensor, heads: int, act=quick_gelu):
    """open_clip ViT forward on bare tower weights `w`; images (B, C, H, W).

    Returns (tokens (B, 1 + grid², width) after the last block, pooled = ln_post(class token)
    (B, width), features = pooled @ proj (B, embed))."""
    width, patch = w["class_embedding"].shape[0], w["conv1.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("transformer.resblocks."))

    def ln(x, name):
        return F.layer_norm(x, (width,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    x = F.conv2d(images, w["conv1.weight"], stride=patch)               # (B, width, grid, grid)
    x = x.flatten(2).transpose(1, 2)                                    # (B, grid², width)
    cls = w["class_embedding"].expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + w["positional_embedding"]          # (B, 1 + grid², width)
    x = ln(x, "ln_pre")
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1").transpose(0, 1)                           # (tokens, B, width): torch MHA layout
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"], None, None, False,
            0.0, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"], training=False, need_weights=False)
        x = x + attn.transpose(0, 1)
        h = ln(x, p + "ln_2")
        x = x + F.linear(act(F.linear(h, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])),
                         w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
    pooled = ln(x[:, 0], "ln_post")
    return x, pooled, pooled @ w["proj"]
