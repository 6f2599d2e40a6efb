"""OpenCLIP ViT image towers (the task-vectors release's layout) in the HF CLIPVisionModel layout.

open_clip's VisionTransformer (OpenAI's CLIP ViT) and transformers' CLIPVisionModel compute the same
pre-LN ViT: patch convolution, class token, positional embedding, ln_pre, residual blocks of
attention and MLP, ln_post on the class token, then a projection. Only the names differ, plus two
shape changes: open_clip keeps q, k and v in one in_proj matrix (3·width, width), split here along
its rows; and its projection `proj` is (width, embed), applied as x @ proj, where HF's
visual_projection is an nn.Linear weight (embed, width), its transpose. The map below is that
correspondence as data; nothing here imports open_clip.

A visual tower may sit under any prefix ("visual." in an open_clip CLIP model, "model.visual." in
the task-vectors release's ImageEncoder); keys outside it (the text side) are ignored. The release's
finetuned.pt / zeroshot.pt files are pickled whole modules: they load only with open_clip (and the
classes the pickle names) importable and an explicit allow_pickle=True.

    python -m epmq.families.clip.openclip finetuned.pt out_dir --allow-pickle   # out_dir: a CLIPVisionModel folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

# open_clip key (after the tower's prefix) -> HF CLIPVisionModel key; same shape
STEM = {
    "class_embedding": "embeddings.class_embedding",                      # (width,)
    "positional_embedding": "embeddings.position_embedding.weight",       # (1 + grid², width)
    "conv1.weight": "embeddings.patch_embedding.weight",                  # (width, 3, patch, patch)
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# transformer.resblocks.<i>.<key> -> encoder.layers.<i>.<key>; same shape
BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",                  # (width, width)
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",                                  # (mlp, width)
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",                                # (width, mlp)
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# stacked q, k, v (3·width, ...) -> three (width, ...) tensors, in this order
BLOCK_SPLIT = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
# (width, embed) -> HF visual_projection.weight (embed, width), transposed; not part of CLIPVisionModel
PROJECTION = "proj"
BLOCKS = "transformer.resblocks."
ANCHOR = "conv1.weight"  # every visual tower has it: its prefix is the tower's prefix
PROJECTION_FILE = "visual_projection.safetensors"


def tower_prefix(keys) -> str | None:
    """The prefix of the open_clip visual tower among `keys` ('visual.', 'model.visual.', '' for a bare
    tower), or None when the keys hold no open_clip ViT tower."""
    for key in keys:
        if key.endswith(ANCHOR) and (key[: -len(ANCHOR)] + BLOCKS + "0." + "attn.in_proj_weight") in keys:
            return key[: -len(ANCHOR)]
    return None


def is_openclip(keys) -> bool:
    """Whether a state dict's keys hold an open_clip ViT visual tower."""
    return tower_prefix(set(keys)) is not None


def convert(state: Mapping[str, torch.Tensor], source: str = "state dict") -> tuple[dict, torch.Tensor | None]:
    """(CLIPVisionModel state dict, visual_projection weight (embed, width) or None) of the open_clip
    visual tower in `state`. ValueError naming `source` and the key when a tower key has no
    counterpart (an open_clip variant this map does not cover) or a needed key is missing."""
    prefix = tower_prefix(set(state))
    if prefix is None:
        raise ValueError(f"{source}: no open_clip ViT visual tower (no '{ANCHOR}' with "
                         f"'{BLOCKS}0.attn.in_proj_weight' beside it)")
    block_key = re.compile(re.escape(BLOCKS) + r"(\d+)\.(.+)")
    out: dict[str, torch.Tensor] = {}
    projection = None
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # the text side of a whole CLIP model
        name = key[len(prefix):]
        if name in STEM:
            out[STEM[name]] = value
        elif name == PROJECTION:
            projection = value.t().contiguous()
        elif (m := block_key.fullmatch(name)) and m.group(2) in BLOCK:
            out[f"encoder.layers.{m.group(1)}.{BLOCK[m.group(2)]}"] = value
        elif m and m.group(2) in BLOCK_SPLIT:
            if value.shape[0] % 3:
                raise ValueError(f"{source}: key '{key}' has shape {tuple(value.shape)}, not 3·width rows")
            for hf_name, part in zip(BLOCK_SPLIT[m.group(2)], value.chunk(3, dim=0)):
                out[f"encoder.layers.{m.group(1)}.{hf_name}"] = part.contiguous()
        else:
            raise ValueError(f"{source}: open_clip key '{key}' has no counterpart in the HF CLIPVisionModel "
                             f"layout (an open_clip variant epmq.families.clip.openclip does not convert)")
    layers = 1 + max((int(k.split(".")[2]) for k in out if k.startswith("encoder.layers.")), default=-1)
    expected = list(STEM.values()) + [f"encoder.layers.{i}.{n}" for i in range(layers)
                                      for n in [*BLOCK.values(), *(x for v in BLOCK_SPLIT.values() for x in v)]]
    missing = [k for k in expected if k not in out]
    if missing:
        raise ValueError(f"{source}: the open_clip tower lacks the weights of HF key '{missing[0]}' "
                         f"({len(missing)} missing in all)")
    return out, projection


def vision_config(tower: Mapping[str, torch.Tensor], projection: torch.Tensor | None = None,
                  head_width: int = 64, hidden_act: str = "quick_gelu"):
    """The CLIPVisionConfig of a converted tower, read from its shapes.

    The number of attention heads is not in the weights: width / head_width (open_clip's ViTs use
    64-wide heads). hidden_act: "quick_gelu" for OpenAI's weights (the task-vectors release),
    "gelu" for towers trained with nn.GELU (most LAION ones).
    """
    from transformers import CLIPVisionConfig

    width = tower["embeddings.class_embedding"].shape[0]
    patch_weight = tower["embeddings.patch_embedding.weight"]  # (width, channels, patch, patch)
    tokens = tower["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1 or width % head_width:
        raise ValueError(f"open_clip tower: {tokens} positions is not 1 + a square grid, or width {width} "
                         f"is not a multiple of the head width {head_width}")
    layers = 1 + max(int(k.split(".")[2]) for k in tower if k.startswith("encoder.layers."))
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=tower["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=width // head_width, num_channels=patch_weight.shape[1],
        patch_size=patch_weight.shape[-1], image_size=grid * patch_weight.shape[-1],
        projection_dim=projection.shape[0] if projection is not None else 512, hidden_act=hidden_act,
        layer_norm_eps=1e-5)


def load_state(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, a torch state dict (weights_only), or, with
    allow_pickle=True and open_clip importable, a pickled whole module (the task-vectors release).

    ValueError naming the file when it is a pickled module and allow_pickle is off, or when open_clip
    (or another class the pickle names) cannot be imported.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln),
                      type(e).__name__)
        if not allow_pickle:
            raise ValueError(f"{path}: a pickled module, not a state dict (torch.load(weights_only=True): "
                             f"{reason}); the task-vectors release saves whole open_clip modules, which load "
                             f"only with open_clip installed and allow_pickle=true (if you trust the file)") from None
        if importlib.util.find_spec("open_clip") is None:
            raise ValueError(f"{path}: a pickled module; unpickling it needs open_clip, which is not "
                             f"installed (pip install 'epmq[openclip]' on a machine with a working "
                             f"torchvision), or convert it where open_clip is") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as e:  # a class the pickle names is not importable
            raise ValueError(f"{path}: cannot unpickle: {e} (the pickle's classes must be importable)") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def save_pretrained(state: Mapping[str, torch.Tensor], out_dir: str | Path, source: str = "state dict",
                    **config_options) -> Path:
    """Convert the open_clip tower in `state` and write a CLIPVisionModel folder: config.json and
    model.safetensors (loads with CLIPVisionModel.from_pretrained and epmq's ExpertPool), and
    visual_projection.safetensors ({"weight": (embed, width)}) when the tower has a projection.
    Written into a temporary folder renamed into place. config_options: see vision_config."""
    from safetensors.torch import save_file

    tower, projection = convert(state, source)
    config = vision_config(tower, projection, **config_options)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tower.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if projection is not None:
            save_file({"weight": projection}, str(tmp / PROJECTION_FILE), metadata={"format": "pt"})
        (tmp / "conversion.json").write_text(json.dumps({"from": source, "format": "open_clip visual tower"}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m epmq.families.clip.openclip", description=(
        "Convert an open_clip ViT visual tower (state dict, or with --allow-pickle a pickled module of the "
        "task-vectors release) into a transformers CLIPVisionModel folder."))
    parser.add_argument("source", help=".pt/.pth/.bin/.safetensors file")
    parser.add_argument("out_dir")
    parser.add_argument("--allow-pickle", action="store_true", help="unpickle whole modules (needs open_clip)")
    parser.add_argument("--hidden-act", default="quick_gelu", help="quick_gelu (OpenAI weights) or gelu")
    parser.add_argument("--head-width", type=int, default=64)
    args = parser.parse_args(argv)
    state = load_state(args.source, args.allow_pickle)
    out = save_pretrained(state, args.out_dir, args.source, head_width=args.head_width, hidden_act=args.hidden_act)
    print(out)


if __name__ == "__main__":
    main()
